"""The regional node's power worker: it carries out the power requests of
its IDC (``/os/{idc}/machines/{sn}/power/{id}``, :mod:`lpmos.power`).

It learns of requests from the node's IDC watch cache (a listener; no
polling of etcd), and for each one a node of the IDC may take
(:func:`lpmos.power.decide_claim`):

1. reads the request again from etcd and claims it by CAS on that revision:
   of several nodes of the IDC, exactly one wins, the others drop it;
2. reads the BMC record and its password from etcd by key (the password is
   in no cache and in no log line);
3. runs the steps in order on a bounded thread pool (never the event
   loop), each BMC call on a second bounded pool with a hard deadline: a
   BMC that answers slowly or never costs the request its deadline, never
   the node.  A retryable failure (unreachable, timeout, a 5xx) is tried
   again with jittered exponential back-off while the deadline lasts; a
   refusal of the credentials or an unexpected reply is not;
4. marks a step that is not idempotent (reset, cycle) ``running`` in etcd
   before the BMC is told, so a node that reclaims the request after this
   one died fails it instead of cycling the machine twice;
5. writes the result (done or failed with the reason, the power state read
   back, timestamps) by CAS with its audit record in the same transaction,
   and, for a request queued by a task's approval, a line in the task's log.

A claim older than :data:`lpmos.power.CLAIM_TTL` is taken over by another
node (the holder is presumed dead); a request nobody took within
:data:`lpmos.power.QUEUE_TTL` is failed, never carried out late.  Claim
ages are judged on the node's wall clock against the claiming node's:
a skew only delays or hastens a takeover, and the ``running`` mark keeps
a takeover safe whatever the clocks say.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootsvc.context import NodeContext
from bootsvc.power.drivers import Driver, open_driver
from bootsvc.power.errors import BmcError, Where, classify
from lpmos.audit import Auditor
from lpmos.models import ValidationError
from lpmos.power import (
    CLAIM_TTL,
    NOT_IDEMPOTENT,
    QUEUE_TTL,
    BmcRecord,
    BmcSecret,
    PowerRequest,
    Step,
    claim,
    decide_claim,
    finish,
    next_step,
    retry_delay,
)
from lpmos.states import TaskStatus
from lpmos.store import Compare, Conflict, KeyValue, Put, StoreError
from lpmos.tasks import TaskNotFound, TaskService

log = logging.getLogger(__name__)

#: histogram buckets of power_request_seconds (a request is 0.1 s to a minute)
SECONDS_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0)


@dataclass(frozen=True)
class PowerSettings:
    workers: int = 4               # requests carried out at once
    call_timeout: float = 10.0     # one BMC call (connect + answer)
    scan_interval: float = 2.0     # look again at claims and queued requests
    claim_ttl: float = CLAIM_TTL
    queue_ttl: float = QUEUE_TTL
    #: after the steps, how long to wait for the BMC to report the state they
    #: lead to (a BMC applies a power change a few seconds later)
    settle: float = 15.0

    @classmethod
    def from_config(cls, config: Any) -> PowerSettings:
        """From ``lpmos regional``'s config (:mod:`bootsvc.power.settings`)."""
        from bootsvc.power.settings import SETTINGS

        values = {s.key: s.default for s in SETTINGS}
        values.update({k: v for k in values if (v := config.get(k)) is not None})
        return cls(workers=int(values["power.workers"]),
                   call_timeout=float(values["power.call_timeout"]),
                   claim_ttl=float(values["power.claim_ttl"]),
                   queue_ttl=float(values["power.queue_ttl"]))


class PowerWorker:
    def __init__(self, ctx: NodeContext, settings: PowerSettings | None = None, *,
                 drivers: Callable[[BmcRecord, str, float], Driver] = open_driver) -> None:
        self.ctx = ctx
        self.settings = settings or PowerSettings()
        self.open_driver = drivers
        self.tasks = TaskService(ctx.store, ctx.keys)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._open: dict[str, PowerRequest] = {}      # key -> request, not final
        self._busy: set[str] = set()
        self._pool = cf.ThreadPoolExecutor(self.settings.workers, thread_name_prefix="power")
        # the BMC calls themselves: a call past its deadline is abandoned and
        # holds one of these until the library's own timeout frees it
        self._calls = cf.ThreadPoolExecutor(self.settings.workers * 2,
                                            thread_name_prefix="power-bmc")
        self._thread: threading.Thread | None = None
        self._auditor = Auditor(ctx.keys, f"node:{ctx.node_name}", f"regional node "
                                                                  f"{ctx.node_name}")
        m = ctx.metrics
        m.describe("power_requests_total", "power requests this node finished, by action "
                   "and result (done, or the failure kind: auth, unreachable, timeout, "
                   "protocol, unsupported, bmc_error, config, interrupted, expired)")
        m.describe("power_request_seconds", "seconds from this node's claim of a power "
                   "request to its result, by action", kind="histogram")
        m.gauge("power_requests_active", lambda: float(len(self._busy)),
                "power requests this node is carrying out now")
        ctx.busy_checks.append(lambda: bool(self._busy))
        ctx.cache.add_listener(self._on_change, on_reset=self._reload)

    # -- lifecycle
    def start(self) -> None:
        self._reload()
        self._thread = threading.Thread(target=self._run, name="power-control", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._calls.shutdown(wait=False, cancel_futures=True)

    # -- what the cache tells us
    def _mine(self, key: str) -> bool:
        parsed = self.ctx.keys.parse(key)
        return parsed is not None and parsed.kind == "power" and parsed.idc == self.ctx.idc

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        if not self._mine(key):
            return
        self._note(key, new)
        self._wake.set()

    def _note(self, key: str, kv: KeyValue | None) -> None:
        req = None
        if kv is not None:
            try:
                req = PowerRequest.from_json(kv.value)
            except ValidationError as exc:
                log.warning("power: ignoring malformed %s: %s", key, exc)
        with self._lock:
            if req is None or req.final:
                self._open.pop(key, None)
            else:
                self._open[key] = req

    def _reload(self) -> None:
        with self._lock:
            self._open.clear()
        for kv in self.ctx.cache.items(self.ctx.keys.idc(self.ctx.idc)):
            if self._mine(kv.key):
                self._note(kv.key, kv)
        self._wake.set()

    # -- the control thread
    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.settings.scan_interval * random.uniform(0.8, 1.2))
            self._wake.clear()
            try:
                self._pass()
            except Exception:
                log.exception("power: control pass failed")

    def _pass(self) -> None:
        now = time.time()
        with self._lock:
            candidates = [(k, r) for k, r in self._open.items() if k not in self._busy]
            # one request per machine at a time, oldest first: the API refuses a
            # second while one is open, but two callers may race it
            acting = {(r.idc, r.sn) for k, r in self._open.items()
                      if k in self._busy or (r.state == "claimed"
                                             and now < r.claimed_at + self.settings.claim_ttl)}
        for key, req in sorted(candidates, key=lambda kr: kr[1].created_at):
            decision = decide_claim(req, now, claim_ttl=self.settings.claim_ttl,
                                    queue_ttl=self.settings.queue_ttl)
            if decision.what == "claim" and (req.idc, req.sn) in acting:
                continue
            if decision.what == "claim":
                acting.add((req.idc, req.sn))
                with self._lock:
                    if len(self._busy) >= self.settings.workers:
                        return               # the rest wait for a free worker
                    self._busy.add(key)
                self._pool.submit(self._carry_out, key)
            elif decision.what == "fail":
                with self._lock:
                    self._busy.add(key)
                try:
                    self._fail_unclaimed(key, decision.reason)
                finally:
                    with self._lock:
                        self._busy.discard(key)

    # -- claiming and finishing (CAS on etcd's current value)
    def _fresh(self, key: str) -> tuple[PowerRequest, int] | None:
        kv = self.ctx.store.get(key)
        if kv is None:
            return None
        return PowerRequest.from_json(kv.value), kv.mod_revision

    def _fail_unclaimed(self, key: str, reason: str) -> None:
        try:
            fresh = self._fresh(key)
            if fresh is None:
                return
            req, revision = fresh
            decision = decide_claim(req, time.time(), claim_ttl=self.settings.claim_ttl,
                                    queue_ttl=self.settings.queue_ttl)
            if decision.what != "fail":
                return
            kind = "interrupted" if req.state == "claimed" else "expired"
            finish(req, time.time(), error=decision.reason, error_kind=kind)
            self._write_result(key, req, revision)
        except (StoreError, ValidationError) as exc:
            log.warning("power: could not fail %s: %s", key, exc)

    def _claim(self, key: str) -> tuple[PowerRequest, int] | None:
        fresh = self._fresh(key)
        if fresh is None:
            return None
        req, revision = fresh
        if decide_claim(req, time.time(), claim_ttl=self.settings.claim_ttl,
                        queue_ttl=self.settings.queue_ttl).what != "claim":
            return None
        claim(req, self.ctx.node_name, time.time())
        try:
            revision = self.ctx.store.commit([Compare(key, revision)],
                                             [Put(key, req.to_json())])
        except Conflict:
            return None          # another node of the IDC took it
        return req, revision

    def _save(self, key: str, req: PowerRequest, revision: int) -> int:
        """Write our claimed request back (a step marked running); Conflict
        if someone else took it over."""
        return self.ctx.store.commit([Compare(key, revision)], [Put(key, req.to_json())])

    def _write_result(self, key: str, req: PowerRequest, revision: int) -> None:
        audit = self._auditor.op(f"power.{req.state}", f"{req.idc}/{req.sn}",
                                 detail=req.describe()[:500],
                                 after={"id": req.id, "action": req.action, "state": req.state,
                                        "node": req.node, "error": req.error,
                                        "power_state": req.power_state})
        self.ctx.store.commit([Compare(key, revision)], [Put(key, req.to_json()), audit])
        result = "done" if req.state == "done" else (req.error_kind or "failed")
        self.ctx.metrics.inc("power_requests_total", action=req.action, result=result)
        self.ctx.timeline.record(f"sn:{req.sn}", "power", {
            "id": req.id, "action": req.action, "state": req.state, "error": req.error,
            "power_state": req.power_state, "node": req.node})
        if req.task_attempt:
            self._task_log(req)

    def _task_log(self, req: PowerRequest) -> None:
        """The task of the approval that queued ``req`` learns how it went:
        a log line, and on failure its progress message (the task stays
        approved: the machine can still be powered on by hand)."""
        steps = ", ".join(f"{s.name} {s.state}" for s in req.steps)
        if req.state == "done":
            line = (f"power: {steps} by node {req.node} (BMC); power is "
                    f"{req.power_state or 'unknown'}")
        else:
            line = (f"power: {steps}: {req.error}. The machine may not boot by itself: fix "
                    f"the BMC (lpmos server bmc-set) and ask again (lpmos server power "
                    f"{req.idc}/{req.sn} cycle), or power it on by hand")

        def note(task: Any) -> None:
            if task.attempt != req.task_attempt:
                from lpmos.store import Unchanged
                raise Unchanged
            task.add_log(line[:1000])
            if req.state != "done" and task.status == TaskStatus.APPROVED.value:
                task.progress.step = "power"
                task.progress.message = f"power {req.action} failed: {req.error}"[:500]

        try:
            self.tasks.update(req.idc, req.sn, note)
        except (TaskNotFound, StoreError, Conflict) as exc:
            log.warning("power: could not log %s to the task of %s/%s: %s", req.id, req.idc,
                        req.sn, exc)

    # -- carrying one request out
    def _carry_out(self, key: str) -> None:
        started = time.monotonic()
        action = "?"
        try:
            claimed = self._claim(key)
            if claimed is None:
                return
            req, revision = claimed
            action = req.action
            log.info("power: %s %s/%s (%s) claimed", req.action, req.idc, req.sn, req.id)
            self._execute(key, req, revision, started)
        except (StoreError, ValidationError) as exc:
            log.warning("power: %s: %s", key, exc)
        except Exception:
            log.exception("power: %s failed unexpectedly", key)
        finally:
            self.ctx.metrics.observe("power_request_seconds", time.monotonic() - started,
                                     SECONDS_BUCKETS, action=action)
            with self._lock:
                self._busy.discard(key)
            self._wake.set()

    def _execute(self, key: str, req: PowerRequest, revision: int, started: float) -> None:
        end = started + req.deadline
        holder: list[Driver] = []
        try:
            record, password = self._bmc(req)
            where = Where(record.endpoint(), record.driver, record.user,
                          self.settings.call_timeout)

            def connected() -> Driver:
                if not holder:
                    holder.append(self.open_driver(record, password, self._timeout(end)))
                return holder[0]

            while (step := next_step(req)) is not None:
                if step.name in NOT_IDEMPOTENT:
                    step.state, step.at = "running", time.time()
                    revision = self._save(key, req, revision)
                self._with_retries(req, step, where, end, holder, connected)
                step.state, step.at = "done", time.time()
            if holder:
                self._read_back(req, holder[0], where, end)
            finish(req, time.time())
        except BmcError as exc:
            finish(req, time.time(), error=exc.reason, error_kind=exc.kind)
        except Conflict:
            log.warning("power: %s was taken over by another node; leaving it", key)
            return
        finally:
            if holder:
                self._close(holder.pop())
        fresh = self.ctx.store.get(key)
        if fresh is None:
            return
        current = PowerRequest.from_json(fresh.value)
        if current.node != self.ctx.node_name or current.final:
            return
        self._write_result(key, req, fresh.mod_revision)
        log.info("power: %s/%s %s", req.idc, req.sn, req.describe())

    def _close(self, driver: Driver, wait: float = 3.0) -> None:
        """End the driver's session before the next request may open one:
        pyghmi hands a new Command the logged-in session of the same BMC and
        user, so a logout still under way would break the next request."""
        future = self._calls.submit(driver.close)
        try:
            future.result(timeout=wait)
        except Exception as exc:      # a BMC gone silent: its session times out there
            log.info("power: closing a BMC session: %s", type(exc).__name__)

    def _bmc(self, req: PowerRequest) -> tuple[BmcRecord, str]:
        keys, store = self.ctx.keys, self.ctx.store
        kv = store.get(keys.bmc(req.idc, req.sn))
        if kv is None:
            raise BmcError("config", f"{req.idc}/{req.sn} has no BMC record (lpmos server "
                                     "bmc-set)")
        try:
            record = BmcRecord.from_json(kv.value)
        except ValidationError as exc:
            raise BmcError("config", str(exc)) from None
        secret = store.get(keys.bmc_secret(req.idc, req.sn))
        if secret is None:
            raise BmcError("config", f"{req.idc}/{req.sn} has no BMC password stored, or this "
                                     "node may not read it (etcd permissions on "
                                     f"{keys.bmc_secret(req.idc, '')})")
        try:
            return record, BmcSecret.from_json(secret.value).password
        except ValidationError as exc:
            raise BmcError("config", str(exc)) from None

    def _timeout(self, end: float) -> float:
        return max(1.0, min(self.settings.call_timeout, end - time.monotonic()))

    def _call(self, fn: Callable[[], Any], where: Where, end: float) -> Any:
        """``fn()`` on the BMC-call pool, abandoned at the deadline."""
        left = end - time.monotonic()
        if left <= 0:
            raise BmcError("timeout", f"BMC at {where.endpoint}: no time left of the "
                                      "request's deadline")
        future = self._calls.submit(fn)
        try:
            return future.result(timeout=left)
        except cf.TimeoutError:
            raise BmcError("timeout", f"BMC at {where.endpoint} did not answer within the "
                                      f"request's deadline ({left:.0f} s left)") from None
        except Exception as exc:        # everything a driver raises, classified
            raise classify(exc, where) from None

    def _with_retries(self, req: PowerRequest, step: Step, where: Where, end: float,
                      holder: list[Driver], connected: Callable[[], Driver]) -> None:
        attempt = 0
        while True:
            attempt += 1
            req.tries += 1
            try:
                self._call(lambda: _run_step(connected(), step.name, req), where, end)
                return
            except BmcError as exc:
                step.detail = exc.reason[:200]
                delay = retry_delay(attempt, random.random())
                if not exc.retryable or time.monotonic() + delay >= end - 0.5:
                    step.state, step.at = "failed", time.time()
                    raise
                log.info("power: %s %s/%s try %d: %s; again in %.1f s", step.name, req.idc,
                         req.sn, attempt, exc.reason, delay)
                if holder:           # reconnect: the session may be what broke
                    self._close(holder.pop())
                if self._stop.wait(delay):
                    raise BmcError("interrupted", "the node is stopping") from None

    def _read_back(self, req: PowerRequest, driver: Driver, where: Where, end: float) -> None:
        read_back(req, driver, lambda fn: self._call(fn, where, end),
                  until=min(end - 0.5, time.monotonic() + self.settings.settle),
                  stop=self._stop)


def read_back(req: PowerRequest, driver: Driver, call: Callable[[Callable[[], Any]], Any], *,
              until: float, stop: threading.Event) -> None:
    """The power state (and the boot override) as the BMC says once it has
    applied the steps: polled every second until it is the state they lead
    to or the monotonic time ``until`` (a BMC applies a power change a few
    seconds later; the first answer after a cycle is often still "off").  A
    failure here does not fail a request whose steps were done."""
    want = settled_state(req)
    try:
        # the override first: a BMC may consume a one-time override as the
        # machine starts, while the loop below waits for it to be on
        if any(s.name == "pxe-once" for s in req.steps):
            req.boot_override = str(call(driver.boot_override))
        while True:
            req.power_state = str(call(driver.power_state))
            left = until - time.monotonic()
            if want is None or req.power_state == want or left <= 0 or stop.wait(min(1.0, left)):
                break
        if want is not None and req.power_state != want:
            log.info("power: %s/%s still reports power %s, expected %s", req.idc, req.sn,
                     req.power_state, want)
    except BmcError as exc:
        req.power_state = req.power_state or "unknown"
        log.info("power: %s/%s read-back failed: %s", req.idc, req.sn, exc.reason)


def settled_state(req: PowerRequest) -> str | None:
    """The power state the request's last power step leads to (``on`` after
    on, cycle and reset; ``off`` after off), or None when it has none."""
    for step in reversed(req.steps):
        if step.name == "off":
            return "off"
        if step.name in ("on", "cycle", "reset"):
            return "on"
    return None


def _run_step(driver: Driver, name: str, req: PowerRequest) -> None:
    if name == "on":
        driver.power_on()
    elif name == "off":
        driver.power_off()
    elif name == "reset":
        driver.reset()
    elif name == "cycle":
        driver.power_cycle()
    elif name == "pxe-once":
        driver.set_boot_device("pxe", once=True)
    elif name == "status":
        req.power_state = driver.power_state()
    else:
        raise BmcError("config", f"unknown power step {name!r}")
