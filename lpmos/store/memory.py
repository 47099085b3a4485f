"""An in-memory :class:`lpmos.store.Store` that behaves like etcd.

Everything the interface promises holds (one global revision, conditional
commits, leases that expire, watches from a revision, compaction), and it
passes the same contract suite as the real store, so a test on it says what
a test on etcd would.  It holds one process's data and keeps nothing:
unit tests use it, and so does the standalone DHCP server run without an
etcd endpoint.  The fakes that are not etcd-like (broken, counting) are in
:mod:`lpmos.store.testing`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import replace

from lpmos.store import (
    Compacted,
    Compare,
    Conflict,
    Delete,
    Event,
    KeyValue,
    Op,
    Page,
    Put,
    StoreError,
)


class MemoryStore:
    def __init__(self, timeout: float = 2.0) -> None:
        self.timeout = timeout
        self._data: dict[str, KeyValue] = {}
        self._log: list[Event] = []
        self._rev = 1
        self._compacted = 0
        self._leases: dict[int, tuple[float, int]] = {}   # id -> (expires, ttl)
        self._next_lease = 1000
        self._cond = threading.Condition()

    # -- helpers (lock held)
    def _expire(self) -> None:
        now = time.monotonic()
        for lease_id, (expires, _ttl) in list(self._leases.items()):
            if expires <= now:
                self._drop_lease(lease_id)

    def _drop_lease(self, lease_id: int) -> None:
        self._leases.pop(lease_id, None)
        doomed = [k for k, kv in self._data.items() if kv.lease == lease_id]
        if doomed:
            self._rev += 1
            for k in doomed:
                del self._data[k]
                self._log.append(Event("delete", k, b"", self._rev))
            self._cond.notify_all()

    def _apply(self, ops: Sequence[Op]) -> int:
        self._rev += 1
        for op in ops:
            if isinstance(op, Put):
                if op.lease and op.lease not in self._leases:
                    raise StoreError(f"lease {op.lease} not found")
                old = self._data.get(op.key)
                kv = KeyValue(op.key, op.value, self._rev,
                              old.create_revision if old else self._rev,
                              (old.version + 1) if old else 1, op.lease)
                self._data[op.key] = kv
                self._log.append(Event("put", op.key, op.value, self._rev, kv.create_revision,
                                       op.lease))
            elif isinstance(op, Delete) and op.key in self._data:
                del self._data[op.key]
                self._log.append(Event("delete", op.key, b"", self._rev))
        self._cond.notify_all()
        return self._rev

    # -- interface
    def get(self, key: str) -> KeyValue | None:
        with self._cond:
            self._expire()
            return self._data.get(key)

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        with self._cond:
            self._expire()
            if revision and revision < self._compacted:
                raise Compacted(self._compacted)
            if revision and revision != self._rev:
                data = self._snapshot(revision)
            else:
                data = self._data
            keys = sorted(k for k in data if k.startswith(prefix) and
                          (start is None or k >= start))
            more = bool(limit) and len(keys) > limit
            if limit:
                keys = keys[:limit]
            return Page([data[k] for k in keys], revision or self._rev, more)

    def _snapshot(self, revision: int) -> dict[str, KeyValue]:
        data = dict(self._data)
        for ev in reversed(self._log):
            if ev.mod_revision <= revision:
                break
            data.pop(ev.key, None)
        # restore values as of `revision` from the log
        for ev in self._log:
            if ev.mod_revision > revision:
                break
            if ev.type == "put":
                data[ev.key] = ev.as_kv()
            else:
                data.pop(ev.key, None)
        return data

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        with self._cond:
            self._expire()
            return self._apply([Put(key, value, lease)])

    def delete(self, key: str) -> bool:
        with self._cond:
            self._expire()
            if key not in self._data:
                return False
            self._apply([Delete(key)])
            return True

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        with self._cond:
            self._expire()
            for c in compares:
                kv = self._data.get(c.key)
                current = kv.mod_revision if kv else 0
                if current != c.mod_revision:
                    raise Conflict(c.key, current)
            return self._apply(ops)

    def revision(self) -> int:
        with self._cond:
            return self._rev

    def grant(self, ttl: int) -> int:
        with self._cond:
            self._next_lease += 1
            self._leases[self._next_lease] = (time.monotonic() + ttl, ttl)
            return self._next_lease

    def keepalive(self, lease_id: int) -> int:
        with self._cond:
            self._expire()
            if lease_id not in self._leases:
                return 0
            ttl = self._leases[lease_id][1]
            self._leases[lease_id] = (time.monotonic() + ttl, ttl)
            return ttl

    def revoke(self, lease_id: int) -> None:
        with self._cond:
            self._drop_lease(lease_id)

    def compact(self, revision: int) -> None:
        with self._cond:
            self._compacted = revision
            self._log = [e for e in self._log if e.mod_revision >= revision]

    def watch(self, prefix: str, start_revision: int) -> MemoryWatch:
        return MemoryWatch(self, prefix, start_revision)

    def close(self) -> None:
        pass


class MemoryWatch:
    def __init__(self, store: MemoryStore, prefix: str, start_revision: int) -> None:
        self._store = store
        self._prefix = prefix
        self._next = start_revision
        self._closed = False
        self._progress = False

    def progress(self) -> None:
        with self._store._cond:
            self._progress = True
            self._store._cond.notify_all()

    def close(self) -> None:
        with self._store._cond:
            self._closed = True
            self._store._cond.notify_all()

    def __iter__(self) -> Iterator[tuple[list[Event], int]]:
        s = self._store
        while True:
            with s._cond:
                while True:
                    if self._closed:
                        return
                    s._expire()
                    if self._next and self._next < s._compacted:
                        raise Compacted(s._compacted)
                    events = [e for e in s._log
                              if e.mod_revision >= self._next and e.key.startswith(self._prefix)]
                    if events or self._progress:
                        self._progress = False
                        break
                    s._cond.wait(0.05)
                rev = s._rev
                self._next = rev + 1
            yield [replace(e) for e in events], rev

