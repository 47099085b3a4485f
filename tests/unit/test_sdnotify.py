"""lpmos.sdnotify against real AF_UNIX datagram sockets (path and abstract),
as systemd's notification socket is."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from lpmos.sdnotify import (
    MAX_STATUS,
    Notifier,
    clean_status,
    parse_address,
    parse_watchdog_usec,
    run_watchdog,
)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    sock.settimeout(2.0)
    yield sock, path
    sock.close()


def _messages(sock: socket.socket, wait: float = 0.2) -> list[str]:
    sock.settimeout(wait)
    got = []
    try:
        while True:
            got.append(sock.recv(4096).decode())
    except TimeoutError:
        pass
    return got


def test_ready_status_stopping_reach_a_path_socket(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    env = {"NOTIFY_SOCKET": path}
    n = Notifier.from_environ(env)
    assert n.enabled and env == {}          # unset: children cannot speak for us
    assert n.ready("serving dc1") is True
    assert sock.recv(4096) == b"READY=1\nSTATUS=serving dc1"
    assert n.status("degraded: etcd unreachable")
    assert sock.recv(4096) == b"STATUS=degraded: etcd unreachable"
    assert n.stopping()
    assert sock.recv(4096) == b"STOPPING=1"


def test_abstract_socket_address() -> None:
    name = f"lpmos-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2.0)
        n = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name})
        assert n.ready()
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_every_call_is_a_no_op() -> None:
    n = Notifier.from_environ({})
    assert not n.enabled
    assert n.ready() is False and n.watchdog() is False and n.stopping() is False
    assert n.watchdog_interval is None


def test_unset_false_keeps_the_environment(receiver: tuple[socket.socket, str]) -> None:
    _sock, path = receiver
    env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000", "OTHER": "x"}
    Notifier.from_environ(env, unset=False)
    assert env["NOTIFY_SOCKET"] == path
    Notifier.from_environ(env)
    assert env == {"OTHER": "x"}


def test_a_vanished_socket_returns_false_and_never_raises(tmp_path: Path) -> None:
    n = Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert n.enabled
    assert n.ready() is False
    assert n.ready() is False        # again: still no exception


@pytest.mark.parametrize("raw", ["relative/path", "@", "vsock:2:1234", ""])
def test_addresses_we_do_not_speak_are_disabled(raw: str) -> None:
    assert parse_address(raw) is None
    assert not Notifier.from_environ({"NOTIFY_SOCKET": raw}).enabled


def test_a_full_queue_drops_the_message_without_blocking(tmp_path: Path) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "full.sock")
    sock.bind(path)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    n = Notifier(path, 10.0)
    started = time.monotonic()
    results = [n.status("x" * 300) for _ in range(2000)]    # never read
    assert time.monotonic() - started < 5.0
    assert results[0] is True and results[-1] is False
    sock.close()


@pytest.mark.parametrize(("usec", "pid", "expected"), [
    ("30000000", None, 30.0),
    ("200000", "OWN", 0.2),
    ("200000", "1", None),              # another process's watchdog
    ("0", None, None),
    ("-5", None, None),
    ("soon", None, None),
    (None, None, None),
    ("200000", "x", None),
])
def test_watchdog_usec(usec: str | None, pid: str | None, expected: float | None) -> None:
    own = os.getpid()
    shown_pid = str(own) if pid == "OWN" else pid
    assert parse_watchdog_usec(usec, shown_pid, own if own != 1 else 2) == expected


def test_watchdog_interval_is_half_the_timeout(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "3000000",
                               "WATCHDOG_PID": str(os.getpid())})
    assert n.watchdog_interval == 1.5
    assert n.watchdog()
    assert sock.recv(4096) == b"WATCHDOG=1"
    # no watchdog asked for: WATCHDOG=1 is not sent
    assert Notifier(path, None).watchdog() is False


def test_status_is_one_bounded_line(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    assert clean_status("a\nREADY=1\r\nb") == "a READY=1 b"
    Notifier(path).status("line\nREADY=1" + "y" * 1000)
    got = sock.recv(4096).decode()
    assert "\n" not in got and got.startswith("STATUS=line READY=1")
    assert len(got) == len("STATUS=") + MAX_STATUS


def test_run_watchdog_pings_while_the_loop_runs_and_keeps_status(
        receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier(path, 0.1)               # a ping every 50 ms
    states = iter(["starting", "starting", "serving"] + ["serving"] * 100)

    async def main() -> None:
        task = asyncio.create_task(run_watchdog(n, lambda: next(states)))
        await asyncio.sleep(0.4)
        task.cancel()

    asyncio.run(main())
    got = _messages(sock)
    assert got.count("WATCHDOG=1") >= 5
    assert [m for m in got if m.startswith("STATUS=")] == ["STATUS=starting", "STATUS=serving"]


def test_a_wedged_loop_sends_no_ping(receiver: tuple[socket.socket, str]) -> None:
    sock, path = receiver
    n = Notifier(path, 0.1)

    async def main() -> None:
        task = asyncio.create_task(run_watchdog(n))
        await asyncio.sleep(0.12)
        _messages(sock, wait=0.01)         # drain what came while the loop ran
        time.sleep(0.5)                    # the loop is blocked: no task runs
        wedged = _messages(sock, wait=0.01)
        task.cancel()
        assert wedged == []

    asyncio.run(main())


def test_run_watchdog_returns_without_a_socket() -> None:
    async def main() -> None:
        await asyncio.wait_for(run_watchdog(Notifier(None, 1.0)), 1.0)

    asyncio.run(main())
