"""The pure parts of a DHCP reply: where it goes, the lab-mode lease
options, the PXE boot item of a boot server request, the boot file field."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.responder import (
    Counters,
    decide_dest,
    lease_options,
    parse_boot_item,
    put_boot,
)
from bootsvc.dhcp.settings import SETTINGS, DhcpSettings
from bootsvc.policy.bootfile import BootAnswer
from bootsvc.wire import dhcp
from lpmos.config import Config

RELAY = "10.1.0.1"

# (giaddr, source, relayed, message type) -> destination
DEST = [
    (RELAY, ("10.1.0.1", 67), True, dhcp.OFFER, (RELAY, 67)),       # relayed: to the relay
    (RELAY, ("10.1.0.1", 67), True, dhcp.NAK, (RELAY, 67)),         # a NAK too
    ("0.0.0.0", ("0.0.0.0", 68), False, dhcp.OFFER, ("255.255.255.255", 68)),  # no address
    ("0.0.0.0", ("10.0.0.7", 68), False, dhcp.ACK, ("10.0.0.7", 68)),         # unicast back
    ("0.0.0.0", ("10.0.0.7", 4011), False, dhcp.ACK, ("10.0.0.7", 4011)),     # its own port
    ("0.0.0.0", ("10.0.0.7", 68), False, dhcp.NAK, ("255.255.255.255", 68)),  # NAK: broadcast
]


@pytest.mark.parametrize(("giaddr", "src", "relayed", "msg_type", "expected"), DEST)
def test_decide_dest(giaddr: str, src: tuple[str, int], relayed: bool, msg_type: int,
                     expected: tuple[str, int]) -> None:
    assert decide_dest(giaddr, src, relayed, 67, msg_type) == expected


def _settings(**overrides: object) -> DhcpSettings:
    config = Config({s.key: s.parse(s.default) for s in SETTINGS}, {})
    return DhcpSettings.from_config(config.with_values(**overrides))


@pytest.mark.parametrize(("overrides", "expected"), [
    ({}, {dhcp.OPT_SUBNET_MASK: bytes([255, 255, 255, 0])}),
    ({"dhcp__router": "10.0.0.1"}, {dhcp.OPT_SUBNET_MASK: bytes([255, 255, 255, 0]),
                                     dhcp.OPT_ROUTER: bytes([10, 0, 0, 1])}),
    ({"dhcp__dns": ["10.0.0.2", "10.0.0.3"], "dhcp__netmask": "255.255.0.0"},
     {dhcp.OPT_SUBNET_MASK: bytes([255, 255, 0, 0]),
      dhcp.OPT_DNS: bytes([10, 0, 0, 2, 10, 0, 0, 3])}),
])
def test_lease_options(overrides: dict[str, object], expected: dict[int, bytes]) -> None:
    assert lease_options(_settings(**overrides)) == expected


ITEM = b"\x80\x00\x00\x00"


@pytest.mark.parametrize(("vendor", "expected"), [
    (None, None),
    (b"", None),
    (dhcp.pxe_vendor_options({dhcp.PXE_BOOT_ITEM: ITEM}), ITEM),
    (dhcp.pxe_vendor_options({dhcp.PXE_BOOT_ITEM: b"\x80\x00"}), None),    # not 4 bytes
    (dhcp.pxe_vendor_options({6: b"\x08"}), None),                         # no item
    (bytes([dhcp.PXE_BOOT_ITEM, 9, 1]), None),                             # overruns
])
def test_parse_boot_item(vendor: bytes | None, expected: bytes | None) -> None:
    options = {} if vendor is None else {dhcp.OPT_VENDOR_SPECIFIC: vendor}
    pkt = dhcp.DhcpPacket(dhcp.BOOTREQUEST, options=options)
    assert parse_boot_item(pkt) == expected


@pytest.mark.parametrize(("length", "in_file"), [(1, True), (127, True), (128, False)])
def test_put_boot_uses_option_67_for_a_long_name(length: int, in_file: bool) -> None:
    name = "x" * length
    answer = BootAnswer(kind="http", filename=name, vendor_class="HTTPClient", family="efi64",
                        arch=16)
    reply = dhcp.DhcpPacket(dhcp.BOOTREPLY)
    options: dict[int, bytes] = {}
    put_boot(reply, options, answer, "10.0.0.1")
    assert reply.siaddr == "10.0.0.1"
    assert (reply.file == name.encode()) is in_file
    assert (options.get(dhcp.OPT_BOOTFILE) == name.encode()) is not in_file


def test_counters_flush_moves_everything_once() -> None:
    class Registry:
        def __init__(self) -> None:
            self.got: list[tuple[str, float, dict[str, str]]] = []

        def inc(self, name: str, n: float, **labels: str) -> None:
            self.got.append((name, n, labels))

    counters = Counters()
    counters.drop("truncated")
    counters.drop("truncated")
    counters.count_packet("dhcp_packets_in_total", dhcp.DISCOVER, "dhcp")
    counters.count("dhcp_nak_total", reason="wrong_server")
    registry = Registry()
    counters.flush(registry)
    assert sorted(registry.got, key=lambda g: g[0]) == [
        ("dhcp_dropped_total", 2, {"reason": "truncated"}),
        ("dhcp_nak_total", 1, {"reason": "wrong_server"}),
        ("dhcp_packets_in_total", 1, {"port": "dhcp", "type": "discover"}),
    ]
    counters.flush(registry)
    assert len(registry.got) == 3
