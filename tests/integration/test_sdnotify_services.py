"""The services speak systemd's notification protocol (Type=notify): the
regional node and the control plane, run from the source tree on loopback
high ports with the embedded etcd, against a real AF_UNIX datagram socket as
$NOTIFY_SOCKET.  Every message must come from the main PID (the units say
NotifyAccess=main; the embedded etcd speaks the protocol too and must not
inherit the socket).  tests/integration/test_debian_package.py runs the same
checks against the installed package."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from lpmos.store.embedded import free_port
from tests.notify_socket import NotifySocket

REPO = Path(__file__).resolve().parents[2]


def _free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def regional_args(state: Path) -> tuple[list[str], str]:
    """Arguments of a node on loopback high ports with the embedded etcd,
    and its boot HTTP base URL."""
    http = free_port()
    return ["regional", "--idc", "dc1", "--node-name", "notify-t", "--state-dir", str(state),
            "--listen", "127.0.0.1", "--dhcp-port", str(_free_udp()),
            "--dhcp-proxy-port", str(_free_udp()), "--tftp-port", str(_free_udp()),
            "--http-port", str(http)], f"http://127.0.0.1:{http}"


def control_plane_args(state: Path) -> tuple[list[str], str]:
    port = free_port()
    return ["control-plane", "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
            "--threads", "16", "--ws-max-clients", "4"], f"http://127.0.0.1:{port}"


def check_notify_lifecycle(command: Sequence[str], base: str, tmp: Path, *,
                           env: dict[str, str] | None = None,
                           watchdog_usec: int = 1_000_000,
                           ready_within: float = 60.0) -> NotifySocket:
    """Run ``command`` with $NOTIFY_SOCKET and $WATCHDOG_USEC, and check:
    READY=1 from the main PID, /healthz answering when it comes, WATCHDOG=1
    at the asked pace, STOPPING=1 on SIGTERM, exit 0, and no message from
    any other process."""
    notify = NotifySocket(tmp / "notify.sock")
    log_path = tmp / "service.log"
    run_env = dict(env if env is not None else os.environ)
    run_env.update(NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC=str(watchdog_usec))
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(command), cwd=tmp, stdout=log, stderr=subprocess.STDOUT,
                                env=run_env)
    try:
        try:
            ready = notify.wait_for("READY", ready_within, "1")
        except AssertionError:
            raise AssertionError(log_path.read_text()[-4000:]) from None
        assert ready.pid == proc.pid
        assert ready.fields.get("STATUS"), ready.fields
        # ready means it answers: no retry loop here
        status, body = _get(base + "/healthz")
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
        return notify
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()


def test_regional_node_ready_watchdog_stopping(tmp_path: Path) -> None:
    args, base = regional_args(tmp_path / "state")
    notify = check_notify_lifecycle([sys.executable, "-m", "lpmos", *args], base, tmp_path,
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
    ready = notify.wait_for("READY", 0)
    assert "node notify-t, IDC dc1: dhcp,tftp,http" in ready.fields["STATUS"]
    assert "cache current" in ready.fields["STATUS"]     # the embedded etcd answered


def test_control_plane_ready_after_the_worker_loaded(tmp_path: Path) -> None:
    args, base = control_plane_args(tmp_path / "state")
    # gunicorn's master loop wakes every second: a 3 s watchdog is the tightest it keeps
    notify = check_notify_lifecycle([sys.executable, "-m", "lpmos", *args], base, tmp_path,
                                    env={**os.environ, "PYTHONPATH": str(REPO)},
                                    watchdog_usec=3_000_000)
    assert notify.wait_for("READY", 0).fields["STATUS"].endswith(": serving")
