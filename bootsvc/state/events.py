"""Progress events → task documents, coalesced per task, spooled when etcd is down.

Contract (agent_api.md §4, RELIABILITY L1/L2):

* :meth:`EventPipeline.submit` returns only once the events are durable —
  applied to the task in etcd through :meth:`lpmos.tasks.TaskService.apply_events`
  (one CAS, duplicates skipped by event id), or appended and fsynced to the
  node's spool file when etcd is unavailable.  Only then are they acked; a
  request that times out acks nothing (the agent resends; duplicates are
  harmless).
* Writes are coalesced per task: requests that arrive while a task's batch
  is waiting join it, and one batch is written at most every ``interval``
  seconds per task (so a storm of progress events becomes ~1/interval etcd
  writes per second per task).  A batch holding a ``state`` event is
  written at once.  Nothing is dropped by coalescing: every event of the
  batch goes to ``apply_events``, which keeps the last progress values and
  every state transition, log line and event id.
* The spool (``STATE_DIR/spool/<node>/events.jsonl``) is replayed in order
  by a background thread once etcd answers again.  While a task has spooled
  events, its new events are spooled behind them, so per-source order is
  kept (a later seq applied first would make the earlier ones "late").
* Once etcd stored a chunk of events (directly or from the spool), their
  log lines go to the node's full install log of the task's attempt
  (:class:`bootsvc.state.install_log.InstallLogs`, which skips events it already
  wrote), since the task document keeps only the newest lines.
* There is no request thread pool of its own: the first waiting request of
  a task does the write for everyone in the batch (leader/follower), so the
  number of concurrent etcd writes is bounded by the HTTP worker threads.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bootsvc.state.install_log import InstallLogs
from lpmos.metrics import Registry
from lpmos.models import ProgressEvent, ValidationError
from lpmos.store import Conflict, StoreError
from lpmos.tasks import TaskNotFound, TaskService

log = logging.getLogger(__name__)

MAX_EVENTS_PER_WRITE = 500
SPOOL_MAX_BYTES = 256 * 1024 * 1024


class EventsRefused(Exception):
    """The events could not be stored; ``status_code`` for the HTTP answer."""

    def __init__(self, message: str, status_code: int, error: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.error = error


@dataclass(frozen=True)
class Submitted:
    acked: list[str]
    task_status: str | None
    spooled: bool = False


@dataclass
class _Ticket:
    events: list[ProgressEvent]
    urgent: bool
    done: bool = False
    status: str | None = None
    spooled: bool = False
    error: EventsRefused | None = None


@dataclass
class _TaskQueue:
    cond: threading.Condition = field(default_factory=threading.Condition)
    pending: list[_Ticket] = field(default_factory=list)
    flushing: bool = False
    next_at: float = 0.0
    last_used: float = 0.0


class EventPipeline:
    def __init__(self, tasks: TaskService, idc: str, metrics: Registry, spool_dir: Path, *,
                 interval: float = 0.5, timeout: float = 10.0, by: str = "",
                 logs: InstallLogs | None = None) -> None:
        self.tasks = tasks
        self.logs = logs
        self.idc = idc
        self.metrics = metrics
        self.interval = interval
        self.timeout = timeout
        self.by = by
        self.spool_dir = Path(spool_dir)
        self.spool_path = self.spool_dir / "events.jsonl"
        self._queues: dict[str, _TaskQueue] = {}
        self._queues_lock = threading.Lock()
        self._spool_lock = threading.Lock()
        self._spooled: set[str] = set()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        for record in self._read_spool()[0]:
            self._spooled.add(record["sn"])
        metrics.gauge("http_events_spooled_tasks", lambda: float(len(self._spooled)),
                      "tasks with progress events waiting in the on-disk spool")
        for name, text in (
                ("http_events_batches_total", "batches of progress events written to etcd"),
                ("http_events_received_total", "progress events received from agents and "
                 "installers"),
                ("http_events_applied_total", "progress events stored in their task (not "
                 "duplicates)"),
                ("http_events_etcd_writes_total", "etcd writes of progress events"),
                ("http_events_refused_total", "progress events refused, by reason"),
                ("http_events_spooled_total", "progress events spooled to disk while etcd "
                 "could not take them"),
                ("http_events_replayed_total", "spooled progress events replayed into etcd"),
                ("http_events_spool_bad_lines_total", "unreadable lines skipped in the "
                 "event spool")):
            metrics.describe(name, text)

    # -- submitting ------------------------------------------------------------------

    def submit(self, sn: str, events: list[ProgressEvent], *, urgent: bool = False) -> Submitted:
        """Store ``events`` of task ``sn`` durably (see the module docstring)."""
        if not events:
            return Submitted([], None)
        ticket = _Ticket(list(events), urgent or any(e.kind == "state" for e in events))
        q = self._queue(sn)
        deadline = time.monotonic() + self.timeout
        with q.cond:
            q.pending.append(ticket)
            q.cond.notify_all()
        while True:
            with q.cond:
                batch: list[_Ticket] = []
                while not ticket.done:
                    current = time.monotonic()
                    if current >= deadline:
                        self.metrics.inc("http_events_refused_total", reason="timeout")
                        raise EventsRefused("events not stored in time; resend them", 503,
                                            "timeout")
                    if not q.flushing and q.pending and (
                            current >= q.next_at or any(t.urgent for t in q.pending)):
                        batch, q.pending = q.pending, []
                        q.flushing = True
                        break
                    wait = deadline - current
                    if not q.flushing and q.pending:
                        wait = min(wait, max(0.0, q.next_at - current))
                    q.cond.wait(max(0.001, wait))
                if ticket.done:
                    break
            try:
                self._flush(sn, batch)
            finally:
                with q.cond:
                    q.flushing = False
                    q.next_at = time.monotonic() + self.interval
                    q.cond.notify_all()
        if ticket.error is not None:
            raise ticket.error
        return Submitted([e.event_id for e in ticket.events], ticket.status, ticket.spooled)

    def _queue(self, sn: str) -> _TaskQueue:
        with self._queues_lock:
            q = self._queues.get(sn)
            if q is None:
                if len(self._queues) > 10000:
                    self._prune()
                q = self._queues[sn] = _TaskQueue()
            q.last_used = time.monotonic()
            return q

    def _prune(self) -> None:
        cutoff = time.monotonic() - 60
        for sn, q in list(self._queues.items()):
            if q.last_used < cutoff and not q.pending and not q.flushing:
                del self._queues[sn]

    def _flush(self, sn: str, batch: list[_Ticket]) -> None:
        events = [e for t in batch for e in t.events]
        self.metrics.inc("http_events_batches_total")
        self.metrics.inc("http_events_received_total", len(events))
        status: str | None = None
        error: EventsRefused | None = None
        spooled = False
        if sn in self._spooled:
            spooled = self._spool(sn, events)
        else:
            try:
                status = self._apply(sn, events)
            except TaskNotFound:
                self.metrics.inc("http_events_refused_total", reason="no_task")
                error = EventsRefused(f"no task for {self.idc}/{sn}", 404, "no_task")
            except Conflict:
                self.metrics.inc("http_events_refused_total", reason="conflict")
                error = EventsRefused("the task kept changing; resend", 503, "conflict")
            except StoreError as exc:
                log.warning("etcd unavailable for events of %s (%s); spooling", sn, exc)
                spooled = self._spool(sn, events)
        if spooled is False and status is None and error is None:
            error = EventsRefused("events could not be stored (spool full or unwritable)", 503,
                                  "spool")
        for t in batch:
            t.status, t.spooled, t.error, t.done = status, spooled, error, True

    def _apply(self, sn: str, events: list[ProgressEvent]) -> str:
        status = ""
        for i in range(0, len(events), MAX_EVENTS_PER_WRITE):
            chunk = events[i:i + MAX_EVENTS_PER_WRITE]
            stored, applied = self.tasks.apply_events(self.idc, sn, chunk, by=self.by)
            self.metrics.inc("http_events_applied_total", len(applied))
            self.metrics.inc("http_events_etcd_writes_total")
            status = stored.task.status
            if self.logs is not None:
                self.logs.append(sn, stored.task.attempt, chunk)
        return status

    # -- the spool -----------------------------------------------------------------------

    def _spool(self, sn: str, events: list[ProgressEvent]) -> bool:
        line = json.dumps({"sn": sn, "at": time.time(),
                           "events": [e.to_dict() for e in events]},
                          separators=(",", ":")).encode() + b"\n"
        with self._spool_lock:
            try:
                size = self.spool_path.stat().st_size if self.spool_path.exists() else 0
                if size + len(line) > SPOOL_MAX_BYTES:
                    self.metrics.inc("http_events_refused_total", reason="spool_full")
                    return False
                fd = os.open(self.spool_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError as exc:
                log.error("cannot write the event spool %s: %s", self.spool_path, exc)
                self.metrics.inc("http_events_refused_total", reason="spool_error")
                return False
            self._spooled.add(sn)
        self.metrics.inc("http_events_spooled_total", len(events))
        self._wake.set()
        return True

    def _read_spool(self) -> tuple[list[dict[str, Any]], int]:
        """Spooled records in order, and the byte offset read up to."""
        try:
            data = self.spool_path.read_bytes()
        except FileNotFoundError:
            return [], 0
        records = []
        end = data.rfind(b"\n") + 1     # a torn last line (crash mid-write) is ignored
        for raw in data[:end].splitlines():
            try:
                record = json.loads(raw)
                if isinstance(record, dict) and isinstance(record.get("sn"), str):
                    records.append(record)
            except ValueError:
                self.metrics.inc("http_events_spool_bad_lines_total")
        return records, end

    def spooled_tasks(self) -> set[str]:
        with self._spool_lock:
            return set(self._spooled)

    def replay(self) -> int:
        """Apply spooled events in order; returns how many records remain.

        Holds each task's flushing turn while replaying it, so no new batch
        of that task overtakes its spooled events.
        """
        with self._spool_lock:
            records, offset = self._read_spool()
        if not records:
            return 0
        remaining: list[dict[str, Any]] = []
        blocked = False
        for record in records:
            sn = record["sn"]
            if blocked or any(r["sn"] == sn for r in remaining):
                remaining.append(record)
                continue
            try:
                events = [ProgressEvent.from_dict(e) for e in record.get("events", [])]
            except ValidationError:
                self.metrics.inc("http_events_spool_bad_lines_total")
                continue
            q = self._queue(sn)
            with q.cond:
                while q.flushing:
                    q.cond.wait(0.1)
                q.flushing = True
            try:
                self._apply(sn, events)
                self.metrics.inc("http_events_replayed_total", len(events))
            except TaskNotFound:
                self.metrics.inc("http_events_refused_total", len(events),
                                 reason="replay_no_task")
            except (StoreError, Conflict):
                blocked = True
                remaining.append(record)
            finally:
                with q.cond:
                    q.flushing = False
                    q.cond.notify_all()
        with self._spool_lock:
            try:
                tail = self.spool_path.read_bytes()[offset:]
            except FileNotFoundError:
                tail = b""
            body = b"".join(json.dumps(r, separators=(",", ":")).encode() + b"\n"
                            for r in remaining) + tail
            tmp = self.spool_path.with_suffix(".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.spool_path)
            left = {r["sn"] for r in remaining}
            for raw in tail.splitlines():
                try:
                    left.add(json.loads(raw)["sn"])
                except (ValueError, KeyError, TypeError):
                    continue
            self._spooled = left
        return len(remaining) + (1 if tail else 0)

    # -- the replay thread ---------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="event-replay", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            self._wake.wait(backoff)
            self._wake.clear()
            if self._stop.is_set():
                return
            if not self._spooled:
                backoff = 1.0
                continue
            try:
                left = self.replay()
            except Exception:
                log.exception("event spool replay failed")
                left = 1
            backoff = min(10.0, backoff * 2) if left else 1.0
