"""A token bucket per key: `per_minute` refill, `burst` capacity. Time is passed in."""

from __future__ import annotations

import math


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
