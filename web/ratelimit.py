"""Token-bucket rate limits, bounded in memory.

:class:`RateLimiter` keeps one bucket per key (a client address, a user
name) in an LRU of at most ``max_keys`` entries: a flood of new keys evicts
old buckets instead of growing memory (the evicted key starts with a full
bucket again, which errs towards letting a real user in).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict


class RateLimiter:
    def __init__(self, per_minute: float, burst: float | None = None, *,
                 max_keys: int = 10000) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(1.0, burst if burst is not None else per_minute)
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, key: str, *, now: float | None = None) -> tuple[bool, float]:
        """Take one token for ``key``: ``(allowed, seconds until the next token)``."""
        t = time.monotonic() if now is None else now
        with self._lock:
            tokens, last = self._buckets.pop(key, (self.burst, t))
            tokens = min(self.burst, tokens + (t - last) * self.rate)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, t)
                allowed, wait = True, 0.0
            else:
                self._buckets[key] = (tokens, t)
                allowed, wait = False, (1.0 - tokens) / self.rate if self.rate else 60.0
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
            return allowed, wait

    def reset(self, key: str) -> None:
        with self._lock:
            self._buckets.pop(key, None)
