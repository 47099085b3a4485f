"""The services speak systemd's notification protocol (Type=notify): the
regional node and the control plane, run from the source tree on loopback
high ports with the embedded etcd, against a real AF_UNIX datagram socket as
$NOTIFY_SOCKET.  Every message must come from the main PID (the units say
NotifyAccess=main; the embedded etcd speaks the protocol too and must not
inherit the socket).  tests/integration/test_debian_package.py runs the same
checks against the installed package."""

from __future__ import annotations

import json
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from lpmos.store.embedded import free_port
from tests.notify_socket import check_notify_lifecycle

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


def test_regional_node_ready_watchdog_stopping(tmp_path: Path) -> None:
    args, base = regional_args(tmp_path / "state")
    notify = check_notify_lifecycle([sys.executable, "-m", "lpmos", *args],
                                    lambda _pid: _get(base + "/healthz"), tmp_path / "notify.sock",
                                    tmp_path / "service.log",
                                    env={**os.environ, "PYTHONPATH": str(REPO)})
    ready = notify.wait_for("READY", 0)
    assert "node notify-t, IDC dc1: dhcp,tftp,http" in ready.fields["STATUS"]
    assert "cache current" in ready.fields["STATUS"]     # the embedded etcd answered


def test_control_plane_ready_after_the_worker_loaded(tmp_path: Path) -> None:
    args, base = control_plane_args(tmp_path / "state")
    # gunicorn's master loop wakes every second: a 3 s watchdog is the tightest it keeps
    notify = check_notify_lifecycle([sys.executable, "-m", "lpmos", *args],
                                    lambda _pid: _get(base + "/healthz"), tmp_path / "notify.sock",
                                    tmp_path / "service.log",
                                    env={**os.environ, "PYTHONPATH": str(REPO)},
                                    watchdog_usec=3_000_000)
    assert notify.wait_for("READY", 0).fields["STATUS"].endswith(": serving")
