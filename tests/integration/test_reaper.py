"""The reaper on a real etcd: an installing task whose agent lease is gone
past the timeout fails with the reason; one with a live lease does not; a
stale cache decides nothing."""

from __future__ import annotations

import time

from bootsvc.context import NodeContext
from bootsvc.machines import MachineIndex
from bootsvc.reaper import Reaper, Timeouts
from lpmos.config import COMMON, resolve
from lpmos.models import Task
from lpmos.store.cache import WatchCache
from lpmos.tasks import TaskService


def _installing(svc: TaskService, sn: str, mac: str) -> None:
    svc.create(Task(idc="dc1", sn=sn, mac=mac, os_type="lab"), by="t")
    for target in ("approved", "booting", "installing"):
        svc.transition("dc1", sn, target, by="t")


def test_lost_agent_fails_live_agent_does_not(etcd_store, keys) -> None:
    svc = TaskService(etcd_store, keys)
    _installing(svc, "lost", "52:54:00:00:00:01")
    _installing(svc, "alive", "52:54:00:00:00:02")
    lease = etcd_store.grant(60)
    etcd_store.put(keys.lease("dc1", "alive"), b"{}", lease=lease)
    cache = WatchCache(etcd_store, keys.idc("dc1"), progress_interval=0.2).start(wait=5)
    machines = MachineIndex(cache, keys, "dc1")
    ctx = NodeContext(config=resolve(COMMON, {}, {}, None), idc="dc1", node_name="n1",
                      store=etcd_store, keys=keys, cache=cache, machines=machines)
    reaper = Reaper(ctx, Timeouts(agent=1.0, firstboot=60, boot=60), max_staleness=5)
    deadline = time.monotonic() + 10
    while len(machines.tasks()) < 2 or cache.get(keys.lease("dc1", "alive")) is None:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert reaper.scan(now=time.time()) == []          # nobody quiet for long enough yet
    failed = reaper.scan(now=time.time() + 5)
    assert [sn for sn, _ in failed] == ["lost"]
    lost = svc.get("dc1", "lost").task
    assert lost.status == "failed" and "agent lost" in lost.reason
    assert lost.history[-1].by == "node:n1"
    assert svc.get("dc1", "alive").task.status == "installing"
    # a stale cache judges nothing
    cache.stop()
    time.sleep(0.1)
    reaper.max_staleness = 0.01
    etcd_store.revoke(lease)
    assert reaper.scan(now=time.time() + 10_000) == []
    assert svc.get("dc1", "alive").task.status == "installing"
