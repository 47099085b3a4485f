"""Store fakes, so that "etcd is down" or "this answer made no etcd request"
is an ordinary test.

* :class:`BrokenStore` fails every request at once with
  :class:`~lpmos.store.StoreUnavailable`, as an unreachable etcd does after
  its deadline: the outage paths (spool, fail closed, 503) run without a
  stopped etcd and without waiting for a timeout.
* :class:`CountingStore` passes every call through to a real store and
  records which methods were called, so a test can say how many etcd
  requests an answer cost (none, for an answer served from the watch cache).

Both satisfy :class:`~lpmos.store.Store`, so they go wherever a store does.
The in-memory store that behaves like etcd is
:class:`lpmos.store.memory.MemoryStore`: it is not only a test double (the
standalone DHCP server runs on it without etcd) and passes the same contract
suite as the real store.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

from lpmos.store import Compare, KeyValue, Op, Page, Store, StoreUnavailable, Watch


class BrokenStore:
    """A store whose every request raises :class:`StoreUnavailable` at once.
    ``close()`` succeeds: there is nothing to release."""

    def __init__(self, timeout: float = 0.1) -> None:
        self.timeout = timeout

    @staticmethod
    def _fail() -> StoreUnavailable:
        return StoreUnavailable("store is broken (test double)")

    def get(self, key: str) -> KeyValue | None:
        raise self._fail()

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        raise self._fail()

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        raise self._fail()

    def delete(self, key: str) -> bool:
        raise self._fail()

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        raise self._fail()

    def revision(self) -> int:
        raise self._fail()

    def grant(self, ttl: int) -> int:
        raise self._fail()

    def keepalive(self, lease_id: int) -> int:
        raise self._fail()

    def revoke(self, lease_id: int) -> None:
        raise self._fail()

    def watch(self, prefix: str, start_revision: int) -> Watch:
        raise self._fail()

    def close(self) -> None:
        pass


def _always() -> bool:
    return True


class CountingStore:
    """Delegates to ``inner`` and appends each called method's name to
    :attr:`calls`, in call order (``calls.count("range")`` is the number of
    range reads), when ``counted()`` is true at the time of the call: e.g.
    only the calls made on a service's worker threads.  Thread-safe; clear
    :attr:`calls` to start a new count."""

    def __init__(self, inner: Store, *, counted: Callable[[], bool] = _always) -> None:
        self.inner = inner
        self.timeout = inner.timeout
        self.calls: list[str] = []
        self._counted = counted
        self._lock = threading.Lock()

    def _count(self, method: str) -> None:
        if self._counted():
            with self._lock:
                self.calls.append(method)

    def get(self, key: str) -> KeyValue | None:
        self._count("get")
        return self.inner.get(key)

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        self._count("range")
        return self.inner.range(prefix, start=start, limit=limit, revision=revision)

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self._count("put")
        return self.inner.put(key, value, lease=lease)

    def delete(self, key: str) -> bool:
        self._count("delete")
        return self.inner.delete(key)

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        self._count("commit")
        return self.inner.commit(compares, ops)

    def revision(self) -> int:
        self._count("revision")
        return self.inner.revision()

    def grant(self, ttl: int) -> int:
        self._count("grant")
        return self.inner.grant(ttl)

    def keepalive(self, lease_id: int) -> int:
        self._count("keepalive")
        return self.inner.keepalive(lease_id)

    def revoke(self, lease_id: int) -> None:
        self._count("revoke")
        self.inner.revoke(lease_id)

    def watch(self, prefix: str, start_revision: int) -> Watch:
        self._count("watch")
        return self.inner.watch(prefix, start_revision)

    def close(self) -> None:
        self._count("close")
        self.inner.close()
