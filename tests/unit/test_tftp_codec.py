"""The TFTP codec: strict parsing, building, option negotiation."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bootsvc.wire import tftp
from bootsvc.wire.tftp import (
    Ack,
    Data,
    Error,
    ErrorCode,
    Limits,
    MalformedPacket,
    Oack,
    Opcode,
    OptionRefused,
    Request,
)


def test_parse_request_plain_rrq():
    req = tftp.parse_request(b"\x00\x01undionly.kpxe\x00octet\x00")
    assert req == Request(Opcode.RRQ, "undionly.kpxe", "octet", ())


def test_parse_request_options_lowercased_in_order():
    req = tftp.parse_request(b"\x00\x01f\x00OCTET\x00TSIZE\x000\x00BlkSize\x001468\x00"
                             b"windowsize\x0016\x00")
    assert req.mode == "octet"
    assert req.options == (("tsize", "0"), ("blksize", "1468"), ("windowsize", "16"))
    assert req.option("blksize") == "1468"
    assert req.option("timeout") is None


def test_parse_request_wrq_is_parsed_for_the_server_to_refuse():
    assert tftp.parse_request(b"\x00\x02f\x00octet\x00").opcode == Opcode.WRQ


def test_parse_request_tolerates_nul_padding():
    req = tftp.parse_request(b"\x00\x01f\x00octet\x00\x00\x00\x00")
    assert req.filename == "f" and req.options == ()
    req = tftp.parse_request(b"\x00\x01f\x00octet\x00tsize\x000\x00\x00")
    assert req.options == (("tsize", "0"),)


@pytest.mark.parametrize("datagram, reason", [
    (b"", "truncated"),
    (b"\x00", "truncated"),
    (b"\x00\x03\x00\x01", "not_a_request"),
    (b"\x00\x01", "no_terminator"),
    (b"\x00\x01f", "no_terminator"),
    (b"\x00\x01f\x00", "no_terminator"),
    (b"\x00\x01f\x00octet", "no_terminator"),
    (b"\x00\x01\x00octet\x00", "empty_name"),
    (b"\x00\x01f\x01x\x00octet\x00", "non_printable_name"),
    (b"\x00\x01f\xffx\x00octet\x00", "non_printable_name"),
    (b"\x00\x01" + b"a" * 256 + b"\x00octet\x00", "name_too_long"),
    (b"\x00\x01" + b"a" * 600 + b"\x00octet\x00", "too_long"),
    (b"\x00\x01f\x00mail\x00", "bad_mode"),
    (b"\x00\x01f\x00\x00", "bad_mode"),
    (b"\x00\x01f\x00octet\x00blksize\x00", "unpaired_option"),
    (b"\x00\x01f\x00octet\x00blksize\x00512\x00blksize\x001024\x00", "duplicate_option"),
    (b"\x00\x01f\x00octet\x00" + b"".join(b"o%d\x001\x00" % i for i in range(17)),
     "too_many_options"),
    (b"\x00\x01f\x00octet\x00b\x01\x001\x00", "bad_option_name"),
    (b"\x00\x01f\x00octet\x00" + b"o" * 33 + b"\x001\x00", "bad_option_name"),
    (b"\x00\x01f\x00octet\x00blksize\x00" + b"9" * 33 + b"\x00", "bad_option_value"),
])
def test_parse_request_refuses_malformed(datagram, reason):
    with pytest.raises(MalformedPacket) as err:
        tftp.parse_request(datagram)
    assert err.value.reason == reason


def test_parse_packet_each_type_round_trips():
    assert tftp.parse_packet(tftp.build_data(7, b"abc")) == Data(7, b"abc")
    assert tftp.parse_packet(tftp.build_data(65536 + 3, b"")) == Data(3, b"")
    assert tftp.parse_packet(tftp.build_ack(65535)) == Ack(65535)
    assert tftp.parse_packet(tftp.build_error(ErrorCode.FILE_NOT_FOUND, "nope")) == \
        Error(1, "nope")
    assert tftp.parse_packet(tftp.build_oack([("blksize", 1468), ("tsize", 5)])) == \
        Oack((("blksize", "1468"), ("tsize", "5")))
    req = tftp.build_request("a/b", options=[("blksize", 8)])
    assert tftp.parse_packet(req) == Request(Opcode.RRQ, "a/b", "octet", (("blksize", "8"),))


@pytest.mark.parametrize("datagram, reason", [
    (b"\x00\x03\x00", "truncated"),
    (b"\x00\x04\x00", "truncated"),
    (b"\x00\x04\x00\x01\x00", "too_long"),
    (b"\x00\x05\x00", "truncated"),
    (b"\x00\x07", "bad_opcode"),
    (b"\xff\xff\x00\x00", "bad_opcode"),
    (b"\x00\x06blksize", "no_terminator"),
    (b"\x00\x03\x00\x01" + b"x" * 65465, "too_long"),
])
def test_parse_packet_refuses_malformed(datagram, reason):
    with pytest.raises(MalformedPacket) as err:
        tftp.parse_packet(datagram)
    assert err.value.reason == reason


def test_parse_ack_fast_path_matches_parse_packet():
    assert tftp.parse_ack(b"\x00\x04\x12\x34") == 0x1234
    assert tftp.parse_ack(b"\x00\x05\x00\x01") is None
    assert tftp.parse_ack(b"\x00\x04\x00") is None


def test_build_error_truncates_message():
    packet = tftp.build_error(0, "x" * 1000)
    assert len(packet) == 4 + tftp.MAX_ERROR_MESSAGE_BYTES + 1
    assert packet.endswith(b"\x00")


def test_decide_options_none_means_no_oack():
    n = tftp.decide_options([], 100, Limits())
    assert (n.blksize, n.windowsize, n.oack) == (512, 1, ())


def test_decide_options_oack_only_what_was_asked_in_client_order():
    n = tftp.decide_options([("windowsize", "8"), ("tsize", "0"), ("multicast", "")],
                            12345, Limits())
    assert n.oack == (("windowsize", "8"), ("tsize", "12345"))
    assert n.blksize == 512 and n.windowsize == 8


def test_decide_options_clamps_to_limits():
    limits = Limits(max_blksize=1468, max_windowsize=16)
    n = tftp.decide_options({"blksize": "65464", "windowsize": "65535"}, 0, limits)
    assert (n.blksize, n.windowsize) == (1468, 16)
    assert dict(n.oack) == {"blksize": "1468", "windowsize": "16"}


def test_decide_options_timeout_accepted_and_echoed():
    n = tftp.decide_options({"timeout": "3"}, 0, Limits())
    assert n.timeout == 3.0 and n.oack == (("timeout", "3"),)


@pytest.mark.parametrize("name, value", [
    ("blksize", "7"), ("blksize", "65465"), ("blksize", "-1"), ("blksize", "x"),
    ("blksize", ""), ("timeout", "0"), ("timeout", "256"), ("windowsize", "0"),
    ("windowsize", "65536"), ("tsize", "abc"), ("blksize", "99999999999"),
])
def test_decide_options_refuses_out_of_range(name, value):
    with pytest.raises(OptionRefused) as err:
        tftp.decide_options({name: value}, 10, Limits())
    assert err.value.reason == f"bad_{name}"


def test_block_count_last_block_always_short():
    assert tftp.block_count(0, 512) == 1
    assert tftp.block_count(511, 512) == 1
    assert tftp.block_count(512, 512) == 2
    assert tftp.block_count(513, 512) == 2


def test_unwrap_block_across_rollover():
    assert tftp.unwrap_block(65535, 65535) == 65535
    assert tftp.unwrap_block(0, 65536) == 65536
    assert tftp.unwrap_block(65535, 65540) == 65535
    assert tftp.unwrap_block(3, 65540) == 65539


def test_to_netascii():
    assert tftp.to_netascii(b"a\nb\rc") == b"a\r\nb\r\x00c"


def test_data_header_rolls_over():
    assert tftp.build_data_header(65536) == b"\x00\x03\x00\x00"
    assert tftp.build_data_header(65537) == b"\x00\x03\x00\x01"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=600))
def test_parse_packet_never_raises_anything_else(datagram):
    try:
        tftp.parse_packet(datagram)
    except MalformedPacket:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["blksize", "timeout", "tsize", "windowsize", "x"]),
                          st.text(alphabet="0123456789-x", max_size=12)),
                max_size=6, unique_by=lambda kv: kv[0]),
       st.integers(0, 2**40))
def test_decide_options_results_always_in_range(options, size):
    try:
        n = tftp.decide_options(options, size, Limits(max_blksize=1468, max_windowsize=64))
    except OptionRefused:
        return
    assert 8 <= n.blksize <= 1468
    assert 1 <= n.windowsize <= 64
    assert 1 <= n.timeout <= 255
    assert {k for k, _ in n.oack} <= {k for k, _ in options}
