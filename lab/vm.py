"""One QEMU machine of the lab and what it shows: the boot timeline read
from its serial console (:data:`SERIAL_STAGES`), its console's tail and
QEMU's own view of it over QMP (:func:`qmp_call`).

:class:`lab.runner.Lab` starts the QEMU process and the watcher thread;
a :class:`VM` records the stages, waits for them and describes itself
when one does not arrive.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lab.process import LabError
from lab.process import stop as stop_process

T = TypeVar("T")

#: Boot stages read from a VM's serial console, in the order they happen.
#: Each is searched for only after the previous one matched, so the second
#: PXE boot after the install does not confuse the first; a stage whose line
#: never shows (another firmware's wording) is skipped when a later one does.
SERIAL_STAGES: tuple[tuple[str, str], ...] = (
    ("firmware", r"SeaBIOS|BdsDxe|UEFI|>>Start PXE"),
    ("pxe", r"iPXE \(http://ipxe\.org\)|Start PXE over IPv[46]|Start HTTP Boot over IPv[46]|PXE-"),
    ("ipxe", r"iPXE initialising devices"),
    ("boot-script", r"/boot\.ipxe\.\.\. ok"),
    ("decision", r"^LPMOS \S+: "),
    ("kernel", r"Linux version"),
    ("agent", r"lpmos-live: starting agent"),
    ("registered", r"agent\.runner: registered as "),
    # the installed system: the lab OS says so; a real Debian is its
    # systemd's welcome, then cloud-init's last line
    ("disk-boot", r"lab-os: booted from disk|Welcome to Debian GNU/Linux"),
    ("callback", r"lab-os: callback succeeded|Cloud-init v\. \S+ finished"),
)

#: terminal escapes and carriage returns the firmware and the kernel write
_CONSOLE_NOISE = re.compile(r"\x1b\[[0-9;?=]*[A-Za-z]|\x1bc|\r")

StagePatterns = Sequence[tuple[str, re.Pattern[str]]]


def strip_console(text: str) -> str:
    """``text`` of a serial console without terminal escapes and ``\\r``."""
    return _CONSOLE_NOISE.sub("", text)


def match_stages(line: str, patterns: StagePatterns, index: int) -> tuple[list[str], int]:
    """The stages one console line shows, searching from ``patterns[index]``
    on, and the index to search from next.  The first stage at or after the
    current one that the line matches is taken (a stage the console never
    prints is skipped), then the search goes on after it in the same line."""
    stages: list[str] = []
    while True:
        hit = next((j for j in range(index, len(patterns)) if patterns[j][1].search(line)),
                   None)
        if hit is None:
            return stages, index
        stages.append(patterns[hit][0])
        index = hit + 1


@dataclass
class StageEvent:
    """One entry of a VM's timeline: the stage, when (seconds since the VM
    started) and the line that showed it."""

    stage: str
    at: float            # seconds since the VM started
    line: str


@dataclass
class VM:
    """One QEMU machine of the lab; see :meth:`lab.runner.Lab.boot_vm`."""

    name: str
    firmware: str        # "bios" | "uefi"
    mac: str
    serial: str
    uuid: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    #: where in serial.log this timeline starts (see :meth:`next_timeline`)
    console_offset: int = 0
    events: list[StageEvent] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _watcher: threading.Thread | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def serial_log(self) -> Path:
        return self.workdir / "serial.log"

    def mark(self, stage: str, detail: str = "") -> None:
        """Record a stage seen from outside the VM (e.g. through the API)."""
        with self._lock:
            self.events.append(StageEvent(stage, time.monotonic() - self.started, detail))

    def seen(self, stage: str) -> StageEvent | None:
        with self._lock:
            return next((e for e in self.events if e.stage == stage), None)

    def wait_for(self, stage: str, timeout: float) -> StageEvent:
        """Block until ``stage`` is in the timeline; on timeout raise
        :class:`LabError` with the serial console's tail."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            event = self.seen(stage)
            if event is not None:
                return event
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"{self.name}: QEMU exited ({self.proc.returncode}) before "
                               f"stage {stage!r}\n{self.describe()}")
            time.sleep(0.2)
        raise LabError(f"{self.name}: stage {stage!r} did not arrive within {timeout:.0f} s"
                       f"\n{self.describe()}")

    def wait_until(self, what: str, timeout: float, probe: Callable[[], T | None],
                   interval: float = 1.0) -> T:
        """Poll ``probe()`` until it returns something truthy and return it;
        :class:`LabError` with the console when ``timeout`` runs out or
        QEMU exits first (``what`` names the wait in the message)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = probe()
            if value:
                return value
            if self.proc is not None and self.proc.poll() is not None:
                raise LabError(f"{self.name}: QEMU exited before {what}\n{self.describe()}")
            time.sleep(interval)
        raise LabError(f"{self.name}: {what} did not happen within {timeout:.0f} s\n"
                       f"{self.describe()}")

    def next_timeline(self) -> VM:
        """The same machine with a new timeline that reads its console from
        the current end on, for its next boot (a redeploy's stages are those
        of a first install again); this one stops watching.  For machines
        whose console outlives one start (a libvirt domain's serial file)."""
        self.stop_watching()
        try:
            offset = self.serial_log.stat().st_size
        except OSError:
            offset = 0
        follow = VM(self.name, self.firmware, self.mac, self.serial, self.uuid, self.workdir,
                    proc=self.proc, started=time.monotonic(), console_offset=offset)
        follow.watch_console()
        return follow

    def timeline(self) -> str:
        with self._lock:
            events = list(self.events)
        rows = [f"  {e.at:7.1f} s  {e.stage:<16} {e.line[:90]}" for e in events]
        return f"{self.name} ({self.firmware}, {self.serial}, {self.mac}):\n" + "\n".join(rows)

    def console_tail(self, lines: int = 80) -> str:
        try:
            text = self.serial_log.read_bytes().decode(errors="replace")
        except OSError:
            return "(no serial log)"
        text = strip_console(text)
        return "\n".join(text.splitlines()[-lines:])

    @property
    def qmp_socket(self) -> Path:
        return self.workdir / "qmp.sock"

    def qemu_state(self) -> str:
        """What QEMU itself says of the machine: its run state (``running``,
        ``paused`` on an I/O error, ``shutdown``...) and where the CPU is.
        When a console falls silent this tells a firmware loop (running, the
        same RIP region) from a stopped machine."""
        try:
            replies = qmp_call(self.qmp_socket, [
                {"execute": "query-status"},
                {"execute": "human-monitor-command",
                 "arguments": {"command-line": "info registers"}}])
        except (OSError, ValueError) as exc:
            return f"(QMP unavailable: {exc})"
        status = replies[0].get("return", {})
        regs = str(replies[1].get("return", ""))
        words = regs.split()
        ip = next((w for w in words if w.startswith(("RIP=", "EIP=", "PC="))), "IP=?")
        hlt = next((w for w in words if w.startswith("HLT=")), "HLT=?")
        return (f"QEMU: status {status.get('status', '?')}, running {status.get('running')}, "
                f"CPU0 {ip} {hlt}")

    def describe(self) -> str:
        return (f"{self.timeline()}\n{self.qemu_state()}\n"
                f"--- serial console of {self.name} (last lines) ---\n"
                f"{self.console_tail()}\n--- end of {self.name} ---")

    # -- the serial watcher --------------------------------------------------------------

    def watch_console(self) -> None:
        """Start the thread that turns the serial log into the timeline
        (until :meth:`stop`)."""
        self._watcher = threading.Thread(target=self._watch, name=f"serial-{self.name}",
                                         daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Follow serial.log from its start and mark each stage of
        :data:`SERIAL_STAGES` at the first line that shows it."""
        offset = self.console_offset
        buffer = ""
        index = 0
        patterns = [(name, re.compile(rx)) for name, rx in SERIAL_STAGES]
        while not self._stop.is_set():
            try:
                with self.serial_log.open("rb") as fh:
                    fh.seek(offset)
                    chunk = fh.read(1 << 20)
            except OSError:
                chunk = b""
            if chunk:
                offset += len(chunk)
                buffer += chunk.decode(errors="replace")
                lines = buffer.split("\n")
                buffer = lines.pop()[-4096:]
                for raw in lines:
                    line = strip_console(raw).strip()
                    stages, index = match_stages(line, patterns, index)
                    for stage in stages:
                        self.mark(stage, line)
            else:
                time.sleep(0.2)

    def stop_watching(self) -> None:
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5)

    def stop(self) -> None:
        self._stop.set()
        stop_process(self.proc, grace=5.0)
        self.stop_watching()


def qmp_call(path: Path, commands: Sequence[dict[str, Any]], *,
             timeout: float = 5.0) -> list[dict[str, Any]]:
    """Send ``commands`` to a QEMU QMP socket and return one reply each
    (asynchronous events in between are skipped)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        reader = sock.makefile("rb")

        def reply() -> dict[str, Any]:
            while True:
                line = reader.readline()
                if not line:
                    raise OSError("QMP closed the connection")
                msg = json.loads(line)
                if "event" not in msg:
                    return dict(msg)

        reply()                                            # the greeting
        sock.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        out = []
        for command in commands:
            sock.sendall(json.dumps(command).encode() + b"\n")
            out.append(reply())
        return out
