"""Helpers of the reliability suite: the real services as subprocesses.

``lpmos regional`` and ``lpmos control-plane`` are started exactly as an
operator starts them (``python -m lpmos ...``) on loopback high ports and
pointed at a real etcd from the fixtures of ``tests/conftest.py``
(``private_etcd`` when the test stops or kills it).  Every process is
started in its own session and killed by PID in the teardown.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import requests

from bootsvc.wire import dhcp
from lpmos import testing
from lpmos.store.embedded import free_port
from lpmos.testing import ROCKY_9

REPO = Path(__file__).resolve().parents[2]
IDC = "dc1"


def free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def eventually(fn: Callable[[], Any], timeout: float = 15.0, interval: float = 0.1,
               what: str = "condition") -> Any:
    """Poll ``fn`` until it returns something truthy; AssertionError after ``timeout``."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except (requests.RequestException, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(interval)
    raise AssertionError(f"{what} not met within {timeout}s (last: {last!r})")


def write_catalog(root: Path) -> Path:
    """A catalog with the live image (no kernel_args), an image-mode OS ("Lab
    OS") and an installer-mode OS ("Rocky Linux 9" without kernel_args,
    official URLs, never fetched)."""
    return testing.write_catalog(root, disk_name="lab-os", disk_bytes=256 * 1024,
                                 live_bytes=(50_000, 50_000), live_kernel_args=False,
                                 installers=(ROCKY_9._replace(kernel_args=""),)).path


def _kill(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)


@dataclass
class Regional:
    """One ``lpmos regional`` process (ProxyDHCP, TFTP, boot HTTP)."""

    etcd_url: str
    prefix: str
    workdir: Path
    name: str = "node-r"
    flags: list[str] = field(default_factory=list)
    ports: dict[str, int] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports['http']}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def start(self, *, wait_for: tuple[str, ...] = ("ok", "degraded"),
              timeout: float = 40.0) -> Regional:
        if not self.ports:
            self.ports = {"dhcp": free_udp(), "proxy": free_udp(), "tftp": free_udp(),
                          "http": free_port()}
        catalog = self.workdir / "images" / "catalog.toml"
        if not catalog.exists():
            (self.workdir / "images").mkdir(parents=True, exist_ok=True)
            write_catalog(self.workdir / "images")
        with self.log_path.open("ab") as log:
            self.proc = self.spawn(self.command(catalog), log)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            r = requests.get(self.url + "/healthz", timeout=3)
            return r.json().get("status") in wait_for

        eventually(up, timeout, 0.2, what=f"{self.name} /healthz in {wait_for}")
        return self

    def command(self, catalog: Path) -> list[str]:
        return [sys.executable, "-m", "lpmos", "regional", "--idc", IDC,
                "--node-name", self.name, "--state-dir", str(self.workdir / "state"),
                "--etcd-endpoints", self.etcd_url, "--etcd-prefix", self.prefix,
                "--catalog", str(catalog), "--listen", "127.0.0.1",
                "--dhcp-port", str(self.ports["dhcp"]),
                "--dhcp-proxy-port", str(self.ports["proxy"]),
                "--tftp-port", str(self.ports["tftp"]), "--http-port", str(self.ports["http"]),
                *self.flags]

    def spawn(self, cmd: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None:
            _kill(self.proc)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                _kill(self.proc)

    # -- clients of the three services ------------------------------------------------

    def proxy_dhcp(self, mac: str, xid: int, timeout: float = 5.0) -> dhcp.DhcpPacket:
        """A UEFI x64 REQUEST to the ProxyDHCP boot-server port (4011's stand-in)."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind(("127.0.0.1", 0))
            s.settimeout(timeout)
            s.sendto(dhcp.build_request(mac, dhcp.REQUEST, xid=xid, arch=7,
                                        vendor_class=b"PXEClient:Arch:00007:UNDI:003016",
                                        ciaddr="127.0.0.1"),
                     ("127.0.0.1", self.ports["proxy"]))
            while True:
                reply = dhcp.parse_packet(s.recv(2048))
                if reply.xid == xid:
                    return reply

    def tftp(self, name: str, out: Path) -> bytes:
        subprocess.run(["curl", "-sf", "--max-time", "20", "-o", str(out),
                        f"tftp://127.0.0.1:{self.ports['tftp']}/{name}"],
                       check=True, timeout=30)
        return out.read_bytes()

    def metric(self, line_prefix: str) -> float:
        text = requests.get(self.url + "/metrics", timeout=10).text
        total = 0.0
        for line in text.splitlines():
            if line.startswith(line_prefix):
                total += float(line.rsplit(" ", 1)[1])
        return total


@dataclass
class ControlPlane:
    """One ``lpmos control-plane`` process (gunicorn, one gthread worker)."""

    etcd_url: str
    prefix: str
    workdir: Path
    name: str = "cp"
    flags: list[str] = field(default_factory=list)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]

    def start(self, timeout: float = 60.0, *, healthy: bool = True) -> ControlPlane:
        if not self.port:
            self.port = free_port()
        catalog = self.workdir / "images" / "catalog.toml"
        if not catalog.exists():
            (self.workdir / "images").mkdir(parents=True, exist_ok=True)
            write_catalog(self.workdir / "images")
        cmd = [sys.executable, "-m", "lpmos", "control-plane", "--catalog", str(catalog),
               "--listen", f"127.0.0.1:{self.port}", "--etcd-endpoints", self.etcd_url,
               "--etcd-prefix", self.prefix, "--state-dir", str(self.workdir / "cp-state"),
               "--threads", "48", "--ws-max-clients", "8", "--mutate-rate", "100000",
               *self.flags]
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            r = requests.get(self.url + "/healthz", timeout=3)
            return r.status_code == 200 or not healthy

        eventually(up, timeout, 0.2, what=f"{self.name} /healthz")
        return self

    def kill(self) -> None:
        """SIGKILL the whole process group (gunicorn master and worker)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(30)


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def decision_of(script: str) -> str:
    """The decision a per-machine iPXE script carries in its comment line."""
    return script.split("(decision ", 1)[1].split(")", 1)[0]


def register(url: str, sn: str, mac: str, uuid: str, token: str | None = None,
             timeout: float = 15.0) -> requests.Response:
    return requests.post(f"{url}/agent/v1/register", headers=auth(token) if token else {},
                         json={"sn": sn, "uuid": uuid, "macs": [mac], "boot_mac": mac,
                               "arch": "x86_64", "inventory": {"schema": 1},
                               "agent_version": "reliability"}, timeout=timeout)


def progress(first: int, last: int, source: str = "agent") -> list[dict[str, Any]]:
    return [{"source": source, "seq": i, "kind": "progress", "step": "write",
             "percent": float(i), "message": f"step {i}"} for i in range(first, last + 1)]


def dumps(data: Any) -> str:
    return json.dumps(data, separators=(",", ":"))


def stop_etcd(server: Any) -> None:
    """SIGSTOP ``server`` (a tests.conftest.EtcdServer) and return once it
    no longer answers (group stop of a busy multi-threaded process is not
    instantaneous on a loaded machine)."""
    from lpmos.store import StoreError
    from lpmos.store.etcd import EtcdStore

    server.stop()
    probe = EtcdStore([server.url], timeout=0.3)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                probe.revision()
            except StoreError:
                return
            time.sleep(0.05)
        raise AssertionError("etcd still answers after SIGSTOP")
    finally:
        probe.close()
