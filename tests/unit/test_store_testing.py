"""The store fakes: each is a :class:`Store` (the annotated assignments are
checked by mypy), the broken one fails every request at once, the counting
one passes every call through and records it."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from lpmos.store import Compare, Put, Store, StoreUnavailable
from lpmos.store.memory import MemoryStore
from lpmos.store.testing import BrokenStore, CountingStore

REQUESTS: list[tuple[str, Callable[[Store], object]]] = [
    ("get", lambda s: s.get("/k")),
    ("range", lambda s: s.range("/", limit=1)),
    ("put", lambda s: s.put("/k", b"v")),
    ("delete", lambda s: s.delete("/k")),
    ("commit", lambda s: s.commit([Compare("/k", 0)], [Put("/k", b"v")])),
    ("revision", lambda s: s.revision()),
    ("grant", lambda s: s.grant(5)),
    ("keepalive", lambda s: s.keepalive(1)),
    ("revoke", lambda s: s.revoke(1)),
    ("watch", lambda s: s.watch("/", 1)),
]


def test_every_fake_is_a_store() -> None:
    stores: list[Store] = [MemoryStore(), BrokenStore(), CountingStore(MemoryStore())]
    assert [s.timeout > 0 for s in stores] == [True, True, True]


@pytest.mark.parametrize(("method", "call"), REQUESTS, ids=[m for m, _ in REQUESTS])
def test_broken_store_fails_every_request_at_once(method: str,
                                                  call: Callable[[Store], object]) -> None:
    store: Store = BrokenStore()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        call(store)
    assert time.monotonic() - started < 0.05
    store.close()


def test_counting_store_records_every_call_and_passes_it_through() -> None:
    inner = MemoryStore()
    counting = CountingStore(inner)
    store: Store = counting
    lease = store.grant(5)
    store.put("/a", b"1", lease=lease)
    rev = store.commit([Compare("/b", 0)], [Put("/b", b"2")])
    kv = store.get("/a")
    assert kv is not None and kv.value == b"1"
    assert [kv.key for kv in store.range("/", limit=1).items] == ["/a"]
    assert store.revision() == rev == inner.revision()
    assert store.keepalive(lease) == 5
    store.watch("/", rev).close()
    store.revoke(lease)
    assert store.delete("/b") is True
    store.close()
    assert counting.calls == ["grant", "put", "commit", "get", "range", "revision",
                              "keepalive", "watch", "revoke", "delete", "close"]
    assert counting.calls.count("put") == 1
    assert inner.get("/a") is None       # the lease's key went with it


def test_counting_store_counts_only_what_counted_selects() -> None:
    store = CountingStore(MemoryStore(),
                          counted=lambda: threading.current_thread().name == "worker")
    store.put("/a", b"1")
    worker = threading.Thread(target=lambda: store.get("/a"), name="worker")
    worker.start()
    worker.join()
    assert store.calls == ["get"]
    store.calls.clear()
    assert store.get("/a") is not None and store.calls == []
