"""ReplayGuard prunes with a heap, and answers exactly as the original dict rebuild did."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from bot.auth import ReplayGuard

LONGEST_WINDOW = 24 * 3600.0  # bot.auth's: twice the largest max_skew


class Reference:
    """ReplayGuard as first written: past the limit, every remember() rebuilds the dict."""

    def __init__(self, limit: int):
        self.limit = limit
        self._seen: dict[str, float] = {}

    def seen(self, signature: str, now: float) -> bool:
        expires = self._seen.get(signature)
        return expires is not None and expires > now

    def remember(self, signature: str, until: float) -> None:
        if len(self._seen) > self.limit:
            now = until - LONGEST_WINDOW
            self._seen = {s: t for s, t in self._seen.items() if t > now}
        self._seen[signature] = until


steps = st.lists(st.tuples(st.sampled_from(["seen", "remember"]), st.integers(0, 8) | st.integers(0, 40),
                           st.floats(0, 20_000_000, allow_nan=False), st.sampled_from([0.0, 300.0, 5000.0, 80_000.0])),
                 max_size=300)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 12), steps)
# remembered again later: the first expiry, once past, must not drop the newer one
@example(1, [("remember", 1, 0.0, 0.0), ("remember", 1, 100.0, 5000.0), ("remember", 2, 100.0, 5000.0),
             ("remember", 3, 100.0, 5000.0), ("seen", 1, 100.0, 0.0)])
def test_replay_guard_answers_as_the_dict_rebuild_did(limit: int, ops: list[tuple[str, int, float, float]]) -> None:
    guard, reference = ReplayGuard(), Reference(limit)
    guard.limit = limit
    clock = 0.0
    for op, n, dt, skew in ops:
        clock += dt / 100  # time only moves forward, by uneven steps
        signature = f"sig-{n}"
        if op == "seen":
            assert guard.seen(signature, clock) == reference.seen(signature, clock)
        else:
            guard.remember(signature, clock + skew)
            reference.remember(signature, clock + skew)
        assert guard._seen == reference._seen and list(guard._seen) == list(reference._seen)


def test_past_its_limit_the_guard_keeps_every_signature_still_valid() -> None:
    """A max_skew of 12 h keeps a future-dated signature valid for up to 24 h: pruning drops only what has ended."""
    guard = ReplayGuard()
    guard.limit = 2
    guard.remember("mid", 36_000.0)  # now is 0: valid for 10 more hours
    for n in range(5):  # future-dated ones, valid for 20 hours
        guard.remember(f"far-{n}", 72_000.0 + n)
    assert guard.seen("mid", 100.0)


def test_told_the_time_the_guard_keeps_only_what_is_still_valid() -> None:
    """A day of 10 signed requests a second, each valid for 10 minutes (max_skew 5 min): told the time, the guard
    holds the last 10 minutes' signatures, not a day's (864,000 of them, about 220 MB, when it only pruned past its
    limit and by the longest window any source may have); it still refuses every one within its window."""
    guard = ReplayGuard()
    window = 600.0
    for n in range(0, 24 * 3600 * 10, 10):  # (every tenth of them, to keep the test short: a request a second)
        now = n / 10
        guard.remember(f"sig-{n}", now + window, now=now)
    now = 24 * 3600 - 1.0
    assert len(guard._seen) <= window + 1 and len(guard._expiries) <= window + 1
    assert guard.seen(f"sig-{int(now * 10)}", now) and guard.seen(f"sig-{int((now - window + 2) * 10)}", now)
    assert not guard.seen(f"sig-{int((now - window - 2) * 10)}", now)  # (ended: dropped, and no replay anyway)


@settings(max_examples=200, deadline=None)
@given(steps)
def test_told_the_time_the_guard_answers_as_one_that_keeps_everything(ops: list[tuple[str, int, float, float]]) -> None:
    guard, everything = ReplayGuard(), Reference(limit=10**9)
    clock, last = 0.0, None
    for op, n, dt, skew in ops:
        clock += dt / 100
        signature = f"sig-{n}"
        if op == "seen":
            assert guard.seen(signature, clock) == everything.seen(signature, clock)
        else:
            guard.remember(signature, clock + skew, now=clock)
            everything.remember(signature, clock + skew)
            last = clock
    if last is not None:  # what had ended when it was last told the time is gone (what it took then stays)
        assert all(until >= last for until in guard._seen.values())
