"""Lab mode ("full"): a real DHCP client (busybox udhcpc) gets an address
from our server in another network namespace; leases land in a real etcd;
DECLINE, renew, RELEASE and NAK; and the server keeps answering with etcd
gone."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.dhcp_bench import OurServer, etcd_in_netns, etcdctl_get_prefix
from bench.dhcp_loadgen import NetnsPair, PxeClient, client_socket, ip
from bootsvc.wire import dhcp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("udhcpc") is None
                       or shutil.which("etcdctl") is None,
                       reason="needs root, udhcpc and etcdctl"),
]

PREFIX = "/lab"
# the event is logged after the address is configured, so a test that sees
# "bound" in the log also finds the address on the interface
SCRIPT = """#!/bin/sh
case "$1" in
  bound|renew) ip addr flush dev "$interface"; ip addr add "$ip/$mask" dev "$interface" ;;
  deconfig) ip addr flush dev "$interface" ;;
esac
echo "$1 ip=$ip mask=$mask router=$router dns=$dns lease=$lease serverid=$serverid \
boot_file=$boot_file" >> {log}
"""

# our own script: the stock dhclient-script would rewrite the host's resolv.conf
DHCLIENT_SCRIPT = """#!/bin/sh
case "$reason" in
  BOUND|RENEW|REBIND|REBOOT) ip addr flush dev "$interface"
    ip addr add "$new_ip_address/$new_subnet_mask" dev "$interface" ;;
  RELEASE|EXPIRE|FAIL|STOP) ip addr flush dev "$interface" ;;
esac
"""


def wait_for(fn: Callable[[], object], timeout: float = 10.0, what: str = "") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what or fn}")


def interface_mac(net: NetnsPair) -> str:
    out = ip("-n", net.client, "-br", "link", "show", net.client_if).stdout.split()
    return out[2].lower()


def test_lease_life_cycle_with_udhcpc_and_etcd(tmp_path: Path) -> None:
    net = NetnsPair(client_address=False, subnet="10.232.0").create()
    server = None
    udhcpc = None
    log = tmp_path / "udhcpc.events"
    script = tmp_path / "udhcpc.sh"
    script.write_text(SCRIPT.format(log=log))
    script.chmod(0o755)
    lease_prefix = f"{PREFIX}/dc1/dhcp/"
    try:
        with etcd_in_netns(net.server, tmp_path) as (etcd, url):
            # the first pool address is already in use on the segment → udhcpc's
            # ARP check declines it and gets the next one
            ip("-n", net.server, "addr", "add", "10.232.0.100/24", "dev", net.server_if)
            server = OurServer(net, tmp_path, "--dhcp-mode", "full",
                               "--dhcp-range", "10.232.0.100-10.232.0.110",
                               "--dhcp-router", "10.232.0.1", "--dhcp-dns", "10.232.0.53",
                               "--dhcp-lease-time", "120", "--etcd-endpoints", url,
                               "--etcd-prefix", PREFIX, "--idc", "dc1")
            mac = interface_mac(net)
            udhcpc = subprocess.Popen(
                net.exec_args(net.client, "udhcpc", "-f", "-i", net.client_if, "-s", str(script),
                              "-t", "8", "-T", "1", "-A", "1", "-a200", "-x", "hostname:lab1"),
                stdout=subprocess.DEVNULL, stderr=(tmp_path / "udhcpc.log").open("wb"))

            def events() -> list[str]:
                return log.read_text().splitlines() if log.exists() else []

            wait_for(lambda: any(e.startswith("bound") for e in events()), 20, "udhcpc bound")
            bound = next(e for e in events() if e.startswith("bound"))
            assert "ip=10.232.0.101" in bound, bound           # .100 declined
            assert "router=10.232.0.1" in bound and "dns=10.232.0.53" in bound
            assert "mask=24" in bound
            addrs = ip("-n", net.client, "-4", "addr", "show", net.client_if).stdout
            assert "10.232.0.101/24" in addrs

            key = lease_prefix + mac
            stored = wait_for(lambda: etcdctl_get_prefix(net.server, url, lease_prefix).get(key),
                              10, "lease in etcd")
            assert isinstance(stored, dict)
            assert stored["ip"] == "10.232.0.101" and stored["mac"] == mac
            assert stored["hostname"] == "lab1"
            first_expiry = stored["expires"]

            # renew (unicast REQUEST from the bound address)
            time.sleep(1.1)
            udhcpc.send_signal(signal.SIGUSR1)
            wait_for(lambda: any(e.startswith("renew") for e in events()), 10, "renew")
            wait_for(lambda: etcdctl_get_prefix(net.server, url, lease_prefix)
                     .get(key, {}).get("expires", 0) > first_expiry, 10, "renewed lease stored")

            # release: the key goes away
            udhcpc.send_signal(signal.SIGUSR2)
            wait_for(lambda: key not in etcdctl_get_prefix(net.server, url, lease_prefix),
                     10, "released lease deleted")
            udhcpc.terminate()
            udhcpc.wait(10)
            udhcpc = None

            # etcd gone: addresses are still handed out from memory
            etcd.kill()
            etcd.wait(10)
            sock = client_socket(net.client, net.client_if)
            try:
                client = PxeClient(sock)
                other = "52:54:00:00:aa:01"
                offer = client.discover(other, arch=7, flags=dhcp.FLAG_BROADCAST)
                assert offer is not None and offer.msg_type == dhcp.OFFER
                assert offer.yiaddr.startswith("10.232.0.1")
                assert offer.boot_file == "ipxe.efi"             # boot client: file too
                assert offer.options[dhcp.OPT_SUBNET_MASK] == dhcp.ip_bytes("255.255.255.0")
                ack = client.request(other, ("255.255.255.255", 67), arch=7,
                                     server_id=net.server_ip, requested_ip=offer.yiaddr,
                                     flags=dhcp.FLAG_BROADCAST)
                assert ack is not None and ack.msg_type == dhcp.ACK
                assert ack.yiaddr == offer.yiaddr
                # NAK: an address outside the range, and one held by another MAC
                nak = client.request("52:54:00:00:aa:02", ("255.255.255.255", 67),
                                     requested_ip="10.232.0.200")
                assert nak is not None and nak.msg_type == dhcp.NAK
                nak = client.request("52:54:00:00:aa:03", ("255.255.255.255", 67),
                                     requested_ip=offer.yiaddr)
                assert nak is not None and nak.msg_type == dhcp.NAK
            finally:
                sock.close()
            stats = server.stop()
            server = None
    finally:
        if udhcpc is not None and udhcpc.poll() is None:
            udhcpc.kill()
            udhcpc.wait()
        if server is not None:
            server.stop()
        net.destroy()
    assert stats["dhcp_declined_total"]["result=ok"] == 1
    assert stats["dhcp_released_total"]["result=ok"] == 1
    assert stats["dhcp_nak_total"]["reason=wrong_address"] == 1
    assert stats["dhcp_nak_total"]["reason=address_in_use"] == 1
    assert stats["dhcp_packets_out_total"]["port=dhcp,type=ack"] >= 3   # bound, renew, other


@pytest.mark.skipif(shutil.which("dhclient") is None, reason="needs isc-dhcp-client")
def test_dhclient_gets_and_releases_a_lease(tmp_path: Path) -> None:
    net = NetnsPair(client_address=False, subnet="10.234.0").create()
    server = None
    leases = tmp_path / "dhclient.leases"
    script = tmp_path / "dhclient.sh"
    script.write_text(DHCLIENT_SCRIPT)
    script.chmod(0o755)
    base = ["dhclient", "-sf", str(script), "-lf", str(leases), "-pf", str(tmp_path / "pid"),
            "-cf", "/dev/null"]
    try:
        server = OurServer(net, tmp_path, "--dhcp-mode", "full",
                           "--dhcp-range", "10.234.0.150-10.234.0.160",
                           "--dhcp-router", "10.234.0.1", "--dhcp-lease-time", "300")
        got = subprocess.run(net.exec_args(net.client, *base, "-1", "-v", net.client_if),
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr[-2000:]
        assert "DHCPACK of 10.234.0.150 from 10.234.0.1" in got.stderr, got.stderr[-2000:]
        text = leases.read_text()
        assert "fixed-address 10.234.0.150;" in text
        assert "option routers 10.234.0.1;" in text
        released = subprocess.run(net.exec_args(net.client, *base, "-r", "-v", net.client_if),
                                  capture_output=True, text=True, timeout=60)
        assert "DHCPRELEASE of 10.234.0.150" in released.stderr, released.stderr[-2000:]
        time.sleep(0.3)
        stats = server.stop()
        server = None
    finally:
        if server is not None:
            server.stop()
        net.destroy()
    assert stats["dhcp_released_total"]["result=ok"] == 1
    assert stats["dhcp_packets_out_total"]["port=dhcp,type=ack"] == 1
