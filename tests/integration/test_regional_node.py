"""`lpmos regional` as an operator runs it: one process with ProxyDHCP, TFTP
and boot HTTP on loopback high ports, registered in etcd under a lease,
stopped cleanly by SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bootsvc.wire import dhcp
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from tests.prometheus_text import has_sample, value

REPO = Path(__file__).resolve().parents[2]


def _free_udp() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def node(tmp_path: Path, etcd_server, keys):
    ports = {"dhcp": _free_udp(), "proxy": _free_udp(), "tftp": _free_udp(),
             "http": free_port()}
    cmd = [sys.executable, "-m", "lpmos", "regional", "--idc", "dc1", "--node-name", "node-t",
           "--state-dir", str(tmp_path / "state"), "--etcd-endpoints", etcd_server.url,
           "--etcd-prefix", keys.prefix, "--listen", "127.0.0.1",
           "--dhcp-port", str(ports["dhcp"]), "--dhcp-proxy-port", str(ports["proxy"]),
           "--tftp-port", str(ports["tftp"]), "--http-port", str(ports["http"])]
    log = (tmp_path / "node.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{ports['http']}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=1) as r:
                if json.loads(r.read())["status"] in ("ok", "degraded"):
                    break
        except OSError:
            pass
        assert proc.poll() is None, (tmp_path / "node.log").read_text()
        assert time.monotonic() < deadline, (tmp_path / "node.log").read_text()
        time.sleep(0.2)
    yield proc, ports, base, tmp_path
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()


def test_node_serves_all_three_and_registers(node, etcd_server, keys) -> None:
    proc, ports, base, tmp_path = node
    # boot HTTP: the constant script chains to the per-machine URL
    with urllib.request.urlopen(base + "/boot.ipxe", timeout=5) as r:
        script = r.read().decode()
    assert script.startswith("#!ipxe") and "/boot/${net0/mac}.ipxe" in script
    # TFTP: the iPXE binary, byte for byte (curl is a real TFTP client)
    out = tmp_path / "undionly.kpxe"
    subprocess.run(["curl", "-sf", "-o", str(out),
                    f"tftp://127.0.0.1:{ports['tftp']}/undionly.kpxe"], check=True, timeout=30)
    assert hashlib.sha256(out.read_bytes()).digest() == hashlib.sha256(
        Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()).digest()
    # ProxyDHCP boot server (port 4011): a UEFI x64 REQUEST gets an ACK with ipxe.efi
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        s.settimeout(5)
        s.sendto(dhcp.build_request("52:54:00:aa:bb:01", dhcp.REQUEST, xid=77, arch=7,
                                    vendor_class=b"PXEClient:Arch:00007:UNDI:003016",
                                    ciaddr="127.0.0.1"),
                 ("127.0.0.1", ports["proxy"]))
        reply = dhcp.parse_packet(s.recv(2048))
    assert reply.xid == 77 and reply.msg_type == dhcp.ACK
    assert reply.file.rstrip(b"\0") == b"ipxe.efi"
    # registered in etcd under a lease
    store = EtcdStore([etcd_server.url])
    kv = store.get(keys.node("dc1", "node-t"))
    assert kv is not None and kv.lease != 0
    info = json.loads(kv.value)
    assert info["advertise_url"] == base and "tftp" in info["services"]
    # SIGTERM: clean exit, registration revoked
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    assert store.get(keys.node("dc1", "node-t")) is None
    store.close()


def test_node_metrics_count_what_it_served(node) -> None:
    proc, _ports, base, _ = node
    urllib.request.urlopen(base + "/boot.ipxe", timeout=5).read()
    with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
        text = r.read().decode()
    assert has_sample(text, "lpmos_node_cache_staleness_seconds")
    assert value(text, "lpmos_http_boot_constant_total") == 1
    os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(20) == 0


def test_a_second_node_on_the_same_dhcp_port_is_refused(node, etcd_server, keys) -> None:
    """The DHCP sockets share their port (SO_REUSEADDR, for the site's DHCP
    server on the same host); a second LPMOS node started on the same port
    by mistake is refused in one line instead of answering too."""
    proc, ports, _base, tmp_path = node
    cmd = [sys.executable, "-m", "lpmos", "regional", "--idc", "dc1", "--node-name", "node-2",
           "--state-dir", str(tmp_path / "state-2"), "--etcd-endpoints", etcd_server.url,
           "--etcd-prefix", keys.prefix, "--listen", "127.0.0.1", "--services", "dhcp",
           "--dhcp-port", str(ports["dhcp"]), "--dhcp-proxy-port", str(_free_udp())]
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60,
                            check=False)
    assert second.returncode == 1, second.stderr
    assert "Traceback" not in second.stderr
    assert (f"dhcp: another LPMOS node on this host already serves UDP port {ports['dhcp']} "
            "on lo" in second.stderr), second.stderr
    assert proc.poll() is None        # the first node goes on


def _healthz(base: str) -> dict:
    try:
        with urllib.request.urlopen(base + "/healthz", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as exc:       # 503 degraded still has the body
        return json.loads(exc.read())


def test_two_nodes_under_one_name_are_told_on_both(node, etcd_server, keys) -> None:
    """Each would overwrite the other's record; both say so on /healthz (a
    warning: installs go on) and in a metric until one of them is gone."""
    proc, _ports, base, tmp_path = node
    port2 = free_port()
    cmd = [sys.executable, "-m", "lpmos", "regional", "--idc", "dc1", "--node-name", "node-t",
           "--state-dir", str(tmp_path / "state-2"), "--etcd-endpoints", etcd_server.url,
           "--etcd-prefix", keys.prefix, "--listen", "127.0.0.1", "--services", "http",
           "--http-port", str(port2)]
    log = (tmp_path / "node2.log").open("wb")
    second = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    base2 = f"http://127.0.0.1:{port2}"

    def warned(url: str) -> bool:
        return any("another node registers as 'node-t' in IDC 'dc1'" in w
                   for w in _healthz(url).get("warnings", []))
    try:
        deadline = time.monotonic() + 30
        while not (warned(base) and warned(base2)):
            assert second.poll() is None, (tmp_path / "node2.log").read_text()
            assert proc.poll() is None
            assert time.monotonic() < deadline, (_healthz(base), _healthz(base2))
            time.sleep(0.3)
        with urllib.request.urlopen(base + "/metrics", timeout=5) as r:
            assert value(r.read().decode(), "lpmos_node_name_conflict") == 1
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
        log.close()
    # the second one revoked its record's lease on the way out: the name is ours alone
    deadline = time.monotonic() + 20
    while warned(base):
        assert time.monotonic() < deadline, _healthz(base)
        time.sleep(0.3)
    assert "node registration: another node registers as" in \
        (tmp_path / "node2.log").read_text()


def test_a_restart_finding_its_own_previous_record_is_no_conflict(tmp_path: Path) -> None:
    """The record of this node's previous run (same host and state
    directory, another process) outlives a quick restart by its lease."""
    from bootsvc.context import NodeContext
    from bootsvc.node import NodeRegistration
    from lpmos.config import COMMON, resolve

    config = resolve(COMMON, {"state_dir": str(tmp_path)}, {}, None)
    ctx = NodeContext(config=config, idc="dc1", node_name="n1", store=None, keys=None,  # type: ignore[arg-type]
                      cache=None, machines=None)  # type: ignore[arg-type]
    reg = NodeRegistration(ctx, {"node": "n1", "address": "10.0.0.1"})
    previous = dict(reg.info, instance="an-earlier-process")
    reg._check_name(json.dumps(previous).encode())
    assert reg.conflict is None and ctx.warnings == {}
    elsewhere = dict(previous, host="other-host", address="10.0.0.2")
    reg._check_name(json.dumps(elsewhere).encode())
    assert reg.conflict is not None and "host other-host, address 10.0.0.2" in reg.conflict
    assert ctx.warnings["node_name"] == reg.conflict
    reg._check_name(json.dumps(dict(reg.info)).encode())      # ours again
    assert reg.conflict is None and ctx.warnings == {}
    reg._check_name(b"not json")                                # unreadable: not a conflict
    assert reg.conflict is None
