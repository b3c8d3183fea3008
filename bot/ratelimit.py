"""A token bucket per key: `per_minute` refill, `burst` capacity; a sliding window that caps any `seconds`. Time is
passed in."""

from __future__ import annotations

import math
from collections import deque


class TokenBucket:
    def __init__(self, per_minute: int, burst: int):
        self.rate = per_minute / 60.0
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.updated: float | None = None

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` tokens; 0.0 if allowed, else seconds until they would be there."""
        if self.updated is not None:
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= cost:
            self.tokens -= cost
            return 0.0
        return (cost - self.tokens) / self.rate

    @staticmethod
    def retry_after_header(wait: float) -> str:
        return str(max(1, math.ceil(wait)))


class Window:
    """At most `limit` takes in any `seconds`, the ends of the window included: a take waits until the one `limit`
    takes before it is more than `seconds` old. A token bucket cannot promise that: on top of its rate it lets its
    burst through, so `per_minute` with a burst of 3 is 3 more in the first minute."""

    def __init__(self, limit: int, seconds: float = 60.0):
        self.limit, self.seconds = limit, seconds
        self.taken: deque[float] = deque()
        self.tokens = float(limit)  # takes left in the window, as of the last take (a TokenBucket's `tokens`)

    def take(self, now: float, cost: float = 1.0) -> float:
        """Take `cost` (whole) takes; 0.0 if allowed, else seconds until they would be."""
        while self.taken and now - self.taken[0] > self.seconds:
            self.taken.popleft()
        self.tokens = float(self.limit - len(self.taken))
        need = math.ceil(cost)
        if need <= self.tokens:
            self.taken.extend([now] * need)
            self.tokens -= need
            return 0.0
        if need > self.limit:
            return math.inf
        oldest = self.taken[len(self.taken) - (self.limit - need) - 1]  # the take that must leave the window first
        return max(oldest + self.seconds - now, 0.0) + 1e-6
