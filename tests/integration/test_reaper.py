"""The reaper on a real etcd: an installing task whose agent lease is gone
past the timeout fails with the reason; one with a live lease does not; a
stale cache decides nothing; an approved task nobody claims fails after the
boot timeout, with what the node knows about why."""

from __future__ import annotations

import time
from collections.abc import Callable

from bootsvc.context import NodeContext
from bootsvc.policy.machine import MachineView
from bootsvc.policy.reaping import Timeouts
from bootsvc.state.machines import MachineIndex
from bootsvc.state.reaper import Reaper
from lpmos.catalog import Catalog, Image, load_catalog
from lpmos.config import COMMON, resolve
from lpmos.models import ProgressEvent, Task
from lpmos.store.cache import WatchCache
from lpmos.tasks import TaskService
from lpmos.testing import write_catalog


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


class _CatalogImages:
    """What the reaper asks of a node's boot HTTP, from a catalog."""

    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog

    def image_for(self, view: MachineView | None) -> Image | None:
        task = view.task if view is not None else None
        return None if task is None else self.catalog.find(task.os_type, task.os_version,
                                                           task.image)

    @property
    def live(self) -> Image | None:
        return self.catalog.images.get("live")


def _wait(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_approved_task_nobody_claims_fails_after_the_boot_timeout_claimed_one_does_not(
        etcd_store, keys, tmp_path) -> None:
    catalog = load_catalog(write_catalog(tmp_path).path)
    svc = TaskService(etcd_store, keys)
    for sn, mac, os_type in (("unclaimed", "52:54:00:00:01:01", "Lab OS"),
                             ("claimed", "52:54:00:00:01:02", "Lab OS"),
                             ("live-task", "52:54:00:00:01:03", "LPMOS live")):
        svc.create(Task(idc="dc1", sn=sn, mac=mac, os_type=os_type), by="t")
        svc.transition("dc1", sn, "approved", by="boss")
    # claimed in time, as boot HTTP's claim does (a CAS approved -> booting); its
    # agent's lease is alive, so no other timeout applies to it either
    svc.transition("dc1", "claimed", "booting", by="node:n1")
    lease = etcd_store.grant(60)
    etcd_store.put(keys.lease("dc1", "claimed"), b"{}", lease=lease)
    cache = WatchCache(etcd_store, keys.idc("dc1"), progress_interval=0.2).start(wait=5)
    machines = MachineIndex(cache, keys, "dc1")
    ctx = NodeContext(config=resolve(COMMON, {}, {}, None), idc="dc1", node_name="n1",
                      store=etcd_store, keys=keys, cache=cache, machines=machines)
    reaper = Reaper(ctx, Timeouts(agent=60, firstboot=60, boot=1.0), interval=0.1,
                    max_staleness=5, images=_CatalogImages(catalog))
    try:
        _wait(lambda: len(machines.tasks()) == 3
              and cache.get(keys.lease("dc1", "claimed")) is not None)
        approved_at = svc.get("dc1", "unclaimed").task.approved_at
        assert approved_at > 0
        # within the boot timeout of the approval: nothing to do yet
        assert reaper.scan(now=approved_at + 0.5) == []
        reaper.start()
        _wait(lambda: svc.get("dc1", "unclaimed").task.status == "failed"
              and svc.get("dc1", "live-task").task.status == "failed")
    finally:
        reaper.stop()
        cache.stop()
    unclaimed = svc.get("dc1", "unclaimed").task
    assert "never claimed by a boot node (timeout 1 s)" in unclaimed.reason
    assert "is the machine powered on and network-booting?" in unclaimed.reason
    assert unclaimed.history[-1].from_status == "approved"
    assert unclaimed.history[-1].by == "node:n1"
    assert unclaimed.finished_at - unclaimed.approved_at >= 1.0    # not before the timeout
    assert any("never claimed" in line for line in unclaimed.logs)
    # this node can tell why it never served the live image: it says so
    live = svc.get("dc1", "live-task").task
    assert "node n1 would not install it: live is the live agent image" in live.reason
    assert "powered on" not in live.reason
    # claimed in time: still booting, nothing recorded against it
    claimed = svc.get("dc1", "claimed").task
    assert claimed.status == "booting" and claimed.reason == ""
    assert reaper.ctx.metrics.get("tasks_expired_total", reason="never_claimed") == 1
    assert reaper.ctx.metrics.get("tasks_expired_total", reason="unservable") == 1


def test_a_machine_cannot_report_an_approved_task_failed(etcd_store, keys) -> None:
    svc = TaskService(etcd_store, keys)
    svc.create(Task(idc="dc1", sn="m1", mac="52:54:00:00:02:01", os_type="lab"), by="t")
    svc.transition("dc1", "m1", "approved", by="boss")
    stored, applied = svc.apply_events("dc1", "m1", [ProgressEvent(
        source="agent", seq=1, kind="state", status="failed", message="old attempt")])
    assert applied == ["agent:1"]
    assert stored.task.status == "approved" and stored.task.reason == ""
    assert "ignored agent state failed (task is approved)" in stored.task.logs[-1]
