"""The store under faults, on a real etcd: stopped, killed, compacted."""

from __future__ import annotations

import time

import pytest

from lpmos.store import StoreUnavailable
from lpmos.store.cache import WatchCache
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys

pytestmark = pytest.mark.slow


def _wait(pred, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.05)
    return False


def test_stopped_etcd_fails_calls_within_deadline_then_recovers(private_etcd, keys) -> None:
    store = EtcdStore([private_etcd.url], timeout=1.0)
    key = keys.task("dc1", "s")
    store.put(key, b"1")
    private_etcd.stop()
    try:
        for call in (lambda: store.get(key), lambda: store.put(key, b"2"),
                     lambda: store.revision()):
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                call()
            assert time.monotonic() - started < 1.0 + 0.5
    finally:
        private_etcd.cont()
    # works again within seconds, not after the 300 s "failed node" penalty
    assert _wait(lambda: _try(lambda: store.get(key)) is not None, 5.0)
    store.close()


def _try(fn):
    try:
        return fn()
    except StoreUnavailable:
        return None


def test_killed_etcd_unavailable_then_recovers_after_restart(private_etcd, keys) -> None:
    store = EtcdStore([private_etcd.url], timeout=1.0)
    key = keys.task("dc1", "k")
    store.put(key, b"before")
    private_etcd.kill()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable):
        store.get(key)
    assert time.monotonic() - started < 1.5
    private_etcd.start()
    assert _wait(lambda: (_try(lambda: store.get(key)) or None) is not None, 10.0)
    assert store.get(key).value == b"before"
    store.close()


def test_watch_cache_converges_after_kill_and_restart(private_etcd, keys: Keys) -> None:
    store = EtcdStore([private_etcd.url], timeout=1.0)
    writer = EtcdStore([private_etcd.url], timeout=1.0)
    prefix = keys.idc("dc1")
    writer.put(prefix + "servers/a", b"1")
    cache = WatchCache(store, prefix, progress_interval=0.3, backoff_max=0.5).start(wait=5)
    assert cache.loaded and cache.get(prefix + "servers/a").value == b"1"
    private_etcd.kill()
    # the cache notices it is no longer confirmed current
    assert _wait(lambda: cache.staleness() > 1.0, 10)
    private_etcd.start()
    assert _wait(lambda: _try(writer.revision) is not None, 10)
    writer.put(prefix + "servers/b", b"2")
    writer.put(prefix + "servers/a", b"1b")
    writer.delete(prefix + "servers/a")
    assert _wait(lambda: cache.get(prefix + "servers/b") is not None
                 and cache.get(prefix + "servers/a") is None, 15)
    assert cache.staleness() < 5
    cache.stop()
    store.close()
    writer.close()


def test_watch_cache_reloads_after_compaction(private_etcd, keys: Keys) -> None:
    store = EtcdStore([private_etcd.url], timeout=1.0)
    writer = EtcdStore([private_etcd.url], timeout=1.0)
    prefix = keys.idc("dc1")
    writer.put(prefix + "servers/gone", b"1")
    cache = WatchCache(store, prefix, progress_interval=0.3, backoff_max=0.5)
    resets = []
    cache.add_listener(lambda *a: None, on_reset=lambda: resets.append(1))
    cache.load()                       # loaded at revision R, not yet following
    assert cache.get(prefix + "servers/gone") is not None
    writer.delete(prefix + "servers/gone")
    for i in range(5):
        writer.put(prefix + f"servers/new{i}", b"x")
    writer.compact(writer.revision())  # history after R is gone
    cache.start()                      # resumes from R + 1: compacted → reload
    assert _wait(lambda: cache.get(prefix + "servers/gone") is None
                 and cache.get(prefix + "servers/new4") is not None, 20)
    assert cache.reloads == 1 and len(resets) == 2
    cache.stop()
    store.close()
    writer.close()


def test_reads_fail_over_to_the_next_endpoint(tmp_path, keys: Keys) -> None:
    """A dead first endpoint does not stop reads: they move to the next one
    within the same deadline, and later calls stay on the live endpoint."""
    from tests.conftest import _new_server

    live = _new_server(tmp_path / "live")
    try:
        # port 9 on loopback: nothing listens, connections are refused
        store = EtcdStore(["http://127.0.0.1:9", live.url], timeout=2.0)
        store._current = 0
        started = time.monotonic()
        assert store.revision() > 0
        assert time.monotonic() - started < 2.5
        key = keys.task("dc1", "f")
        store.put(key, b"x")
        assert store.get(key).value == b"x"
        store.close()
    finally:
        live.shutdown()
