"""The DHCP codec: strict parsing (every malformed case by name), the
encoder as its inverse, agreement with scapy on valid packets, and a
hypothesis fuzz that the parser never fails other than MalformedPacket."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootsvc.wire import dhcp
from bootsvc.wire.dhcp import DhcpPacket, MalformedPacket, build_packet, parse_packet

MAC = "52:54:00:12:34:56"
UUID = bytes(range(16))


def discover(**kw: object) -> bytes:
    kw.setdefault("arch", 7)
    kw.setdefault("uuid", UUID)
    kw.setdefault("xid", 0x1234)
    return dhcp.build_request(MAC, **kw)  # type: ignore[arg-type]


def with_options(raw_options: bytes) -> bytes:
    """A valid header + cookie followed by ``raw_options`` verbatim."""
    return discover()[:dhcp.MIN_PACKET] + raw_options


def reason_of(data: bytes) -> str:
    with pytest.raises(MalformedPacket) as info:
        parse_packet(data)
    return info.value.reason


# --- valid packets -----------------------------------------------------------------


def test_parse_discover_fields() -> None:
    pkt = parse_packet(discover(user_class=b"iPXE"))
    assert pkt.op == dhcp.BOOTREQUEST
    assert pkt.xid == 0x1234
    assert pkt.mac == MAC
    assert pkt.msg_type == dhcp.DISCOVER and pkt.msg_name == "discover"
    assert pkt.client_arch == 7
    assert pkt.vendor_class.startswith(b"PXEClient")
    assert pkt.options[dhcp.OPT_CLIENT_UUID] == b"\x00" + UUID
    assert pkt.options[dhcp.OPT_USER_CLASS] == b"iPXE"
    assert pkt.ciaddr == pkt.giaddr == "0.0.0.0"


def test_build_then_parse_round_trip() -> None:
    packet = DhcpPacket(dhcp.BOOTREPLY, 0xDEADBEEF, bytes.fromhex("525400abcdef"), 3,
                        dhcp.FLAG_BROADCAST, "10.0.0.5", "10.0.0.6", "10.0.0.1", "10.0.0.254",
                        1, b"10.0.0.1", b"ipxe.efi",
                        {dhcp.OPT_MESSAGE_TYPE: b"\x02", dhcp.OPT_SERVER_ID: b"\n\x00\x00\x01",
                         dhcp.OPT_VENDOR_CLASS: b"PXEClient", 250: b"x" * 600})
    data = build_packet(packet)
    assert len(data) >= dhcp.MIN_REPLY
    assert parse_packet(data) == packet
    assert parse_packet(data).broadcast


def test_long_option_split_and_concatenated_rfc3396() -> None:
    data = build_packet(DhcpPacket(chaddr=b"\x02" * 6,
                                   options={dhcp.OPT_MESSAGE_TYPE: b"\x01", 43: b"a" * 300}))
    # two instances of option 43 on the wire, one value after parsing
    assert data.count(bytes((43, 255))) == 1
    assert parse_packet(data).options[43] == b"a" * 300


def test_padding_and_trailing_bytes_after_end_accepted() -> None:
    opts = b"\x00\x00" + bytes((53, 1, 1)) + b"\x00" + b"\xff" + b"junk"
    assert parse_packet(with_options(opts)).msg_type == dhcp.DISCOVER


def test_bootp_without_option_53_parses() -> None:
    assert parse_packet(with_options(b"\xff")).msg_type is None


def test_user_class_items_raw_and_rfc3004() -> None:
    assert b"iPXE" in dhcp.user_class_items(b"iPXE")
    assert b"iPXE" in dhcp.user_class_items(b"\x04iPXE\x03foo")
    assert b"iPXE" not in dhcp.user_class_items(b"\x05iPXEx")


# --- every malformed case, by name ----------------------------------------------------


def test_truncated_header() -> None:
    assert reason_of(discover()[:100]) == "truncated"
    assert reason_of(b"") == "truncated"
    assert reason_of(discover()[:dhcp.MIN_PACKET - 1]) == "truncated"


def test_oversized() -> None:
    assert reason_of(discover() + bytes(dhcp.MAX_PACKET)) == "oversized"


def test_bad_magic_cookie() -> None:
    data = bytearray(discover())
    data[236:240] = b"\x63\x82\x53\x64"
    assert reason_of(bytes(data)) == "bad_cookie"


def test_hlen_not_6() -> None:
    data = bytearray(discover())
    data[2] = 16
    assert reason_of(bytes(data)) == "bad_hlen"
    data[2] = 0
    assert reason_of(bytes(data)) == "bad_hlen"


def test_htype_not_ethernet() -> None:
    data = bytearray(discover())
    data[1] = 6
    assert reason_of(bytes(data)) == "bad_htype"


def test_bad_op() -> None:
    data = bytearray(discover())
    data[0] = 3
    assert reason_of(bytes(data)) == "bad_op"


def test_multicast_or_zero_chaddr() -> None:
    assert reason_of(dhcp.build_request("01:00:5e:00:00:01")) == "bad_chaddr"
    assert reason_of(dhcp.build_request("00:00:00:00:00:00")) == "bad_chaddr"


def test_option_length_past_the_end() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 60, 50)) + b"PXEClient")) == "option_overrun"


def test_option_code_without_length_byte() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 60)))) == "option_overrun"


def test_missing_end() -> None:
    assert reason_of(with_options(bytes((53, 1, 1)))) == "missing_end"
    assert reason_of(with_options(bytes((53, 1, 1, 0, 0, 0)))) == "missing_end"
    assert reason_of(with_options(b"")) == "missing_end"


def test_duplicate_option_53() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 53, 1, 3, 255)))) == "duplicate_option_53"


def test_duplicate_single_valued_option() -> None:
    opts = bytes((53, 1, 1, 93, 2, 0, 7, 93, 2, 0, 0, 255))
    assert reason_of(with_options(opts)) == "duplicate_option"


def test_zero_length_option_93() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 93, 0, 255)))) == "zero_length_option"


def test_zero_length_option_97() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 97, 0, 255)))) == "zero_length_option"


def test_zero_length_option_53() -> None:
    assert reason_of(with_options(bytes((53, 0, 255)))) == "zero_length_option"


def test_odd_length_option_93() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 93, 3, 0, 7, 0, 255)))) == \
        "bad_option_length"


def test_option_97_wrong_size_or_type() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 97, 5, 0, 1, 2, 3, 4, 255)))) == \
        "bad_option_length"
    assert reason_of(with_options(bytes((53, 1, 1, 97, 17, 1)) + bytes(16) + b"\xff")) == \
        "bad_option_value"


def test_bad_message_type_value() -> None:
    assert reason_of(with_options(bytes((53, 1, 0, 255)))) == "bad_option_value"
    assert reason_of(with_options(bytes((53, 1, 200, 255)))) == "bad_option_value"


def test_wrong_length_fixed_options() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 54, 3, 1, 2, 3, 255)))) == \
        "bad_option_length"
    assert reason_of(with_options(bytes((53, 2, 1, 1, 255)))) == "bad_option_length"


def test_option_overload_refused() -> None:
    assert reason_of(with_options(bytes((53, 1, 1, 52, 1, 3, 255)))) == "option_overload"


def test_malformed_reason_is_in_message() -> None:
    with pytest.raises(MalformedPacket, match="option 53 appears twice"):
        parse_packet(with_options(bytes((53, 1, 1, 53, 1, 1, 255))))


# --- scapy: agrees on valid packets, is lenient on broken ones ---------------------


def test_scapy_crafted_discover_parses_the_same() -> None:
    from scapy.layers.dhcp import BOOTP, DHCP

    raw = bytes(BOOTP(chaddr=bytes.fromhex("525400123456") + bytes(10), xid=77, flags=0x8000)
                / DHCP(options=[("message-type", "discover"), ("vendor_class_id", b"PXEClient"),
                                (93, b"\x00\x09"), (97, b"\x00" + UUID), "end"]))
    pkt = parse_packet(raw)
    assert (pkt.mac, pkt.xid, pkt.msg_type, pkt.client_arch) == (MAC, 77, dhcp.DISCOVER, 9)
    assert pkt.broadcast
    ours = parse_packet(discover())
    scapy_view = BOOTP(discover())
    assert scapy_view.xid == ours.xid
    assert dict(o for o in scapy_view[DHCP].options if isinstance(o, tuple))["message-type"] == 1


def test_scapy_is_lenient_where_we_are_strict() -> None:
    """Why a strict step stands before any decision (STYLE principle 2)."""
    from scapy.layers.dhcp import BOOTP, DHCP

    dup = with_options(bytes((53, 1, 1, 53, 1, 3)))          # duplicate 53, no END
    parsed = BOOTP(dup)
    assert DHCP in parsed                                    # scapy takes it
    assert reason_of(dup) == "duplicate_option_53"            # we do not


# --- fuzz ------------------------------------------------------------------------------


def _valid_packets() -> st.SearchStrategy[bytes]:
    option = st.tuples(st.integers(1, 254).filter(lambda c: c not in dhcp._CHECKED),
                       st.binary(max_size=40))
    return st.builds(
        lambda xid, mac, arch, opts, vc: dhcp.build_request(
            bytes([mac[0] & 0xFC | 0x02]) + mac[1:], xid=xid, arch=arch, vendor_class=vc,
            extra=dict(opts)),
        st.integers(0, 2**32 - 1), st.binary(min_size=6, max_size=6),
        st.one_of(st.none(), st.integers(0, 65535)), st.lists(option, max_size=6),
        st.one_of(st.none(), st.binary(min_size=1, max_size=40)))


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in edits:
        buf[pos % len(buf)] = value
    if cut is not None:
        buf = buf[:cut % (len(buf) + 1)]
    return bytes(buf)


fuzz_inputs = st.one_of(
    st.binary(max_size=600),
    st.builds(lambda d, tail: d[:dhcp.MIN_PACKET] + tail,
              _valid_packets(), st.binary(max_size=120)),
    st.builds(_mutate, _valid_packets(),
              st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=8),
              st.one_of(st.none(), st.integers(0, 10_000))),
)


@settings(max_examples=10_000, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(fuzz_inputs)
def test_fuzz_parser_only_raises_malformed_and_round_trips(data: bytes) -> None:
    try:
        pkt = parse_packet(data)
    except MalformedPacket as exc:
        assert exc.reason and " " not in exc.reason
        return
    # whatever parses re-encodes to something that parses to the same packet
    assert parse_packet(build_packet(pkt)) == pkt
    assert len(pkt.chaddr) == 6 and not pkt.chaddr[0] & 1


def test_header_layout_matches_rfc2131() -> None:
    data = discover()
    assert struct.unpack_from("!I", data, 236)[0] == dhcp.MAGIC_COOKIE
    assert data[28:34] == bytes.fromhex(MAC.replace(":", ""))


def test_reply_template_renders_what_build_packet_builds() -> None:
    fixed = DhcpPacket(dhcp.BOOTREPLY, sname=b"10.0.0.1", file=b"undionly.kpxe",
                       siaddr="10.0.0.1",
                       options={dhcp.OPT_MESSAGE_TYPE: b"\x02",
                                dhcp.OPT_SERVER_ID: b"\n\x00\x00\x01",
                                dhcp.OPT_VENDOR_CLASS: b"PXEClient",
                                dhcp.OPT_VENDOR_SPECIFIC: dhcp.PXE_BYPASS_DISCOVERY})
    template = dhcp.ReplyTemplate(fixed)
    chaddr = bytes.fromhex("525400abcdef")
    tail = {dhcp.OPT_CLIENT_UUID: b"\x00" + UUID, dhcp.OPT_RELAY_AGENT: b"\x01\x02ab"}
    full = DhcpPacket(dhcp.BOOTREPLY, 0xCAFEBABE, chaddr, 0, 0x8000, "10.0.0.7", "0.0.0.0",
                      "10.0.0.1", "10.0.0.254", 0, fixed.sname, fixed.file,
                      {**fixed.options, **tail})
    rendered = template.render(0xCAFEBABE, chaddr, 0x8000, dhcp.ip_bytes("10.0.0.7"),
                               dhcp.ip_bytes("10.0.0.254"),
                               dhcp.encode_options(tail, end=False))
    assert rendered == build_packet(full)
    assert parse_packet(rendered) == full
