"""ProxyDHCP benchmark: ours vs dnsmasq, side by side, in network namespaces.

Also home of the process wrappers the DHCP network tests use:
:class:`OurServer` (``python -m bootsvc.dhcp_server`` inside a namespace) and
:class:`Dnsmasq` (dnsmasq inside a namespace, as ProxyDHCP or as the
site's address-only DHCP server), and :func:`etcd_in_netns`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.dhcp_loadgen import NetnsPair, entered

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


class OurServer:
    """Our DHCP service as its own process in ``net.server``'s namespace."""

    def __init__(self, net: NetnsPair, workdir: Path, *flags: str, ready: float = 20.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stats_file = workdir / "dhcp-stats.json"
        self.log_file = workdir / "dhcp-server.log"
        cmd = net.exec_args(net.server, sys.executable, "-m", "bootsvc.dhcp_server",
                            "--interface", net.server_if, "--state-dir", str(workdir),
                            "--stats-file", str(self.stats_file), *flags)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=REPO, env=_env())
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ready
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                break
        if not line.startswith(b"READY"):
            self.stop()
            raise RuntimeError(f"DHCP server did not start: {line!r}; log:\n"
                               + self.log_file.read_text()[-3000:])
        self.ports = json.loads(line.split(b" ", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop (SIGTERM) and return the counters it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            stats: dict[str, dict[str, float]] = json.loads(self.stats_file.read_text())
            return stats
        except (OSError, ValueError):
            return {}


class Dnsmasq:
    """dnsmasq in a namespace: ``proxy`` (ProxyDHCP with pxe-service, as in
    the benchmark) or ``site`` (address-only DHCP server of the site)."""

    def __init__(self, netns: str, interface: str, workdir: Path, *, mode: str,
                 subnet: str, server_ip: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / f"dnsmasq-{mode}.log"
        args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                f"--interface={interface}", "--bind-interfaces", "--user=root",
                f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}",
                f"--pid-file={workdir / 'dnsmasq.pid'}", "--no-ping", "--log-facility=-"]
        if mode == "proxy":
            args += [f"--dhcp-range={subnet}.0,proxy",
                     f'--pxe-service=x86PC,"LPMOS",undionly.kpxe,{server_ip}',
                     f'--pxe-service=X86-64_EFI,"LPMOS",ipxe.efi,{server_ip}',
                     f'--pxe-service=BC_EFI,"LPMOS",ipxe.efi,{server_ip}']
        else:
            args += [f"--dhcp-range={subnet}.50,{subnet}.90,255.255.255.0,1h",
                     "--dhcp-authoritative"]
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *args], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError("dnsmasq did not start:\n" + self.log_file.read_text()[-2000:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def etcd_in_netns(netns: str, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real etcd listening on 127.0.0.1 inside ``netns`` (a process
    started from a thread inside a namespace lives in it)."""
    from lpmos.store.embedded import start_etcd

    with entered(netns):
        proc, url = start_etcd(workdir / "etcd-data", client_port=2379, peer_port=2380,
                               log_path=workdir / "etcd.log")
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def etcdctl_get_prefix(netns: str, url: str, prefix: str) -> dict[str, Any]:
    """Keys under ``prefix`` (key → JSON-decoded value), read with etcdctl
    inside ``netns``."""
    import base64

    out = subprocess.run(["ip", "netns", "exec", netns, "etcdctl", "--endpoints", url, "get",
                          "--prefix", prefix, "-w", "json"],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    result = {}
    for kv in json.loads(out).get("kvs", []):
        result[base64.b64decode(kv["key"]).decode()] = json.loads(base64.b64decode(kv["value"]))
    return result
