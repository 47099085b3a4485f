"""The store contract, run against the real etcd and the in-memory double."""

from __future__ import annotations

import json
import threading
import time

import pytest

from lpmos.store import (
    Compare,
    Conflict,
    Delete,
    Put,
    Unchanged,
    atomic_update,
    cas,
    create,
    range_all,
)
from lpmos.store.keys import Keys


def test_put_get_delete_roundtrip(any_store, keys: Keys) -> None:
    key = keys.task("dc1", "sn-1")
    assert any_store.get(key) is None
    rev = any_store.put(key, b"v1")
    kv = any_store.get(key)
    assert kv is not None and kv.value == b"v1" and kv.mod_revision == rev
    assert any_store.delete(key) is True
    assert any_store.get(key) is None
    assert any_store.delete(key) is False


def test_create_refuses_existing_key(any_store, keys: Keys) -> None:
    key = keys.server("dc1", "sn-1")
    rev = create(any_store, key, b"a")
    with pytest.raises(Conflict) as err:
        create(any_store, key, b"b")
    assert err.value.revision == rev
    assert any_store.get(key).value == b"a"


def test_cas_wins_once_then_reports_current_revision(any_store, keys: Keys) -> None:
    key = keys.task("dc1", "sn-2")
    rev = any_store.put(key, b"0")
    rev2 = cas(any_store, key, b"1", rev)
    with pytest.raises(Conflict) as err:
        cas(any_store, key, b"2", rev)
    assert err.value.revision == rev2
    assert any_store.get(key).value == b"1"


def test_commit_is_all_or_nothing(any_store, keys: Keys) -> None:
    a, b = keys.server("dc1", "a"), keys.mac("dc1", "00:00:00:00:00:01")
    any_store.put(b, b"old")
    with pytest.raises(Conflict):
        any_store.commit([Compare(a, 0), Compare(b, 0)], [Put(a, b"x"), Put(b, b"y")])
    assert any_store.get(a) is None
    assert any_store.get(b).value == b"old"
    rev_b = any_store.get(b).mod_revision
    any_store.commit([Compare(a, 0), Compare(b, rev_b)], [Put(a, b"x"), Delete(b)])
    assert any_store.get(a).value == b"x" and any_store.get(b) is None


def test_range_pages_in_key_order(any_store, keys: Keys) -> None:
    prefix = keys.servers("dc1")
    for i in range(25):
        any_store.put(f"{prefix}sn-{i:03d}", str(i).encode())
    any_store.put(keys.servers("dc2") + "other", b"x")
    page = any_store.range(prefix, limit=10)
    assert [kv.key for kv in page.items] == [f"{prefix}sn-{i:03d}" for i in range(10)]
    assert page.more
    everything = range_all(any_store, prefix, page_size=7)
    assert len(everything.items) == 25
    assert [kv.value for kv in everything.items] == [str(i).encode() for i in range(25)]


def test_atomic_update_twenty_concurrent_writers_lose_nothing(any_store, keys: Keys) -> None:
    key = keys.task("dc1", "counter")
    any_store.put(key, b"0")
    per_writer, writers = 10, 20
    errors: list[BaseException] = []

    def bump(raw: bytes | None) -> bytes:
        return str(int(raw or b"0") + 1).encode()

    def worker() -> None:
        try:
            for _ in range(per_writer):
                atomic_update(any_store, key, bump, retries=200)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert int(any_store.get(key).value) == per_writer * writers


def test_atomic_update_unchanged_writes_nothing(any_store, keys: Keys) -> None:
    key = keys.task("dc1", "same")
    rev = any_store.put(key, b"x")

    def keep(raw: bytes | None) -> bytes:
        raise Unchanged

    value, revision = atomic_update(any_store, key, keep)
    assert value == b"x" and revision == rev
    assert any_store.get(key).mod_revision == rev


def test_atomic_update_gives_up_with_conflict(any_store, keys: Keys) -> None:
    key = keys.task("dc1", "hot")
    any_store.put(key, b"0")

    def meddle(raw: bytes | None) -> bytes:
        any_store.put(key, b"someone else")   # every attempt loses its race
        return b"mine"

    with pytest.raises(Conflict):
        atomic_update(any_store, key, meddle, retries=3)


def test_lease_key_vanishes_after_ttl_without_keepalive(any_store, keys: Keys) -> None:
    key = keys.lease("dc1", "sn-lease")
    lease = any_store.grant(2)
    any_store.put(key, b"alive", lease=lease)
    # keepalive holds it past its TTL
    for _ in range(3):
        time.sleep(1.0)
        assert any_store.keepalive(lease) > 0
    assert any_store.get(key) is not None
    # then it expires (etcd may take up to TTL + its expiry loop)
    deadline = time.monotonic() + 8
    while any_store.get(key) is not None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any_store.get(key) is None
    assert any_store.keepalive(lease) == 0


def test_revoke_deletes_leased_keys(any_store, keys: Keys) -> None:
    key = keys.node("dc1", "node-a")
    lease = any_store.grant(30)
    any_store.put(key, json.dumps({"addr": "x"}).encode(), lease=lease)
    any_store.revoke(lease)
    assert any_store.get(key) is None


def test_watch_yields_events_from_revision(any_store, keys: Keys) -> None:
    prefix = keys.idc("dc1")
    start = any_store.put(prefix + "servers/a", b"1")
    any_store.put(prefix + "servers/b", b"2")
    any_store.delete(prefix + "servers/a")
    any_store.put(keys.idc("dc2") + "servers/z", b"other idc")
    watch = any_store.watch(prefix, start)
    seen = []
    done = threading.Event()

    def consume() -> None:
        for events, _rev in watch:
            seen.extend((e.type, e.key.rsplit("/", 1)[1], e.value) for e in events)
            if len(seen) >= 3:
                done.set()
                return

    t = threading.Thread(target=consume, daemon=True)
    t.start()
    assert done.wait(10)
    watch.close()
    assert seen == [("put", "a", b"1"), ("put", "b", b"2"), ("delete", "a", b"")]
