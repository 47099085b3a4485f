"""Fail installs whose machine went quiet (design brief: "an installing task
whose agent lease expires and stays gone past a timeout fails with the reason
recorded"), and approved tasks that no boot node ever claimed.

:func:`decide_expiry` is pure: from a task, whether its agent's liveness lease
is present, when it disappeared, the time, the timeouts and (for an approved
task) why this node would not install it, it says why the task must fail, or
``None``.  Ages are measured on server clocks only: the approval time the
control plane stamped on the task (``approved_at``, else the task's history)
and the node's own clock, never a machine's.  :class:`Reaper` runs it over
the node's IDC cache every few seconds and applies the verdict with a CAS on
the revision it judged, so a task that moved meanwhile (the agent came back, an operator
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
from typing import Protocol

from bootsvc.context import NodeContext
from bootsvc.policy.machine import MachineView
from bootsvc.policy.reaping import Timeouts, decide_expiry, why_unservable
from lpmos.catalog import Image
from lpmos.models import Task
from lpmos.states import IllegalTransition, TaskStatus
from lpmos.store import Conflict, KeyValue, StoreError
from lpmos.tasks import TaskNotFound, TaskService

log = logging.getLogger(__name__)

class InstallImages(Protocol):
    """What the node's boot HTTP knows of its catalog
    (:class:`bootsvc.http.backend.BootBackend` is one)."""

    def image_for(self, view: MachineView | None) -> Image | None: ...

    def image_wait(self, view: MachineView | None) -> str: ...

    @property
    def live(self) -> Image | None: ...


class Reaper:
    """Runs :func:`decide_expiry` over the node's IDC cache.  ``images``
    (the node's boot HTTP) lets the reason of an approved task that was
    never claimed say why this node would not serve it; without it (a node
    running no boot HTTP) the reason cannot tell."""

    def __init__(self, ctx: NodeContext, timeouts: Timeouts, *, interval: float = 10.0,
                 max_staleness: float = 5.0, images: InstallImages | None = None) -> None:
        self.ctx = ctx
        self.timeouts = timeouts
        self.images = images
        self.interval = interval
        self.max_staleness = max_staleness
        self.tasks = TaskService(ctx.store, ctx.keys)
        self._gone: dict[str, float] = {}       # sn -> wall time its lease was seen deleted
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        ctx.cache.add_listener(self._on_change)
        ctx.metrics.describe("tasks_expired_total",
                             "tasks failed because their agent stayed gone, by reason")

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
                                   now=now, timeouts=self.timeouts,
                                   unservable=self._unservable(task, revision))
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

    def _unservable(self, task: Task, revision: int) -> str:
        if self.images is None or task.status != TaskStatus.APPROVED.value:
            return ""
        view = MachineView(task.sn, task, revision, self.ctx.machines.view(task.sn).server)
        image = self.images.image_for(view)
        return why_unservable(view, node=self.ctx.node_name, image=image,
                              live_available=self.images.live is not None, now=time.time(),
                              image_wait=self.images.image_wait(view) if image is None else "")

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
