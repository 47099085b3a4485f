"""DHCPv6 for network boot on an IPv6-only veth pair (issue #20): the
service (``python -m bootsvc.dhcp6.standalone``) on the root namespace's
end, clients in a namespace of their own.

* full mode against ISC ``dhclient -6``, a real client: it is offered and
  binds an address of the range, and its lease file holds the RFC 5970
  boot file URL chosen by its architecture (61) and vendor class (16); the
  bound lease is in etcd;
* bad input: truncated options, a relay loop, an oversized option 60 and a
  bogus architecture are dropped and counted by reason, and the service
  still answers the next client;
* a relayed SOLICIT is answered with a RELAY-REPL through the relay;
* proxy mode answers an EDK2-style SOLICIT with a proxy offer (no address)
  and the boot-service REQUEST on port 4011 with the boot file URL.

No packet leaves the veth pair; everything is removed at the end.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from bootsvc.wire import dhcp6
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys

REPO = Path(__file__).resolve().parents[2]
SERVER_ADDR = "fd00:77::1"
PXE = b"PXEClient:Arch:00007:UNDI:003016"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


@dataclass
class Segment:
    ns: str
    server_if: str
    client_if: str
    tmp: Path


@pytest.fixture
def segment(tmp_path: Path) -> Iterator[Segment]:
    tag = f"{os.getpid() % 10000}{int(time.time() * 1000) % 1000}"
    seg = Segment(f"lp6c{tag}", f"lp6s{tag}"[:15], f"lp6k{tag}"[:15], tmp_path)
    sh("ip", "netns", "add", seg.ns)
    try:
        sh("ip", "netns", "exec", seg.ns, "sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0",
           "net.ipv6.conf.default.accept_dad=0")
        sh("ip", "link", "add", seg.server_if, "type", "veth", "peer", "name", seg.client_if,
           "netns", seg.ns)
        sh("sysctl", "-qw", f"net.ipv6.conf.{seg.server_if}.accept_dad=0")
        sh("ip", "netns", "exec", seg.ns, "sysctl", "-qw",
           f"net.ipv6.conf.{seg.client_if}.accept_dad=0")
        sh("ip", "addr", "add", f"{SERVER_ADDR}/64", "dev", seg.server_if, "nodad")
        sh("ip", "link", "set", seg.server_if, "up")
        sh("ip", "-n", seg.ns, "link", "set", "lo", "up")
        sh("ip", "-n", seg.ns, "link", "set", seg.client_if, "up")
        sh("ip", "-n", seg.ns, "addr", "add", "fd00:77::2/64", "dev", seg.client_if, "nodad")
        time.sleep(0.5)          # link-local addresses come up
        yield seg
    finally:
        sh("ip", "link", "del", seg.server_if, check=False)
        sh("ip", "netns", "del", seg.ns, check=False)


class Server:
    def __init__(self, seg: Segment, *args: str) -> None:
        self.stats = seg.tmp / f"stats-{time.monotonic_ns()}.json"
        self.log = seg.tmp / "server.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bootsvc.dhcp6.standalone", "--interface", seg.server_if,
             "--tftp-address", SERVER_ADDR, "--advertise-url", f"http://[{SERVER_ADDR}]:8080",
             "--stats-file", str(self.stats), "--log-level", "debug", *args],
            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
            stderr=self.log.open("ab"), text=True)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "READY", self.log.read_text()

    def stop(self) -> dict[str, Any]:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(15)
        return dict(json.loads(self.stats.read_text()))


def counter(stats: dict[str, Any], name: str, **labels: str) -> float:
    """A counter of the service's JSON stats (``{name: {"k=v,...": value}}``)."""
    want = {f"{k}={v}" for k, v in labels.items()}
    return sum(value for key, value in stats.get(name, {}).items()
               if want <= set(key.split(",")))


def dhclient(seg: Segment, timeout: float = 25.0) -> str:
    """ISC dhclient -6 in the client namespace until it is bound; the lease file."""
    conf = seg.tmp / "dhclient6.conf"
    conf.write_text(
        "option dhcp6.bootfile-url code 59 = string;\n"
        "option dhcp6.client-arch-type code 61 = unsigned integer 16;\n"
        "option dhcp6.pxe-vendor-class code 16 = {integer 32, integer 16, string};\n"
        "send dhcp6.client-arch-type 7;\n"
        f'send dhcp6.pxe-vendor-class 343 {len(PXE)} "{PXE.decode()}";\n'
        "also request dhcp6.bootfile-url;\n")
    lease = seg.tmp / "dhclient6.leases"
    lease.touch()
    pid = seg.tmp / "dhclient6.pid"
    proc = subprocess.Popen(
        ["ip", "netns", "exec", seg.ns, "dhclient", "-6", "-1", "-d", "-v", "-cf", str(conf),
         "-lf", str(lease), "-pf", str(pid), "-sf", "/bin/true", seg.client_if],
        stdout=subprocess.DEVNULL, stderr=(seg.tmp / "dhclient.log").open("ab"))
    try:
        deadline = time.monotonic() + timeout
        while "iaaddr" not in lease.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, (seg.tmp / "dhclient.log").read_text()[-2000:]
            time.sleep(0.2)
        return lease.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def exchange(seg: Segment, payload: bytes, *, dest: str, port: int, src_port: int,
             timeout: float = 3.0, sources: list[str] | None = None) -> bytes:
    """Send ``payload`` from the client namespace and return the first answer
    (b"" when none came), through a child Python in the namespace; the
    answer's source address is appended to ``sources``."""
    code = (
        "import socket,sys\n"
        "s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
        "s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
        f"s.bind(('::',{src_port}))\n"
        f"s.settimeout({timeout})\n"
        f"dest=('{dest}',{port},0,socket.if_nametoindex('{seg.client_if}'))\n"
        "s.sendto(bytes.fromhex(sys.argv[1]),dest)\n"
        "try:\n  d,a=s.recvfrom(4096); print(d.hex(), a[0])\n"
        "except TimeoutError: print('')\n")
    r = sh("ip", "netns", "exec", seg.ns, sys.executable, "-c", code, payload.hex())
    answer, _, source = r.stdout.strip().partition(" ")
    if sources is not None:
        sources.append(source)
    return bytes.fromhex(answer)


def vendor(data: bytes) -> bytes:
    return struct.pack("!I", 343) + dhcp6.length_prefix([data])


def edk2_solicit(arch: bytes = b"\x00\x07", extra: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    return dhcp6.build_message(dhcp6.SOLICIT, b"\x0a\x0b\x0c", [
        (dhcp6.OPT_CLIENTID, dhcp6.duid_ll(bytes.fromhex("525400aabbcc"))),
        (dhcp6.OPT_IA_NA, b"\x00\x00\x00\x07" + bytes(8)),
        (dhcp6.OPT_ORO, struct.pack("!HH", 59, 60)),
        (dhcp6.OPT_CLIENT_ARCH_TYPE, arch), (dhcp6.OPT_VENDOR_CLASS, vendor(PXE)), *extra])


def options(payload: bytes, start: int = 4) -> dict[int, bytes]:
    return dict(dhcp6.options_of(payload, start))


def test_full_mode_with_dhclient_bad_input_and_a_relay(segment: Segment, etcd_server: Any,
                                                       keys: Keys) -> None:
    server = Server(segment, "--mode", "full", "--range", "fd00:77::100-fd00:77::1ff",
                    "--etcd-endpoints", etcd_server.url, "--etcd-prefix", keys.prefix,
                    "--idc", "v6lab")
    try:
        # bad input first: each dropped and counted, none answered
        bad = {
            "option_overrun": dhcp6.build_message(dhcp6.SOLICIT, b"\x01\x02\x03", []) +
            b"\x00\x01\x00\x40abc",
            "relay_loop": bytes([dhcp6.RELAY_FORW, 9]) + bytes(32) +
            dhcp6.option(dhcp6.OPT_RELAY_MSG, edk2_solicit()),
            "oversized_option": edk2_solicit(extra=((dhcp6.OPT_BOOTFILE_PARAM,
                                                     dhcp6.length_prefix([b"x" * 1500])),)),
            "unsupported_arch": edk2_solicit(arch=b"\x12\x34"),
        }
        for payload in bad.values():
            assert exchange(segment, payload, dest="ff02::1:2", port=547, src_port=20546,
                            timeout=1.0) == b""
        # a real client still gets an address and its boot file URL
        lease = dhclient(segment)
        assert "iaaddr fd00:77::1" in lease, lease
        assert 'option dhcp6.bootfile-url "tftp://[fd00:77::1]/ipxe.efi"' in lease, lease
        # a relay (a RELAY-FORW from port 547 to the server's address) is answered through it
        relayed = bytes([dhcp6.RELAY_FORW, 0]) + \
            socket.inet_pton(socket.AF_INET6, "fd00:99::1") + \
            socket.inet_pton(socket.AF_INET6, "fe80::5054:ff:fe00:1") + \
            dhcp6.option(dhcp6.OPT_INTERFACE_ID, b"rack7-port3") + \
            dhcp6.option(dhcp6.OPT_RELAY_MSG, edk2_solicit())
        answer = exchange(segment, relayed, dest=SERVER_ADDR, port=547, src_port=547)
        assert answer[:1] == bytes([dhcp6.RELAY_REPL]), answer.hex()
        outer = options(answer, dhcp6.RELAY_HEADER)
        assert outer[dhcp6.OPT_INTERFACE_ID] == b"rack7-port3"
        inner = outer[dhcp6.OPT_RELAY_MSG]
        assert inner[0] == dhcp6.ADVERTISE and inner[1:4] == b"\x0a\x0b\x0c"
        assert options(inner)[dhcp6.OPT_BOOTFILE_URL] == b"tftp://[fd00:77::1]/ipxe.efi"
        # EDK2 takes a full-mode offer with PXEClient for a BINL offer too and asks the
        # boot file URL's host on port 4011 before it boots (as OVMF does in the lab),
        # and takes the REPLY from that address only: with a second address on the
        # interface (the one the kernel would pick for this client) it still comes from it
        sh("ip", "addr", "add", "fd00:77::3/64", "dev", segment.server_if, "nodad")
        sources: list[str] = []
        binl = dhcp6.build_message(dhcp6.REQUEST, b"\x0d\x0e\x0f", [
            (dhcp6.OPT_CLIENTID, dhcp6.duid_ll(bytes.fromhex("525400aabbcc"))),
            (dhcp6.OPT_CLIENT_ARCH_TYPE, b"\x00\x07"), (dhcp6.OPT_VENDOR_CLASS, vendor(PXE))])
        reply = exchange(segment, binl, dest=SERVER_ADDR, port=4011, src_port=4011,
                         sources=sources)
        assert reply[:1] == bytes([dhcp6.REPLY]), reply.hex()
        assert options(reply)[dhcp6.OPT_BOOTFILE_URL] == b"tftp://[fd00:77::1]/ipxe.efi"
        assert dhcp6.OPT_IA_NA not in options(reply)         # the address came at 547
        assert sources == [SERVER_ADDR]
        # that REQUEST came from an address that is not the client's lease (OVMF sends
        # it from its SLAAC address but reads the REPLY on its leased one only): the
        # REPLY goes to the leased address as well
        ia = options(inner)[dhcp6.OPT_IA_NA]
        leased = socket.inet_ntop(socket.AF_INET6, options(ia, 12)[dhcp6.OPT_IAADDR][:16])
        sh("ip", "-n", segment.ns, "addr", "add", f"{leased}/64", "dev", segment.client_if,
           "nodad")
        code = (
            "import socket,sys\n"
            "def sock(a):\n"
            "  s=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "  s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n"
            "  s.bind((a,4011)); s.settimeout(3); return s\n"
            f"src,lease=sock('fd00:77::2'),sock('{leased}')\n"
            f"src.sendto(bytes.fromhex(sys.argv[1]),('{SERVER_ADDR}',4011))\n"
            "print(src.recv(4096).hex(), lease.recv(4096).hex())\n")
        both = sh("ip", "netns", "exec", segment.ns, sys.executable, "-c", code,
                  binl.hex()).stdout.split()
        assert len(both) == 2 and both[0] == both[1], both
        assert options(bytes.fromhex(both[1]))[dhcp6.OPT_BOOTFILE_URL] == \
            b"tftp://[fd00:77::1]/ipxe.efi"
    finally:
        stats = server.stop()
    for reason in bad:
        assert counter(stats, "dhcp6_dropped_total", reason=reason) >= 1, (reason, stats)
    assert counter(stats, "dhcp6_answers_total", type="reply") >= 1
    store = EtcdStore([etcd_server.url], timeout=5.0)
    try:
        deadline = time.monotonic() + 10
        stored: list[Any] = []
        while not stored and time.monotonic() < deadline:
            stored = [json.loads(kv.value) for kv in
                      store.range(keys.dhcp6_leases("v6lab")).items]
            time.sleep(0.2)
        assert stored and stored[0]["ip"].startswith("fd00:77::1"), stored
    finally:
        store.close()


def test_proxy_mode_offers_boot_only_and_answers_on_4011(segment: Segment) -> None:
    server = Server(segment, "--mode", "proxy")
    try:
        offer = exchange(segment, edk2_solicit(), dest="ff02::1:2", port=547, src_port=546)
        assert offer[:1] == bytes([dhcp6.ADVERTISE]), offer.hex()
        opts = options(offer)
        assert opts[dhcp6.OPT_BOOTFILE_URL] == b"tftp://[fd00:77::1]/ipxe.efi"
        assert opts[dhcp6.OPT_VENDOR_CLASS][6:15] == b"PXEClient"
        ia_status = options(opts[dhcp6.OPT_IA_NA], 12)[dhcp6.OPT_STATUS_CODE]
        assert struct.unpack("!H", ia_status[:2])[0] == dhcp6.STATUS_NO_ADDRS_AVAIL
        assert dhcp6.OPT_IAADDR not in options(opts[dhcp6.OPT_IA_NA], 12)
        # EDK2 then asks the boot file URL's host again, port 4011 to 4011, with our id
        request = dhcp6.build_message(dhcp6.REQUEST, b"\x0a\x0b\x0c", [
            (dhcp6.OPT_SERVERID, opts[dhcp6.OPT_SERVERID]),
            (dhcp6.OPT_CLIENTID, dhcp6.duid_ll(bytes.fromhex("525400aabbcc"))),
            (dhcp6.OPT_CLIENT_ARCH_TYPE, b"\x00\x07"), (dhcp6.OPT_VENDOR_CLASS, vendor(PXE))])
        reply = exchange(segment, request, dest=SERVER_ADDR, port=4011, src_port=4011)
        assert reply[:1] == bytes([dhcp6.REPLY]), reply.hex()
        assert options(reply)[dhcp6.OPT_BOOTFILE_URL] == b"tftp://[fd00:77::1]/ipxe.efi"
        # an iPXE client gets the boot script over IPv6
        ipxe = edk2_solicit(extra=((dhcp6.OPT_USER_CLASS, dhcp6.length_prefix([b"iPXE"])),))
        script = exchange(segment, ipxe, dest="ff02::1:2", port=547, src_port=546)
        assert options(script)[dhcp6.OPT_BOOTFILE_URL] == \
            b"http://[fd00:77::1]:8080/boot.ipxe"
        # a client that is not booting gets nothing
        plain = dhcp6.build_message(dhcp6.SOLICIT, b"\x01\x01\x01", [
            (dhcp6.OPT_CLIENTID, dhcp6.duid_ll(bytes.fromhex("525400aabbcd"))),
            (dhcp6.OPT_IA_NA, bytes(12))])
        assert exchange(segment, plain, dest="ff02::1:2", port=547, src_port=546,
                        timeout=1.0) == b""
    finally:
        stats = server.stop()
    assert counter(stats, "dhcp6_answers_total", type="advertise") == 2
    assert counter(stats, "dhcp6_answers_total", type="reply") == 1
    assert counter(stats, "dhcp6_dropped_total", reason="not_boot_client") == 1


def test_lpmos_regional_serves_dhcp6_and_the_timeline_records_it(
        segment: Segment, etcd_server: Any, keys: Keys) -> None:
    """``lpmos regional --dhcp6-mode full`` on the segment: dhclient -6 gets its
    address and boot file URL, and the machine's boot timeline in etcd has
    the DHCPv6 answer, as it has DHCPv4 ones."""
    from lpmos.models import Task
    from lpmos.tasks import TaskService
    from tests.reliability.support import Regional

    mac = sh("ip", "netns", "exec", segment.ns, "cat",
             f"/sys/class/net/{segment.client_if}/address").stdout.strip()
    store = EtcdStore([etcd_server.url], timeout=5.0)
    node = Regional(etcd_server.url, keys.prefix, segment.tmp / "node", name="node-v6",
                    flags=["--idc", "v6lab", "--services", "dhcp,http", "--dhcp-mode", "off",
                           "--dhcp6-mode", "full", "--dhcp6-interface", segment.server_if,
                           "--dhcp6-range", "fd00:77::200-fd00:77::2ff"])
    try:
        TaskService(store, keys).create(Task(idc="v6lab", sn="SN-V6-1", mac=mac,
                                             os_type="Lab"), by="test")
        node.start()
        lease = dhclient(segment)
        assert "iaaddr fd00:77::2" in lease, lease + node.log()
        # the URL names the interface's own global address
        assert 'option dhcp6.bootfile-url "tftp://[fd00:77::1]/ipxe.efi"' in lease, lease
        deadline = time.monotonic() + 20
        entries: list[Any] = []
        while time.monotonic() < deadline:
            kv = store.get(keys.timeline("v6lab", "SN-V6-1"))
            if kv is not None:
                data = json.loads(kv.value)
                entries = [e for e in (data.get("entries") if isinstance(data, dict) else data)
                           or [] if e.get("stage") == "dhcp6"]
                if entries:
                    break
            time.sleep(0.3)
        assert entries, node.log()
        assert entries[0]["detail"]["url"] == "tftp://[fd00:77::1]/ipxe.efi"
        assert entries[0]["detail"]["ipv6"] is True
        # the MAC and the leased address: what joins the machine's TFTP and HTTP entries
        assert entries[0]["detail"]["mac"] == mac
        assert entries[0]["detail"]["ip"] == entries[0]["detail"]["address"]
        assert entries[0]["detail"]["ip"].startswith("fd00:77::2")
    finally:
        node.stop()
        store.close()
