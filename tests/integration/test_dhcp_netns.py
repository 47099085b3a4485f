"""ProxyDHCP with real packets: the service in one network namespace, a
PXE/iPXE-like client in another, joined by a veth pair the test creates and
removes.  Real ports 67 and 4011 inside the namespaces."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from bench.dhcp_bench import OurServer
from bench.dhcp_loadgen import NetnsPair, PxeClient, client_socket
from bootsvc.wire import dhcp

pytestmark = [
    pytest.mark.netns,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                       reason="needs root and iproute2 for network namespaces"),
]

PXE_BIOS = b"PXEClient:Arch:00000:UNDI:002001"
PXE_EFI = b"PXEClient:Arch:00007:UNDI:003016"
HTTP_EFI = b"HTTPClient:Arch:00016:UNDI:003001"
UUID = bytes.fromhex("8b3f0a6ec4d14f0e9d2b5d6e7f801234")
SHORT = 0.7     # seconds to wait for an answer that must not come


class Lan:
    def __init__(self, net: NetnsPair, server: OurServer, client: PxeClient) -> None:
        self.net, self.server, self.client = net, server, client
        self.stats: dict[str, dict[str, float]] = {}   # the server's counters, once stopped

    @property
    def url(self) -> str:
        return f"http://{self.net.server_ip}:8081"


@contextmanager
def lan_on(net: NetnsPair, workdir: Path, *flags: str) -> Iterator[Lan]:
    """Create ``net``, start our server in it with ``flags`` and a client socket;
    on exit close the socket, stop the server (its counters left in ``Lan.stats``)
    and remove the namespaces, however far the setup got."""
    net.create()
    server = None
    sock = None
    lan = None
    try:
        server = OurServer(net, workdir, *flags)
        sock = client_socket(net.client, net.client_if)
        lan = Lan(net, server, PxeClient(sock))
        yield lan
    finally:
        if sock is not None:
            sock.close()
        stats = server.stop() if server is not None else {}
        if lan is not None:
            lan.stats = stats
        net.destroy()


@pytest.fixture(scope="module")
def pxe_lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    """Client without an address (a PXE ROM), the server in proxy mode."""
    with lan_on(NetnsPair(client_address=False), tmp_path_factory.mktemp("pxe")) as lan:
        yield lan


@pytest.fixture(scope="module")
def booted_lan(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lan]:
    """Client with an address (after the site DHCP), for port 4011 and relays."""
    net = NetnsPair(client_address=True)
    with lan_on(net, tmp_path_factory.mktemp("booted"), "--dhcp-relays", net.client_ip) as lan:
        yield lan


def mac(n: int) -> str:
    return f"52:54:00:7e:00:{n:02x}"


# --- port 67: every architecture row ----------------------------------------------------

ROWS = [
    # arch, vendor class, expected file ("" = no answer), expects option 43 (BIOS bypass)
    (0, PXE_BIOS, "undionly.kpxe", True),
    (6, b"PXEClient:Arch:00006:UNDI:003016", "", False),     # IA32: no 32-bit file configured
    (7, PXE_EFI, "ipxe.efi", False),
    (9, b"PXEClient:Arch:00009:UNDI:003016", "ipxe.efi", False),
    (16, HTTP_EFI, "http://{server}:8081/ipxe/ipxe.efi", False),
    (15, b"HTTPClient:Arch:00015", "", False),
    (11, b"PXEClient:Arch:00011:UNDI:003016", "", False),      # arm64 not configured
    (19, b"HTTPClient:Arch:00019", "", False),
    (10, b"PXEClient:Arch:00010", "", False),                  # arm32: unsupported
]


@pytest.mark.parametrize(("arch", "vc", "expected", "bypass"), ROWS)
def test_architecture_row_answered_with_its_boot_file(pxe_lan: Lan, arch: int, vc: bytes,
                                                      expected: str, bypass: bool) -> None:
    reply = pxe_lan.client.discover(mac(arch), arch=arch, vendor_class=vc, uuid=UUID,
                                    timeout=3.0 if expected else SHORT)
    if not expected:
        assert reply is None
        return
    assert reply is not None, "no ProxyDHCP offer"
    server = pxe_lan.net.server_ip
    assert reply.msg_type == dhcp.OFFER
    assert reply.yiaddr == "0.0.0.0"                       # a proxy never offers an address
    assert reply.boot_file == expected.format(server=server)
    assert reply.siaddr == server and reply.server_id == server
    assert reply.vendor_class == (b"HTTPClient" if vc.startswith(b"HTTP") else b"PXEClient")
    assert reply.options[dhcp.OPT_CLIENT_UUID] == b"\x00" + UUID     # option 97 echoed
    assert reply.mac == mac(arch)
    assert (reply.options.get(dhcp.OPT_VENDOR_SPECIFIC) == dhcp.PXE_BYPASS_DISCOVERY) is bypass


@pytest.mark.parametrize("arch", [0, 7, 9])
def test_ipxe_client_gets_boot_script_not_ipxe_again(pxe_lan: Lan, arch: int) -> None:
    reply = pxe_lan.client.discover(mac(0x40 + arch), arch=arch, user_class=b"iPXE",
                                    extra={175: b"\x13\x01\x01"})
    assert reply is not None
    assert reply.boot_file == f"{pxe_lan.url}/boot.ipxe"
    assert dhcp.OPT_VENDOR_SPECIFIC not in reply.options


def test_option_175_alone_marks_ipxe(pxe_lan: Lan) -> None:
    reply = pxe_lan.client.discover(mac(0x50), arch=7, extra={175: b"\xb1\x01\x01"})
    assert reply is not None and reply.boot_file.endswith("/boot.ipxe")


def test_non_boot_client_ignored(pxe_lan: Lan) -> None:
    assert pxe_lan.client.discover(mac(0x60), arch=7, vendor_class=b"udhcp 1.35.0",
                                   timeout=SHORT) is None
    assert pxe_lan.client.discover(mac(0x61), vendor_class=None, timeout=SHORT) is None


def test_request_on_port_67_not_acked_by_proxy(pxe_lan: Lan) -> None:
    pxe_lan.client.xid += 1
    req = dhcp.build_request(mac(0x62), dhcp.REQUEST, xid=pxe_lan.client.xid, arch=7,
                             server_id=pxe_lan.net.server_ip, requested_ip="10.231.0.77")
    assert pxe_lan.client.exchange(req, ("255.255.255.255", 67), timeout=SHORT) is None


def test_broadcast_flag_kept_in_offer(pxe_lan: Lan) -> None:
    reply = pxe_lan.client.discover(mac(0x63), arch=7, flags=dhcp.FLAG_BROADCAST)
    assert reply is not None and reply.broadcast


# --- port 4011 ------------------------------------------------------------------------------


def test_port_4011_request_acked_with_boot_file(booted_lan: Lan) -> None:
    net = booted_lan.net
    reply = booted_lan.client.request(mac(0x70), (net.server_ip, 4011), arch=7,
                                      vendor_class=PXE_EFI, ciaddr=net.client_ip, uuid=UUID)
    assert reply is not None
    assert reply.msg_type == dhcp.ACK
    assert reply.boot_file == "ipxe.efi"
    assert reply.vendor_class == b"PXEClient"
    assert reply.siaddr == net.server_ip and reply.server_id == net.server_ip
    assert reply.ciaddr == net.client_ip and reply.yiaddr == "0.0.0.0"
    assert reply.options[dhcp.OPT_CLIENT_UUID] == b"\x00" + UUID


def test_port_4011_ipxe_request_gets_script(booted_lan: Lan) -> None:
    net = booted_lan.net
    reply = booted_lan.client.request(mac(0x71), (net.server_ip, 4011), arch=9,
                                      user_class=b"iPXE", ciaddr=net.client_ip)
    assert reply is not None and reply.boot_file == f"{booted_lan.url}/boot.ipxe"


def test_port_4011_boot_server_request_echoes_boot_item(booted_lan: Lan) -> None:
    net = booted_lan.net
    item = dhcp.pxe_vendor_options({dhcp.PXE_BOOT_ITEM: b"\x80\x00\x00\x00"})
    reply = booted_lan.client.request(mac(0x72), (net.server_ip, 4011), arch=0,
                                      vendor_class=PXE_BIOS, ciaddr=net.client_ip,
                                      extra={dhcp.OPT_VENDOR_SPECIFIC: item})
    assert reply is not None and reply.boot_file == "undionly.kpxe"
    sub = dhcp.parse_options(reply.options[dhcp.OPT_VENDOR_SPECIFIC])
    assert sub[dhcp.PXE_BOOT_ITEM] == b"\x80\x00\x00\x00"


def test_port_4011_discover_ignored(booted_lan: Lan) -> None:
    net = booted_lan.net
    assert booted_lan.client.discover(mac(0x73), (net.server_ip, 4011), arch=7,
                                      timeout=SHORT) is None


# --- relays and option 82 ---------------------------------------------------------------------


def test_configured_relay_gets_reply_with_option_82(booted_lan: Lan) -> None:
    net = booted_lan.net
    relay = client_socket(net.client, net.client_if, port=67)
    try:
        agent = PxeClient(relay)
        req = dhcp.build_request(mac(0x80), xid=4242, arch=7, giaddr=net.client_ip,
                                 extra={dhcp.OPT_RELAY_AGENT: b"\x01\x04port"})
        reply = agent.exchange(req, (net.server_ip, 67))
        assert reply is not None and reply.giaddr == net.client_ip
        assert reply.options[dhcp.OPT_RELAY_AGENT] == b"\x01\x04port"
        assert reply.boot_file == "ipxe.efi"
        # a giaddr that is not a configured relay: dropped, never answered
        bad = dhcp.build_request(mac(0x81), xid=4243, arch=7, giaddr="10.231.0.99")
        assert agent.exchange(bad, (net.server_ip, 67), timeout=SHORT) is None
    finally:
        relay.close()


def test_option_82_without_relay_ignored_not_echoed(pxe_lan: Lan) -> None:
    reply = pxe_lan.client.discover(mac(0x82), arch=7,
                                    extra={dhcp.OPT_RELAY_AGENT: b"\x01\x04port"})
    assert reply is not None
    assert dhcp.OPT_RELAY_AGENT not in reply.options


# --- malformed input, filters, counters --------------------------------------------------------


def _malformed() -> dict[str, bytes]:
    good = dhcp.build_request(mac(0x90), xid=1, arch=7)
    head = good[:dhcp.MIN_PACKET]
    cookie = bytearray(good)
    cookie[236] ^= 0xFF
    hlen = bytearray(good)
    hlen[2] = 16
    return {
        "truncated": good[:120],
        "bad_cookie": bytes(cookie),
        "bad_hlen": bytes(hlen),
        "option_overrun": head + bytes((53, 1, 1, 60, 90)) + b"PXEClient",
        "missing_end": head + bytes((53, 1, 1, 93, 2, 0, 7)),
        "duplicate_option_53": head + bytes((53, 1, 1, 53, 1, 1, 255)),
        "zero_length_option": head + bytes((53, 1, 1, 93, 0, 97, 0, 255)),
    }


def test_malformed_packets_dropped_counted_and_loop_survives(tmp_path: Path) -> None:
    with lan_on(NetnsPair(client_address=False), tmp_path,
                "--dhcp-allow-macs", f"{mac(0x91)},{mac(0x92)}") as lan:
        client = lan.client
        cases = _malformed()
        for data in cases.values():
            for _ in range(3):
                client.sock.sendto(data, ("255.255.255.255", 67))
        assert client.discover(mac(0x91), arch=7) is not None      # still answering
        assert client.discover(mac(0x93), arch=7, timeout=SHORT) is None  # not allowed
        assert client.discover(mac(0x92), arch=0) is not None
        assert client.discover(mac(0x94), arch=11, timeout=SHORT) is None
    stats = lan.stats
    dropped = stats["dhcp_dropped_total"]
    for reason in cases:
        assert dropped.get(f"reason={reason}") == 3, (reason, dropped)
    assert dropped["reason=mac_not_allowed"] == 1
    assert dropped["reason=no_bootfile"] == 1
    assert stats["dhcp_packets_out_total"]["port=dhcp,type=offer"] == 2
    assert stats["dhcp_packets_in_total"]["port=dhcp,type=discover"] == 4


def test_known_only_without_machines_answers_nobody(tmp_path: Path) -> None:
    with lan_on(NetnsPair(client_address=False), tmp_path, "--dhcp-known-only", "true") as lan:
        assert lan.client.discover(mac(0xA0), arch=7, timeout=SHORT) is None
    assert lan.stats["dhcp_dropped_total"]["reason=unknown_machine"] == 1


def test_configured_arm64_and_snponly(tmp_path: Path) -> None:
    net = NetnsPair(client_address=False)
    with lan_on(net, tmp_path, "--dhcp-bootfile-efi64", "snponly.efi",
                "--dhcp-bootfile-arm64", "arm64/ipxe.efi") as lan:
        client = lan.client
        arm = client.discover(mac(0xB0), arch=11, vendor_class=b"PXEClient:Arch:00011")
        x64 = client.discover(mac(0xB1), arch=9, vendor_class=b"PXEClient:Arch:00009")
        http = client.discover(mac(0xB2), arch=19, vendor_class=b"HTTPClient:Arch:00019")
    assert arm is not None and arm.boot_file == "arm64/ipxe.efi"
    assert x64 is not None and x64.boot_file == "snponly.efi"
    assert http is not None and http.boot_file == f"http://{net.server_ip}:8081/ipxe/arm64/ipxe.efi"


PXE_IA32 = b"PXEClient:Arch:00006:UNDI:003016"
HTTP_IA32 = b"HTTPClient:Arch:00015:UNDI:003001"


def _ia32_boots(lan: Lan, timeout: float) -> tuple[dhcp.DhcpPacket | None, ...]:
    """An IA32 UEFI client on each path: a PXE DISCOVER on 67, a boot-server
    REQUEST on 4011, an HTTP boot DISCOVER on 67."""
    net, client = lan.net, lan.client
    return (client.discover(mac(0xC0), arch=6, vendor_class=PXE_IA32, timeout=timeout),
            client.request(mac(0xC1), (net.server_ip, 4011), arch=6, vendor_class=PXE_IA32,
                           ciaddr=net.client_ip, timeout=timeout),
            client.discover(mac(0xC2), arch=15, vendor_class=HTTP_IA32, timeout=timeout))


def test_ia32_uefi_gets_no_x86_64_binary(tmp_path: Path) -> None:
    """Out of the box nothing fits a 32-bit UEFI client: no answer on any
    path (never the x86-64 ipxe.efi), each one counted."""
    with lan_on(NetnsPair(client_address=True), tmp_path) as lan:
        assert _ia32_boots(lan, SHORT) == (None, None, None)
    assert lan.stats["dhcp_dropped_total"]["reason=no_bootfile"] == 3
    assert not lan.stats.get("dhcp_packets_out_total")


def test_ia32_uefi_gets_the_configured_32bit_file(tmp_path: Path) -> None:
    net = NetnsPair(client_address=True)
    with lan_on(net, tmp_path, "--dhcp-bootfile-efi32", "i386/ipxe.efi") as lan:
        offer, ack, http = _ia32_boots(lan, 3.0)
        x64 = lan.client.discover(mac(0xC3), arch=7, vendor_class=PXE_EFI)
    assert offer is not None and offer.boot_file == "i386/ipxe.efi"
    assert ack is not None and ack.msg_type == dhcp.ACK and ack.boot_file == "i386/ipxe.efi"
    assert http is not None and http.boot_file == f"http://{net.server_ip}:8081/ipxe/i386/ipxe.efi"
    assert http.vendor_class == b"HTTPClient"
    assert x64 is not None and x64.boot_file == "ipxe.efi"     # x86-64 unchanged
