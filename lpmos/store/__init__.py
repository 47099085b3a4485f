"""The store: a narrow interface over etcd with revisions and conditional writes.

Every LPMOS service talks to etcd through :class:`Store` and nothing else.
The interface is deliberately small (matchbox's storage interface is the
model): plain reads, one transactional write primitive (:meth:`Store.commit`)
with compare-on-``mod_revision`` conditions, leases, and a watch.  The
conveniences that callers want (:func:`atomic_update`, :func:`cas`,
:func:`create`) are written once here on top of it, so the real etcd store
(:class:`lpmos.store.etcd.EtcdStore`) and the in-memory double
(:class:`lpmos.store.memory.MemoryStore`) behave the same, and one contract
test suite runs against both.  Fakes for tests that need a broken store or a
count of requests are in :mod:`lpmos.store.testing`.

Contract every implementation keeps:

* every call returns or raises within the store's deadline; an unreachable
  or stalled backend raises :class:`StoreUnavailable`, never hangs;
* :meth:`Store.commit` applies all its operations or none; a failed
  condition raises :class:`Conflict` carrying the current revision of the
  first key whose condition failed;
* revisions are etcd's: one global, strictly increasing counter;
  ``mod_revision == 0`` in a condition means "the key does not exist";
* a watch yields batches of events in revision order, starting at the
  revision asked for; it raises :class:`Compacted` when that revision is
  gone, and :class:`StoreUnavailable` when the stream breaks;
* a write refused for lack of space raises :class:`NoSpace`.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

T = TypeVar("T")


class StoreError(Exception):
    """Base class of store errors."""

    status_code = 500


class StoreUnavailable(StoreError):
    """The backend did not answer within the deadline, or is unreachable."""

    status_code = 503


class NoSpace(StoreUnavailable):
    """etcd refused a write because its backend quota is full (the NOSPACE
    alarm).  Reads still work; writes fail until the history is compacted,
    the backend defragmented and the alarm disarmed.  A StoreUnavailable, so
    every writer's outage path (spool, fail closed, 503) applies."""


class Conflict(StoreError):
    """A conditional write lost: the key changed since it was read.

    ``revision`` is the key's current ``mod_revision`` (0 if it is absent),
    so an HTTP 409 can tell the caller what it raced against.
    """

    status_code = 409

    def __init__(self, key: str, revision: int = 0, message: str = "") -> None:
        super().__init__(message or f"{key} changed concurrently (now at revision {revision})")
        self.key = key
        self.revision = revision


class Compacted(StoreError):
    """A watch asked for a revision that etcd has compacted away."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted (oldest available {compact_revision})")
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    version: int = 1
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Event:
    """A change seen by a watch.  ``value`` is empty for a delete."""

    type: Literal["put", "delete"]
    key: str
    value: bytes
    mod_revision: int
    create_revision: int = 0
    lease: int = 0

    def as_kv(self) -> KeyValue:
        return KeyValue(self.key, self.value, self.mod_revision, self.create_revision,
                        lease=self.lease)


@dataclass(frozen=True, slots=True)
class Compare:
    """Condition of a commit: ``key``'s mod_revision equals ``mod_revision``.

    ``mod_revision == 0`` means the key must not exist.
    """

    key: str
    mod_revision: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: bytes
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class Page:
    """A range read: the items, the store revision it was read at, and
    whether more keys follow (continue with ``start=items[-1].key``)."""

    items: list[KeyValue]
    revision: int
    more: bool = False


class Watch(Protocol):
    """An open watch.  Iterate for ``(events, revision)`` batches; ``close()``
    ends it from any thread.  ``progress()`` asks the backend to confirm the
    watch is current: a batch with no events and the current revision comes
    back when it is."""

    def __iter__(self) -> Iterator[tuple[list[Event], int]]: ...

    def close(self) -> None: ...

    def progress(self) -> None: ...


class Store(Protocol):
    """What every LPMOS service may ask of etcd.  Keys are full keys
    (prefix included); see :class:`lpmos.store.keys.Keys`."""

    timeout: float

    def get(self, key: str) -> KeyValue | None:
        """The key's current value (a linearizable read), or ``None``."""

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        """Keys under ``prefix`` in key order, from ``start`` (inclusive)
        when given, at most ``limit`` (0: all), at ``revision`` (0: now)."""

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        """Unconditional write; returns the new revision.  Use only for keys
        with a single writer (registrations, audit records)."""

    def delete(self, key: str) -> bool:
        """Delete one key; ``True`` if it existed."""

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        """All ``ops`` if every compare holds, else nothing and
        :class:`Conflict`.  Returns the new revision."""

    def revision(self) -> int:
        """The store's current revision."""

    def grant(self, ttl: int) -> int:
        """A new lease of ``ttl`` seconds; returns its id."""

    def keepalive(self, lease_id: int) -> int:
        """Refresh a lease; returns the remaining TTL, 0 if it has expired."""

    def revoke(self, lease_id: int) -> None:
        """End a lease now, deleting its keys."""

    def watch(self, prefix: str, start_revision: int) -> Watch:
        """Watch ``prefix`` from ``start_revision`` (inclusive)."""

    def close(self) -> None:
        """Release connections."""


# --- conveniences on top of the interface -----------------------------------


def create(store: Store, key: str, value: bytes, *, lease: int = 0) -> int:
    """Write ``key`` only if it does not exist; :class:`Conflict` otherwise."""
    return store.commit([Compare(key, 0)], [Put(key, value, lease)])


def cas(store: Store, key: str, value: bytes, mod_revision: int, *, lease: int = 0) -> int:
    """Write ``key`` only if its mod_revision is still ``mod_revision``."""
    return store.commit([Compare(key, mod_revision)], [Put(key, value, lease)])


class Unchanged(Exception):
    """Raised by an :func:`atomic_update` function to write nothing."""


def atomic_update(
    store: Store,
    key: str,
    fn: Callable[[bytes | None], bytes | None],
    *,
    retries: int = 16,
    extra: Callable[[KeyValue | None, bytes | None], Sequence[Op]] | None = None,
) -> tuple[bytes | None, int]:
    """Read ``key``, apply ``fn``, write back only if nobody wrote in between.

    ``fn`` gets the current value (``None`` if absent) and returns the new
    value, or ``None`` to delete the key, or raises :class:`Unchanged` to
    leave it alone (the current value and revision are then returned).  It
    may run several times and must not have side effects.  ``extra(current,
    new)`` may add operations to the same transaction (an index key, the
    audit record of the change): it gets the key as read (``None`` if
    absent) and the value about to be written, runs once per attempt, and
    what it returns is committed with that attempt or not at all.  On a
    lost race it re-reads and retries up to ``retries`` times with a short
    jittered back-off, then raises :class:`Conflict`.

    Returns ``(new value, revision)``.
    """
    last_revision = 0
    for attempt in range(retries + 1):
        current = store.get(key)
        old = current.value if current else None
        revision = current.mod_revision if current else 0
        last_revision = revision
        try:
            new = fn(old)
        except Unchanged:
            return old, revision
        ops: list[Op] = [Put(key, new) if new is not None else Delete(key)]
        if extra is not None:
            ops.extend(extra(current, new))
        try:
            return new, store.commit([Compare(key, revision)], ops)
        except Conflict as exc:
            last_revision = exc.revision
            if attempt < retries:
                time.sleep(random.uniform(0, min(0.05, 0.002 * 2**attempt)))
    raise Conflict(key, last_revision, f"{key}: gave up after {retries + 1} conflicting updates")


def range_all(store: Store, prefix: str, *, page_size: int = 1000) -> Page:
    """Every key under ``prefix``, read in pages at one revision."""
    items: list[KeyValue] = []
    page = store.range(prefix, limit=page_size)
    revision = page.revision
    items.extend(page.items)
    while page.more and page.items:
        start = page.items[-1].key + "\x00"
        page = store.range(prefix, start=start, limit=page_size, revision=revision)
        items.extend(page.items)
    return Page(items, revision, False)
