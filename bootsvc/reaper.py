"""Fail installs whose machine went quiet (design brief: "an installing task
whose agent lease expires and stays gone past a timeout fails with the reason
recorded").

:func:`decide_expiry` is pure: from a task, whether its agent's liveness lease
is present, when it disappeared, the time and the timeouts, it says why the
task must fail, or ``None``.  :class:`Reaper` runs it over the node's IDC
cache every few seconds and applies the verdict with a CAS on the revision it
judged, so a task that moved meanwhile (the agent came back, an operator
cancelled) is left alone, and two nodes of one IDC never fail a task twice.
It judges only while the cache is fresh: a node cut off from etcd sees every
lease as "gone" and must not act on that (leases show liveness; they never
decide safety, and a stale view decides nothing).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from dataclasses import dataclass
from typing import NamedTuple

from bootsvc.context import NodeContext
from lpmos.models import Task
from lpmos.states import IllegalTransition, TaskStatus
from lpmos.store import Conflict, KeyValue, StoreError
from lpmos.tasks import TaskNotFound, TaskService

log = logging.getLogger(__name__)

REBOOTING_STEP = "rebooting"


@dataclass(frozen=True)
class Timeouts:
    agent: float = 300.0       # installing, the agent's lease gone this long
    firstboot: float = 1800.0  # the agent rebooted into the OS; no first-boot call this long
    boot: float = 3600.0       # booting (claimed), nothing heard from the machine this long


def last_activity(task: Task) -> float:
    """Server time of the last thing that moved the task (never agent time)."""
    return max(task.updated_at, task.progress.updated_at, task.started_at)


class Expiry(NamedTuple):
    """Why a task fails: a fixed ``code`` (the metric's label) and the
    ``reason`` recorded on the task for the operator."""

    code: str           # firstboot_timeout | agent_lost | boot_timeout
    reason: str


def decide_expiry(task: Task, *, lease_present: bool, lease_gone_since: float | None,
                  now: float, timeouts: Timeouts) -> Expiry | None:
    """Why ``task`` must fail now, or ``None``."""
    if task.status not in (TaskStatus.BOOTING, TaskStatus.INSTALLING):
        return None
    quiet = now - last_activity(task)
    if task.progress.step == REBOOTING_STEP:
        if quiet > timeouts.firstboot:
            return Expiry("firstboot_timeout",
                          f"the installed OS did not report its first boot within "
                          f"{timeouts.firstboot:.0f} s after the agent rebooted the machine")
        return None
    if lease_present:
        return None
    if task.status == TaskStatus.INSTALLING:
        gone = max(lease_gone_since or 0.0, last_activity(task))
        if now - gone > timeouts.agent:
            return Expiry("agent_lost", f"agent lost: no heartbeat for {now - gone:.0f} s "
                                        f"(timeout {timeouts.agent:.0f} s) while installing")
        return None
    if quiet > timeouts.boot:
        return Expiry("boot_timeout",
                      f"the machine was claimed for install but nothing was heard from it "
                      f"for {quiet:.0f} s (timeout {timeouts.boot:.0f} s)")
    return None


class Reaper:
    def __init__(self, ctx: NodeContext, timeouts: Timeouts, *, interval: float = 10.0,
                 max_staleness: float = 5.0) -> None:
        self.ctx = ctx
        self.timeouts = timeouts
        self.interval = interval
        self.max_staleness = max_staleness
        self.tasks = TaskService(ctx.store, ctx.keys)
        self._gone: dict[str, float] = {}       # sn -> wall time its lease was seen deleted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        ctx.cache.add_listener(self._on_change)

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.ctx.keys.parse(key)
        if parsed is None or parsed.kind != "lease" or parsed.idc != self.ctx.idc:
            return
        with self._lock:
            if new is None:
                self._gone[parsed.name] = time.time()
            else:
                self._gone.pop(parsed.name, None)

    def scan(self, now: float | None = None) -> list[tuple[str, str]]:
        """One pass; returns the ``(sn, reason)`` of tasks failed now."""
        if self.ctx.cache.staleness() > self.max_staleness:
            return []
        now = time.time() if now is None else now
        failed = []
        for task, revision in self.ctx.machines.tasks():
            lease_present = self.ctx.cache.get(self.ctx.keys.lease(task.idc, task.sn)) is not None
            with self._lock:
                gone_since = self._gone.get(task.sn)
            expiry = decide_expiry(task, lease_present=lease_present, lease_gone_since=gone_since,
                                   now=now, timeouts=self.timeouts)
            if expiry is None:
                continue
            reason = expiry.reason
            def note(t: Task, r: str = reason) -> None:
                t.add_log(f"[node] {r}")

            try:
                self.tasks.transition(task.idc, task.sn, TaskStatus.FAILED,
                                      by=f"node:{self.ctx.node_name}", reason=reason,
                                      expect_revision=revision, mutate=note)
            except (Conflict, IllegalTransition, TaskNotFound):
                continue      # it moved since we judged it: judge again next pass
            except StoreError as exc:
                log.warning("reaper: cannot fail %s/%s now (%s)", task.idc, task.sn, exc)
                continue
            log.warning("task %s/%s failed: %s", task.idc, task.sn, reason)
            self.ctx.metrics.inc("tasks_expired_total", reason=expiry.code)
            self.ctx.timeline.record(f"sn:{task.sn}", "expired", {"reason": reason})
            failed.append((task.sn, reason))
        return failed

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reaper", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(random.uniform(self.interval * 0.8, self.interval * 1.2)):
            try:
                self.scan()
            except Exception:   # never let the reaper thread die
                log.exception("reaper pass failed")
