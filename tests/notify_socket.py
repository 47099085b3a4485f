"""A stand-in for systemd's notification socket: an AF_UNIX datagram socket
that records each message with its sender's PID (SO_PASSCRED, as systemd
reads it to enforce ``NotifyAccess=main``)."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_UCRED = struct.Struct("iII")     # pid, uid, gid


@dataclass
class Message:
    pid: int
    fields: dict[str, str]
    at: float


@dataclass
class NotifySocket:
    path: Path
    sock: socket.socket = field(init=False)
    messages: list[Message] = field(default_factory=list)
    #: the PID of the service whose lifecycle was checked
    exit_pid: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(str(self.path))
        self.path.chmod(0o777)    # a service dropped to another user may send too

    def poll(self, timeout: float) -> Message | None:
        """The next message within ``timeout`` seconds, or ``None``."""
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data, anc, _flags, _addr = self.sock.recvmsg(4096, socket.CMSG_SPACE(_UCRED.size))
        except TimeoutError:
            return None
        pid = 0
        for level, kind, cdata in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = _UCRED.unpack_from(cdata)[0]
        lines = data.decode("utf-8", "replace").split("\n")
        fields = dict(line.split("=", 1) for line in lines if "=" in line)
        message = Message(pid, fields, time.monotonic())
        self.messages.append(message)
        return message

    def wait_for(self, key: str, timeout: float, value: str | None = None) -> Message:
        """The first message (new or already seen) that sets ``key``
        (to ``value`` when given); AssertionError after ``timeout``."""
        for seen in self.messages:
            if key in seen.fields and (value is None or seen.fields[key] == value):
                return seen
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = self.poll(deadline - time.monotonic())
            if got is not None and key in got.fields and \
                    (value is None or got.fields[key] == value):
                return got
        raise AssertionError(f"no {key}= within {timeout} s; got {self.messages}")

    def count(self, key: str) -> int:
        return sum(1 for m in self.messages if key in m.fields)

    def close(self) -> None:
        self.sock.close()


def check_notify_lifecycle(command: Sequence[str], healthz: Callable[[int], tuple[int, Any]],
                           socket_path: Path, log_path: Path, *,
                           env: dict[str, str] | None = None,
                           watchdog_usec: int = 1_000_000,
                           ready_within: float = 60.0) -> NotifySocket:
    """Run ``command`` with $NOTIFY_SOCKET (at ``socket_path``) and
    $WATCHDOG_USEC, and check: READY=1 from the main PID, ``healthz(pid)``
    (HTTP status, JSON body) answering when it comes, WATCHDOG=1
    at the asked pace, STOPPING=1 on SIGTERM, exit 0, and no message from
    any other process."""
    notify = NotifySocket(socket_path)
    run_env = dict(env if env is not None else os.environ)
    run_env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(command), cwd="/", stdout=log, stderr=subprocess.STDOUT,
                                env=run_env)
    try:
        try:
            ready = notify.wait_for("READY", ready_within, "1")
        except AssertionError:
            raise AssertionError(log_path.read_text()[-4000:]) from None
        assert ready.pid == proc.pid
        assert ready.fields.get("STATUS"), ready.fields
        # ready means it answers: no retry loop here
        status, body = healthz(proc.pid)
        assert status in (200, 503) and body["status"] in ("ok", "degraded"), body
        pings_from = time.monotonic()
        while notify.count("WATCHDOG") < 4 and time.monotonic() - pings_from < 10:
            notify.poll(0.5)
        pings = [m for m in notify.messages if "WATCHDOG" in m.fields]
        assert len(pings) >= 4, notify.messages
        # the pace: about every half of WATCHDOG_USEC, never slower than the timeout
        gaps = [b.at - a.at for a, b in itertools.pairwise(pings)]
        assert max(gaps) < watchdog_usec / 1e6, gaps
        proc.send_signal(signal.SIGTERM)
        notify.wait_for("STOPPING", 15, "1")
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-4000:]
        while notify.poll(0.2) is not None:
            pass
        others = [m for m in notify.messages if m.pid != proc.pid]
        assert others == [], others
        assert notify.count("READY") == 1
        notify.exit_pid = proc.pid
        return notify
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
