"""Per-key token buckets: how many messages one sender may push per second.

Each key (a peer id, a connection) has a bucket of ``burst`` tokens that
refills at ``rate`` tokens per second; a message costs one. Memory is bounded:
at most ``max_keys`` buckets, the least recently used one forgotten first (a
forgotten key starts again with a full bucket, which only ever lets a little
more through, never less). Time is passed in, so tests are exact. Not
thread-safe: one limiter per thread.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

__all__ = ["RateLimiter"]


class RateLimiter:
    def __init__(self, rate: float, burst: float, *, max_keys: int = 4096) -> None:
        if not rate > 0 or not burst >= 1 or max_keys < 1:
            raise ValueError("rate must be > 0, burst >= 1 and max_keys >= 1")
        self.rate = float(rate)
        self.burst = float(burst)
        self.max_keys = max_keys
        self._buckets: OrderedDict[Hashable, tuple[float, float]] = OrderedDict()

    def _level(self, key: Hashable, now: float) -> float:
        entry = self._buckets.get(key)
        if entry is None:
            return self.burst
        tokens, at = entry
        return min(self.burst, tokens + max(0.0, now - at) * self.rate)

    def ready(self, key: Hashable, now: float) -> bool:
        """Whether ``key`` has a token now (nothing is taken)."""
        return self._level(key, now) >= 1.0

    def take(self, key: Hashable, now: float) -> None:
        """Spend one token of ``key`` (none left: the bucket stays empty)."""
        self._buckets[key] = (max(0.0, self._level(key, now) - 1.0), now)
        self._buckets.move_to_end(key)
        if len(self._buckets) > self.max_keys:
            self._buckets.popitem(last=False)

    def allow(self, key: Hashable, now: float) -> bool:
        """Take a token of ``key`` if it has one; False (nothing taken) otherwise."""
        if not self.ready(key, now):
            return False
        self.take(key, now)
        return True

    def __len__(self) -> int:
        return len(self._buckets)
