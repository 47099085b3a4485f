"""A stand-in for systemd's notification socket: an AF_UNIX datagram socket
that records each message with its sender's PID (SO_PASSCRED, as systemd
reads it to enforce ``NotifyAccess=main``)."""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

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
