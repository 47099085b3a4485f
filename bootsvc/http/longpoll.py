"""Agent task long polls: ``GET /agent/v1/task?revision=R&wait=S`` waits
until the machine's task changes from revision ``R``, at most ``S`` seconds.

Each poll holds one of the app's worker threads, so their number is bounded
(``http.long_polls``); past it a poll is answered at once and the agent
asks again.  A poll wakes on the IDC cache's change of that task (no
polling of etcd) and, as a safety net, checks the cache once a second.
"""

from __future__ import annotations

import threading
import time

from bootsvc.context import NodeContext
from lpmos.store import KeyValue


class TaskChangeWaits:
    """The long polls waiting on one node: registered with the IDC cache,
    woken by a change of their machine's task."""

    def __init__(self, ctx: NodeContext, limit: int) -> None:
        self.ctx = ctx
        self._slots = threading.BoundedSemaphore(max(1, limit))
        self._enabled = limit > 0
        self._waiters: dict[str, list[threading.Event]] = {}
        self._lock = threading.Lock()
        #: polls parked in :meth:`wait`: they hold a pool thread but need no
        #: GIL, so they do not count as the pool having work
        self.parked = 0
        self._stopping = False
        ctx.cache.add_listener(self._on_change)

    def wait_for_change(self, sn: str, revision: int, timeout: float) -> bool:
        """Wait until ``sn``'s task is no longer at ``revision``, ``timeout``
        passed, or :meth:`release_all`.  False (at once) when every slot is
        taken or long polls are off: the caller answers without waiting."""
        if not self._enabled or not self._slots.acquire(blocking=False):
            return False
        try:
            self._wait(sn, revision, timeout)
        finally:
            self._slots.release()
        return True

    def release_all(self) -> None:
        """Answer every waiting poll now; no new one waits (stopping)."""
        self._stopping = True
        with self._lock:
            waiters = [e for lst in self._waiters.values() for e in lst]
        for event in waiters:
            event.set()

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.ctx.keys.parse(key)
        if parsed is None or parsed.kind != "task" or parsed.idc != self.ctx.idc:
            return
        with self._lock:
            waiters = self._waiters.pop(parsed.name, [])
        for event in waiters:
            event.set()

    def _wait(self, sn: str, revision: int, timeout: float) -> None:
        event = threading.Event()
        with self._lock:
            self._waiters.setdefault(sn, []).append(event)
            self.parked += 1
        try:
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and not self._stopping:
                if self.ctx.machines.view(sn).task_revision != revision:
                    return
                event.wait(min(1.0, max(0.0, deadline - time.monotonic())))
                event.clear()
                with self._lock:
                    lst = self._waiters.setdefault(sn, [])
                    if event not in lst:
                        lst.append(event)
        finally:
            with self._lock:
                self.parked -= 1
                lst = self._waiters.get(sn, [])
                if event in lst:
                    lst.remove(event)
                if not lst:
                    self._waiters.pop(sn, None)
