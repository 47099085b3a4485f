"""The agent's life: register → heartbeat thread → long-poll the task →
install → report → reboot.

Threads (all daemons, all stopped by :attr:`Agent.stop`):

* the main thread registers, long-polls ``/agent/v1/task`` and installs;
* the *sender* sends spooled events in seq order (at most 500 / 1 MiB per
  request) and removes what the node acknowledged; on failure it backs off
  with jitter and resends from the oldest, so order holds across outages;
* the *heartbeat* posts every ``heartbeat_interval`` times 0.8 to 1.2.

Every event goes through the :class:`agent.spool.Spool` first, so an
outage of the node or a restart of the agent loses and doubles nothing.
"""

from __future__ import annotations

import logging
import os
import platform
import random
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent import AGENT_VERSION
from agent.client import (
    Backoff,
    ClientError,
    DeadlineExceeded,
    NodeClient,
    NodeError,
    batch_events,
    is_transient,
    retry,
)
from agent.clock import decide_clock_step, decide_should_set, set_clock
from agent.install import (
    HttpImageSource,
    InstallError,
    InstallSpec,
    decide_target_disk,
    install_image,
    parse_install,
)
from agent.inventory import collect_inventory, read_default_route_iface
from agent.inventory.nics import decide_boot_mac
from agent.spool import Spool
from agent.wipe import WipeError, decide_disks, read_disk_facts, wipe_disk
from lpmos.metrics import Registry
from lpmos.states import REBOOT_STEP

log = logging.getLogger(__name__)

DROP_STATUSES = frozenset({400, 404, 413, 422})   # the node will never take these events
POLL_WAIT = 25.0


def read_boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str:
    """The kernel's random id of this boot ("" when unreadable).  Sent with
    the registration so that a retry after a lost answer can be re-issued a
    token by the node; a new boot has a new id, as it needs a new token."""
    try:
        with open(path, encoding="ascii") as fh:
            return fh.read().strip()[:64]
    except (OSError, UnicodeDecodeError):
        return ""


@dataclass
class AgentOptions:
    server: str
    spool_dir: Path
    no_reboot: bool = False
    target: Path | None = None
    allow_removable: bool = False
    deadline: float = 600.0          # registration deadline, seconds; 0 = forever
    set_clock: str = "auto"
    boot_mac: str | None = None
    live: bool = False
    http_timeout: float = 10.0
    stall_timeout: float = 600.0
    flush_timeout: float = 3600.0
    poll_wait: float = POLL_WAIT
    backoff: Backoff = field(default_factory=lambda: Backoff(base=0.5, cap=30.0))


def _halt(verb: str, sysrq: str) -> None:
    """Sync, then ``systemctl VERB``, else ``VERB``(8), else the sysrq key."""
    os.sync()
    for cmd in (["systemctl", verb], [verb]):
        if shutil.which(cmd[0]):
            try:
                subprocess.run(cmd, timeout=30, check=True)
                return
            except (subprocess.SubprocessError, OSError) as exc:
                log.error("%s failed: %s", " ".join(cmd), exc)
    with open("/proc/sysrq-trigger", "w") as fh:   # last resort
        fh.write(sysrq)


def default_poweroff() -> None:
    """Sync and power the machine off (systemd, else poweroff(8), else sysrq)."""
    _halt("poweroff", "o")


#: seconds a released machine waits for its BMC to power it off before it
#: powers itself off
BMC_OFF_GRACE = 120.0


def default_reboot() -> None:
    """Sync and reboot the machine (systemd, else reboot(8), else sysrq)."""
    _halt("reboot", "b")


class Agent:
    def __init__(self, opts: AgentOptions, *, metrics: Registry | None = None,
                 inventory: Callable[[str | None], dict[str, Any]] | None = None,
                 reboot: Callable[[], None] = default_reboot,
                 poweroff: Callable[[], None] = default_poweroff,
                 wipe: Callable[[Path], str] | None = None) -> None:
        self.opts = opts
        self.metrics = metrics or Registry()
        self.spool = Spool(opts.spool_dir, metrics=self.metrics)
        self.client = NodeClient(opts.server, token=self.spool.load_token(),
                                 timeout=opts.http_timeout)
        self._inventory_fn = inventory or (lambda mac: collect_inventory(boot_mac=mac))
        self.reboot = reboot
        self.poweroff = poweroff
        self.wipe = wipe or (lambda device: wipe_disk(read_disk_facts(device)))
        self.stop = threading.Event()
        self.sn = ""
        self.state = "idle"
        self.heartbeat_interval = 10.0
        self._threads: list[threading.Thread] = []

    # -- registration
    def registration_body(self) -> dict[str, Any]:
        inventory = self._inventory_fn(self.opts.boot_mac)
        nics = inventory.get("nics") or []
        boot_mac = decide_boot_mac(nics, self.opts.boot_mac, read_default_route_iface())
        system = inventory.get("system") or {}
        return {"sn": system.get("serial", ""), "uuid": system.get("uuid", ""),
                "macs": [n["mac"] for n in nics], "boot_mac": boot_mac or "",
                "arch": platform.machine() or "x86_64", "inventory": inventory,
                "agent_version": AGENT_VERSION, "boot_id": read_boot_id()}

    def register(self, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Register (retrying with back-off until the deadline); keeps the
        token (memory and spool dir) and the authoritative SN."""
        body = body or self.registration_body()
        deadline = time.monotonic() + self.opts.deadline if self.opts.deadline else None

        def on_error(exc: BaseException, attempt: int) -> None:
            self.metrics.inc("agent_register_errors_total",
                             reason=getattr(exc, "status", "unreachable"))
            if isinstance(exc, NodeError) and exc.status == 409:
                log.error("registration refused: this machine holds another agent's token "
                          "(%s); reboot the machine to reset it", exc.detail or exc.error)
            else:
                log.warning("registration failed (attempt %d): %s", attempt + 1, exc)

        sent_at = time.monotonic()
        answer = retry(lambda: self.client.register(body), what="register", deadline=deadline,
                       backoff=self.opts.backoff, on_error=on_error)
        rtt = time.monotonic() - sent_at
        token = answer.get("token")
        if isinstance(token, str) and token:
            self.client.token = token
            self.spool.save_token(token)
        self.sn = str(answer.get("sn") or body.get("sn") or "")
        try:
            self.heartbeat_interval = min(max(float(answer.get("heartbeat_interval") or 10), 1.0),
                                          300.0)
        except (TypeError, ValueError):
            self.heartbeat_interval = 10.0
        server_time = answer.get("server_time")
        if isinstance(server_time, int | float) and decide_should_set(self.opts.set_clock,
                                                                     self.opts.live):
            step = decide_clock_step(time.time(), float(server_time), rtt=min(rtt, 5.0))
            if step is not None:
                set_clock(step)
        log.info("registered as %s (idc %s)", self.sn, answer.get("idc"))
        return answer

    # -- threads
    def start_threads(self) -> None:
        for name, target in (("agent-sender", self._sender), ("agent-heartbeat", self._heartbeat)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def shutdown(self, timeout: float = 5.0) -> None:
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout)

    def _sender(self) -> None:
        attempt = 0
        while not self.stop.is_set():
            batch = batch_events(self.spool.pending(500))
            if not batch:
                self.spool.wait_changed(1.0)
                continue
            try:
                answer = self.client.events(self.sn, batch)
            except NodeError as exc:
                if exc.status in DROP_STATUSES:
                    ids = [f"{e['source']}:{e['seq']}" for e in batch]
                    log.error("node refused events %s..%s for good (%s); dropped",
                              ids[0], ids[-1], exc)
                    self.spool.drop(ids, reason=f"http_{exc.status}")
                    continue
                self.metrics.inc("agent_events_errors_total", reason=f"http_{exc.status}")
                self.stop.wait(self.opts.backoff.delay(attempt))
                attempt += 1
                continue
            except ClientError as exc:
                self.metrics.inc("agent_events_errors_total", reason="unreachable")
                log.debug("events not sent: %s", exc)
                self.stop.wait(self.opts.backoff.delay(attempt))
                attempt += 1
                continue
            acked = answer.get("acked")
            n = self.spool.ack([str(x) for x in acked] if isinstance(acked, list) else [])
            self.metrics.inc("agent_events_acked_total", n)
            if n == 0:     # the node stored nothing: do not spin
                self.stop.wait(self.opts.backoff.delay(attempt))
                attempt += 1
            else:
                attempt = 0

    def _heartbeat(self) -> None:
        while not self.stop.wait(self.heartbeat_interval * random.uniform(0.8, 1.2)):
            try:
                self.client.heartbeat(self.sn, self.state)
                self.metrics.inc("agent_heartbeats_total", result="ok")
            except ClientError as exc:
                self.metrics.inc("agent_heartbeats_total", result="error")
                log.warning("heartbeat failed: %s", exc)

    # -- events
    def report(self, fields: dict[str, Any]) -> None:
        self.spool.append(**fields)

    # -- the task loop
    def poll_task(self, revision: int | None) -> dict[str, Any]:
        return retry(lambda: self.client.task(self.sn, wait=self.opts.poll_wait,
                                              revision=revision),
                     what="task", deadline=None, backoff=self.opts.backoff,
                     sleep=self._sleep,
                     transient=lambda exc: is_transient(exc) and not self.stop.is_set(),
                     on_error=lambda exc, n: log.warning("task poll failed: %s", exc))

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)

    def run(self) -> int:
        """Register, then serve tasks until stopped.  Returns an exit code."""
        try:
            self.register()
        except DeadlineExceeded as exc:
            log.error("%s", exc)
            return 1
        except NodeError as exc:
            log.error("registration refused: %s", exc)
            return 2
        self.start_threads()
        try:
            return self._loop()
        finally:
            self.shutdown()

    def _loop(self) -> int:
        revision: int | None = None
        while not self.stop.is_set():
            started = time.monotonic()
            try:
                answer = self.poll_task(revision)
            except NodeError as exc:
                log.error("task poll refused (%s); registering again", exc)
                self.metrics.inc("agent_task_poll_errors_total", reason=f"http_{exc.status}")
                self.stop.wait(self.opts.backoff.delay(3))
                try:
                    self.register()
                except ClientError as again:
                    log.error("registering again failed: %s", again)
                    return 1
                revision = None
                continue
            new_revision = answer.get("revision")
            action = answer.get("action")
            if action == "install":
                code = self.handle_install(answer)
                if code is not None:
                    return code
            elif action == "release":
                return self.handle_release(answer)
            elif self.written_but_not_rebooted(answer):
                # an earlier agent wrote this attempt and died before rebooting; the node
                # no longer says "install" (the rebooting step was stored): finish the job
                log.info("image already written for this task attempt; rebooting")
                return self.finish()
            elif new_revision == revision and time.monotonic() - started < 1.0:
                # the node answered at once with nothing new: do not spin
                self.stop.wait(random.uniform(2.0, 5.0))
            revision = new_revision if isinstance(new_revision, int) else None
        return 0

    def checkpoint_key(self, task: dict[str, Any]) -> str:
        return f"{self.sn}:{task.get('attempt', 0)}:{task.get('started_at', 0)}"

    def handle_install(self, answer: dict[str, Any]) -> int | None:
        """Run the install of ``answer``; an exit code to stop the agent, or
        None to go on polling (after a failure)."""
        task = answer.get("task") or {}
        key = self.checkpoint_key(task)
        state = self.spool.load_state()
        if state.get("failed") == key:
            # this attempt failed already; only a new approval (a new attempt) installs
            # again.  Wait for the node to store the failure, then poll on.
            self.spool.wait_empty(min(self.opts.flush_timeout, 60.0))
            self.stop.wait(random.uniform(2.0, 5.0))
            return None
        if state.get("written") != key:
            try:
                spec = parse_install(answer.get("install"))
            except InstallError as exc:
                self.fail(str(exc))
                self.spool.save_state({"failed": key})
                return None
            if not self.install(spec):
                self.spool.save_state({"failed": key})
                self.spool.wait_empty(min(self.opts.flush_timeout, 60.0))
                return None
            self.spool.save_state({"written": key})
        else:
            log.info("image already written for this task attempt; rebooting")
        return self.finish()

    def handle_release(self, answer: dict[str, Any]) -> int:
        """Wipe every disk (:mod:`agent.wipe`), one log line per disk, report
        ``released`` (or ``failed`` naming the disks not wiped), flush, then
        power off: at once when the node says no BMC will (``power_off:
        agent``), else after :data:`BMC_OFF_GRACE` seconds if the BMC has not
        by then.  A wipe that fails is reported and the machine stays on."""
        spec = answer.get("release")
        if not isinstance(spec, dict):
            spec = {}
        self.state = "releasing"
        self.report({"kind": "progress", "step": "wiping", "percent": 0.0,
                     "message": "release: wiping the disks"})
        skipped: dict[str, str] = {}
        if self.opts.target is not None:
            devices = [self.opts.target]
        else:
            disks = self._inventory_fn(None).get("disks") or []
            names, skipped = decide_disks(disks, allow_removable=bool(
                spec.get("allow_removable")) or self.opts.allow_removable)
            devices = [Path("/dev") / n for n in names]
        for name, why in sorted(skipped.items()):
            self.report({"kind": "log", "step": "wiping", "message": f"/dev/{name}: not "
                         f"wiped: {why}"})
        failures = []
        for i, device in enumerate(devices):
            try:
                line = self.wipe(device)
            except (WipeError, OSError) as exc:
                failures.append(f"{device}: {exc}")
                line = f"{device}: NOT wiped: {exc}"
            self.report({"kind": "progress", "step": "wiping",
                         "percent": 100.0 * (i + 1) / max(1, len(devices)), "message": line})
        if failures or not devices:
            self.fail("release: " + ("; ".join(failures) if failures
                                     else "no disk to wipe was found"))
            self.spool.wait_empty(min(self.opts.flush_timeout, 60.0))
            return 1
        by_bmc = spec.get("power_off") == "bmc"
        self.report({"kind": "state", "status": "released", "step": "released",
                     "message": f"{len(devices)} disk(s) wiped; powering off "
                                + ("through the BMC" if by_bmc else "(the agent)")})
        self.state = "released"
        if not self.spool.wait_empty(self.opts.flush_timeout):
            log.error("events still spooled after %.0f s", self.opts.flush_timeout)
        if self.opts.no_reboot:
            log.info("release done; not powering off (--no-reboot)")
            return 0
        if by_bmc and self.stop.wait(BMC_OFF_GRACE):
            return 0
        self.poweroff()
        return 0

    def written_but_not_rebooted(self, answer: dict[str, Any]) -> bool:
        task = answer.get("task")
        return (isinstance(task, dict) and task.get("status") in ("booting", "installing")
                and self.spool.load_state().get("written") == self.checkpoint_key(task))

    def finish(self) -> int:
        """After a successful write: flush the events, then reboot (or exit)."""
        self.state = "rebooting"
        if not self.spool.wait_empty(self.opts.flush_timeout):
            log.error("events still spooled after %.0f s", self.opts.flush_timeout)
        if self.opts.no_reboot:
            log.info("install done; not rebooting (--no-reboot)")
            return 0
        self.reboot()
        return 0

    def fail(self, reason: str) -> None:
        log.error("install failed: %s", reason)
        self.state = "failed"
        self.report({"kind": "state", "status": "failed", "step": "failed", "message": reason})

    def install(self, spec: InstallSpec) -> bool:
        """Write the image and the seed; True on success (events spooled)."""
        self.state = "installing"
        try:
            target = self.opts.target
            allow_removable = spec.allow_removable or self.opts.allow_removable
            if target is None:
                disks = self._inventory_fn(None).get("disks") or []
                disk = decide_target_disk(disks, spec.hints,
                                          image_size=spec.known_disk_size or spec.size,
                                          allow_removable=allow_removable)
                target = Path("/dev") / str(disk["name"])
            self.report({"kind": "state", "status": "installing", "step": "starting",
                         "message": f"writing image {spec.image} ({spec.format}, {spec.size} "
                                    f"bytes) to {target}"})
            source = HttpImageSource(self.client, spec.image_url,
                                     timeout=max(self.opts.http_timeout, 30.0))
            offset = install_image(source, spec, target, report=self.report,
                                   allow_removable=allow_removable,
                                   stall_timeout=self.opts.stall_timeout)
            os.sync()
            self.report({"kind": "progress", "step": "synced", "percent": 98.0,
                         "message": f"image verified (sha256 {spec.sha256[:12]}...), seed at "
                                    f"byte {offset}, synced"})
            self.report({"kind": "progress", "step": REBOOT_STEP, "percent": 100.0,
                         "message": "rebooting into the installed system"
                         if not self.opts.no_reboot else "done (--no-reboot)"})
            return True
        except InstallError as exc:
            self.fail(str(exc))
            return False
        except Exception as exc:   # an agent bug must still reach the operator
            log.exception("install crashed")
            self.fail(f"agent error: {type(exc).__name__}: {exc}")
            return False

