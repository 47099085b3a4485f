"""etcd's history and space on a real etcd: the embedded etcd's
auto-compaction with LPMOS's defragmentation keeps the database bounded
under a long run of writes while a watch cache follows; a NOSPACE alarm is
seen, and on the embedded etcd cleared once the space is back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from lpmos.metrics import Registry
from lpmos.store import Compacted, NoSpace
from lpmos.store.cache import WatchCache
from lpmos.store.embedded import EtcdOptions, start_etcd
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.store.maintenance import DefragPolicy, EtcdMaintenance
from tests.prometheus_text import value as metric_value

QUOTA = 1 << 20          # 1 MiB: a few hundred small writes fill it


def eventually(fn: Callable[[], Any], timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(0.05)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")


def compacted_below(store: EtcdStore, prefix: str, revision: int) -> bool:
    try:
        store.range(prefix, revision=revision)
    except Compacted:
        return True
    return False


@pytest.fixture
def etcd_with(tmp_path: Path) -> Iterator[Callable[[EtcdOptions], EtcdStore]]:
    """``start(options)``: a private etcd started with those options (as
    the embedded one is), and a store on it."""
    procs: list[Any] = []
    stores: list[EtcdStore] = []

    def start(options: EtcdOptions) -> EtcdStore:
        proc, url = start_etcd(tmp_path / f"etcd{len(procs)}" / "data", options=options)
        procs.append(proc)
        stores.append(EtcdStore([url], timeout=2.0))
        return stores[-1]

    yield start
    for store in stores:
        store.close()
    for proc in procs:
        proc.kill()
        proc.wait(10)


def test_compaction_and_defragmentation_keep_the_db_bounded_while_a_cache_follows(
        etcd_with: Callable[[EtcdOptions], EtcdStore], keys: Keys) -> None:
    # the embedded etcd's flags, with a retention short enough for a test
    store = etcd_with(EtcdOptions("periodic", "1s"))
    prefix = keys.idc("dc1")
    metrics = Registry()
    maintenance = EtcdMaintenance(store, metrics, defragment=True,
                                  policy=DefragPolicy(min_free_bytes=256 * 1024))
    cache = WatchCache(store, prefix, progress_interval=0.3, backoff_max=0.5).start(wait=5)
    assert cache.loaded
    value = b"p" * 8192                      # a task document with its log
    rounds, writes = 2, 300
    sizes = []
    for r in range(rounds):
        for i in range(writes):               # progress writes: overwrites of 10 tasks
            last = store.put(f"{prefix}machines/sn-{i % 10}/task", value + bytes([r, i % 256]))
        # etcd's own compactor (--auto-compaction-*) drops the round's history
        # (the revisions at once, the pages in batches after) ...
        eventually(lambda: compacted_below(store, prefix, last - 1))
        # a node refreshing its registration: bbolt counts the pages the
        # compaction freed as in use until a write commits after it
        eventually(lambda: store.put(f"{prefix}nodes/node-a", b"alive")
                   and store.status().db_size_in_use < 2**20)
        # ... and the maintenance pass gives the freed pages back to the file system
        health = maintenance.check()
        assert health.error == "" and health.status is not None
        sizes.append(health.status.db_size)
    written = rounds * writes * len(value)   # 4.9 MB of history written
    assert maintenance.counts.defragmentations == rounds, sizes
    assert max(sizes) < 2**20 < written / 4, sizes
    assert metric_value(metrics.render(), "lpmos_etcd_alarm", alarm="nospace") == 0
    assert metric_value(metrics.render(), "lpmos_etcd_db_size_bytes") == sizes[-1]
    # the cache followed through compactions and defragmentations without a
    # reload, and still sees later changes
    store.put(f"{prefix}servers/after", b"new")
    store.delete(f"{prefix}machines/sn-3/task")
    eventually(lambda: cache.get(f"{prefix}servers/after") is not None
               and cache.get(f"{prefix}machines/sn-3/task") is None)
    assert {kv.key: kv.value for kv in cache.items()} == \
        {kv.key: kv.value for kv in store.range(prefix).items}
    assert cache.reloads == 0
    cache.stop()


def test_a_full_quota_raises_nospace_and_the_embedded_etcd_recovers(
        etcd_with: Callable[[EtcdOptions], EtcdStore], keys: Keys) -> None:
    store = etcd_with(EtcdOptions("periodic", "1s", quota_backend_bytes=QUOTA))
    key = keys.task("dc1", "full")
    metrics = Registry()
    # a cluster's operator's etcd: watched, never defragmented or disarmed
    watcher = EtcdMaintenance(store, metrics)
    embedded = EtcdMaintenance(store, defragment=True, quota_bytes=QUOTA)
    assert watcher.check().alarms == () and watcher.reasons() == []
    with pytest.raises(NoSpace, match="NOSPACE"):
        for i in range(1000):                # history of one key fills the quota
            store.put(key, b"x" * 10_000 + str(i).encode())
    assert [a.name for a in watcher.check().alarms] == ["NOSPACE"]
    assert "NOSPACE" in watcher.reasons()[0] and "refuses every write" in watcher.reasons()[0]
    assert metric_value(metrics.render(), "lpmos_etcd_alarm", alarm="nospace") == 1
    assert store.get(key) is not None         # reads still work
    watcher.check()
    assert watcher.alarm_raised("NOSPACE") and watcher.counts.defragmentations == 0
    # the history is compacted by etcd; the embedded etcd's maintenance
    # defragments and disarms once the file is back under the quota
    revision = store.revision()
    eventually(lambda: compacted_below(store, key, revision - 1))
    health = embedded.check()
    assert health.alarms == () and embedded.counts.disarmed == 1, health
    assert health.status is not None and health.status.db_size < 0.8 * QUOTA
    assert store.put(key, b"writes work again") > revision
    watcher.check()
    assert watcher.reasons() == []
    assert metric_value(metrics.render(), "lpmos_etcd_alarm", alarm="nospace") == 0
