"""DHCPv6 codec (bootsvc.wire.dhcp6) and boot file decision
(bootsvc.policy.bootfile6, RFC 5970): tables, and a bounded fuzz that the
codec returns a message or MalformedMessage and nothing else."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootsvc.policy.bootfile import BootPolicy, BootRefusal
from bootsvc.policy.bootfile6 import Boot6Answer, Boot6Policy, decide_bootfile6, tftp_url
from bootsvc.wire import dhcp6
from bootsvc.wire.dhcp6 import (
    OPT_BOOTFILE_PARAM,
    OPT_BOOTFILE_URL,
    OPT_CLIENT_ARCH_TYPE,
    OPT_CLIENTID,
    OPT_ELAPSED_TIME,
    OPT_IA_NA,
    OPT_INTERFACE_ID,
    OPT_NII,
    OPT_ORO,
    OPT_RELAY_MSG,
    OPT_USER_CLASS,
    OPT_VENDOR_CLASS,
    MalformedMessage,
    RelayMessage,
    build_message,
    build_relay_reply,
    option,
    parse_message,
)

MAC = bytes.fromhex("525400123456")
DUID = dhcp6.duid_ll(MAC)
XID = b"\x01\x02\x03"
PXE = b"PXEClient:Arch:00007:UNDI:003016"
HTTP = b"HTTPClient:Arch:00016:UNDI:003001"


def vendor(data: bytes, enterprise: int = 343) -> bytes:
    return struct.pack("!I", enterprise) + dhcp6.length_prefix([data])


def solicit(arch: int | None = 7, vc: bytes | None = PXE, user: list[bytes] | None = None,
            extra: tuple[tuple[int, bytes], ...] = ()) -> bytes:
    """What OVMF's PXE over IPv6 sends, roughly: client id, ORO (59, 60),
    elapsed time, IA_NA, arch 61, NII 62, vendor class 16."""
    opts: list[tuple[int, bytes]] = [
        (OPT_CLIENTID, DUID), (OPT_ORO, struct.pack("!HHH", 59, 60, 23)),
        (OPT_ELAPSED_TIME, b"\x00\x00"), (OPT_IA_NA, b"\x00\x00\x00\x01" + bytes(8)),
        (OPT_NII, b"\x01\x03\x00")]
    if arch is not None:
        opts.append((OPT_CLIENT_ARCH_TYPE, struct.pack("!H", arch)))
    if vc is not None:
        opts.append((OPT_VENDOR_CLASS, vendor(vc)))
    if user is not None:
        opts.append((OPT_USER_CLASS, dhcp6.length_prefix(user)))
    return build_message(dhcp6.SOLICIT, XID, [*opts, *extra])


def relay(inner: bytes, hops: int = 0, *, interface_id: bytes | None = b"eth0") -> bytes:
    opts = option(OPT_RELAY_MSG, inner)
    if interface_id is not None:
        opts = option(OPT_INTERFACE_ID, interface_id) + opts
    return bytes([dhcp6.RELAY_FORW, hops]) + bytes(16) + b"\xfe\x80" + bytes(14) + opts


def test_a_solicit_parses_with_every_field() -> None:
    msg = parse_message(solicit(user=[b"iPXE"]))
    assert isinstance(msg, dhcp6.Dhcp6Message)
    assert msg.name == "solicit" and msg.transaction_id == XID
    assert msg.client_id == DUID and msg.client_arches == (7,)
    assert msg.vendor_classes == [(343, [PXE])] and msg.user_classes == [b"iPXE"]
    assert msg.ia_na_iaids == [b"\x00\x00\x00\x01"]


def test_relayed_messages_nest_and_answer_through_each_relay() -> None:
    raw = relay(relay(solicit(), 0, interface_id=b"port-7"), 1, interface_id=None)
    msg = parse_message(raw)
    assert isinstance(msg, RelayMessage) and msg.depth == 2
    assert msg.client_message.client_arches == (7,)
    assert isinstance(msg.inner, RelayMessage) and msg.inner.interface_id == b"port-7"
    answer = build_message(dhcp6.ADVERTISE, XID, [(OPT_BOOTFILE_URL, b"tftp://[fd00::1]/x")])
    reply = build_relay_reply(msg, answer)
    assert reply[0] == dhcp6.RELAY_REPL and reply[1] == 1
    # the inner RELAY-REPL, with the Interface-Id echoed, carries the answer
    outer_opts = dhcp6.options_of(reply, dhcp6.RELAY_HEADER)
    inner = dict(outer_opts)[OPT_RELAY_MSG]
    assert inner[0] == dhcp6.RELAY_REPL and inner[1] == 0
    inner_opts = dict(dhcp6.options_of(inner, dhcp6.RELAY_HEADER))
    assert inner_opts[OPT_INTERFACE_ID] == b"port-7" and inner_opts[OPT_RELAY_MSG] == answer


@pytest.mark.parametrize(("raw", "reason"), [
    (b"\x01\x02", "truncated"),
    (b"\x01" + bytes(5000), "oversized"),
    (build_message(dhcp6.ADVERTISE, XID, []), "bad_type"),
    (build_message(dhcp6.REPLY, XID, []), "bad_type"),
    (b"\x63\x00\x00\x00", "bad_type"),
    (build_message(dhcp6.SOLICIT, XID, []) + b"\x00\x01\x00", "option_overrun"),
    (build_message(dhcp6.SOLICIT, XID, []) + b"\x00\x01\x00\x09abc", "option_overrun"),
    (solicit(extra=((OPT_CLIENTID, DUID),)), "duplicate_option"),
    (solicit(arch=None, extra=((OPT_CLIENT_ARCH_TYPE, b"\x00\x07\x00"),)), "bad_option_length"),
    (solicit(arch=None, extra=((OPT_CLIENT_ARCH_TYPE, b""),)), "bad_option_length"),
    (build_message(dhcp6.SOLICIT, XID, [(OPT_ELAPSED_TIME, b"\x00")]), "bad_option_length"),
    (build_message(dhcp6.SOLICIT, XID, [(OPT_CLIENTID, b"\x00")]), "bad_option_length"),
    (build_message(dhcp6.SOLICIT, XID, [(OPT_CLIENTID, bytes(131))]), "bad_option_length"),
    (build_message(dhcp6.SOLICIT, XID, [(OPT_NII, b"\x01")]), "bad_option_length"),
    (build_message(dhcp6.SOLICIT, XID, [(OPT_IA_NA, b"\x00" * 4)]), "bad_option_length"),
    (solicit(vc=None, extra=((OPT_VENDOR_CLASS, b"\x00\x00\x01\x57\x00\x20PXE"),)),
     "bad_option_value"),
    (solicit(extra=((OPT_USER_CLASS, b"\x00\x05iP"),)), "bad_option_value"),
    (solicit(extra=((OPT_BOOTFILE_PARAM, dhcp6.length_prefix([b"x" * 1100])),)),
     "oversized_option"),
    (solicit(extra=((OPT_BOOTFILE_URL, b"h" * 1100),)), "oversized_option"),
    (relay(solicit(), hops=9), "relay_loop"),
    (bytes([dhcp6.RELAY_FORW, 0]) + bytes(20), "truncated"),
    (bytes([dhcp6.RELAY_FORW, 0]) + bytes(32), "relay_without_message"),
    (relay(relay(solicit(), 3), 3), "relay_loop"),
])
def test_bad_messages_are_refused_by_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(MalformedMessage) as exc:
        parse_message(raw)
    assert exc.value.reason == reason


def test_relays_nested_past_the_hop_limit_are_a_loop() -> None:
    raw = solicit()
    for hops in range(9):       # 9 relays: hop counts 0..8, one level too deep
        raw = relay(raw, hops, interface_id=None)
    with pytest.raises(MalformedMessage) as exc:
        parse_message(raw)
    assert exc.value.reason == "relay_loop"


POLICY = Boot6Policy(BootPolicy(script_url="http://[fd00::1]:8080/boot.ipxe",
                                http_base="http://[fd00::1]:8080/ipxe"),
                     tftp_address="fd00:0:0::1")


@pytest.mark.parametrize(("arch", "vc", "user", "expected"), [
    (7, PXE, None, "tftp://[fd00::1]/ipxe.efi"),                  # OVMF PXE over IPv6
    (9, PXE, None, "tftp://[fd00::1]/ipxe.efi"),
    (16, HTTP, None, "http://[fd00::1]:8080/ipxe/ipxe.efi"),       # UEFI HTTP boot over IPv6
    (7, PXE, [b"iPXE"], "http://[fd00::1]:8080/boot.ipxe"),        # iPXE: the script, no loop
    (0, PXE, None, "tftp://[fd00::1]/undionly.kpxe"),
    (11, PXE, None, "no_bootfile"),                                # arm64: no binary configured
    (16, PXE, None, "arch_class_mismatch"),
    (7, b"MSFT 5.0", None, "not_boot_client"),
    (7, None, None, "not_boot_client"),
    (None, PXE, None, "missing_arch"),
    (4242, PXE, None, "unsupported_arch"),                          # a bogus architecture
])
def test_boot_file_table(arch: int | None, vc: bytes | None, user: list[bytes] | None,
                         expected: str) -> None:
    msg = parse_message(solicit(arch=arch, vc=vc, user=user))
    assert isinstance(msg, dhcp6.Dhcp6Message)
    decision = decide_bootfile6(msg, POLICY)
    if isinstance(decision, Boot6Answer):
        assert decision.url == expected
    else:
        assert isinstance(decision, BootRefusal) and decision.reason == expected


def test_a_known_arch_wins_over_an_unknown_one_and_tftp_needs_an_address() -> None:
    raw = solicit(arch=None, extra=((OPT_CLIENT_ARCH_TYPE, struct.pack("!HH", 4242, 7)),))
    msg = parse_message(raw)
    assert isinstance(msg, dhcp6.Dhcp6Message)
    answer = decide_bootfile6(msg, POLICY)
    assert isinstance(answer, Boot6Answer) and answer.answer.arch == 7
    refused = decide_bootfile6(msg, Boot6Policy(POLICY.boot))
    assert isinstance(refused, BootRefusal) and refused.reason == "no_tftp_address"
    assert tftp_url("FD00::0:1", "a/b.efi") == "tftp://[fd00::1]/a/b.efi"


_option = st.tuples(st.integers(0, 70), st.binary(max_size=40))


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(
    st.binary(max_size=300),
    st.lists(_option, max_size=12).map(lambda o: build_message(dhcp6.SOLICIT, XID, o)),
    st.tuples(st.integers(0, 12), st.lists(_option, max_size=6)).map(
        lambda t: relay(build_message(dhcp6.SOLICIT, XID, t[1]), t[0])),
))
def test_fuzz_parse_gives_a_message_or_malformed(raw: bytes) -> None:
    try:
        msg = parse_message(raw)
    except MalformedMessage as exc:
        assert exc.reason and len(exc.reason) < 32
        return
    inner = msg.client_message if isinstance(msg, RelayMessage) else msg
    decision = decide_bootfile6(inner, POLICY)     # the decision never raises either
    assert isinstance(decision, Boot6Answer | BootRefusal)


# -- the answers (bootsvc.policy.dhcp6_answer) ---------------------------------------------

from bootsvc.policy.dhcp6_answer import (  # noqa: E402
    PROXY_PORT,
    Answer6,
    Lease6,
    NoAnswer,
    answer_full,
    answer_proxy,
)

SERVER = dhcp6.duid_ll(bytes.fromhex("02aabbccddee"))


def _reply_options(payload: bytes) -> dict[int, bytes]:
    return dict(dhcp6.options_of(payload, 4))


def _msg(raw: bytes) -> dhcp6.Dhcp6Message:
    msg = parse_message(raw)
    assert isinstance(msg, dhcp6.Dhcp6Message)
    return msg


def test_proxy_advertise_is_an_edk2_proxy_binl_offer() -> None:
    answer = answer_proxy(_msg(solicit()), POLICY, SERVER)
    assert isinstance(answer, Answer6) and answer.msg_type == dhcp6.ADVERTISE
    assert answer.payload[1:4] == XID
    opts = _reply_options(answer.payload)
    assert opts[dhcp6.OPT_SERVERID] == SERVER and opts[dhcp6.OPT_CLIENTID] == DUID
    assert opts[OPT_BOOTFILE_URL] == b"tftp://[fd00::1]/ipxe.efi"
    # EDK2: enterprise 343, data at offset 6 starts with PXEClient, length >= 13
    vc = opts[OPT_VENDOR_CLASS]
    assert vc[:4] == struct.pack("!I", 343) and vc[6:15] == b"PXEClient" and len(vc) >= 13
    # an IA_NA with a non-success status: no address, it stays a proxy offer
    ia = opts[OPT_IA_NA]
    status = dict(dhcp6.options_of(ia, 12))[dhcp6.OPT_STATUS_CODE]
    assert struct.unpack("!H", status[:2])[0] == dhcp6.STATUS_NO_ADDRS_AVAIL


def test_proxy_reply_on_the_boot_service_port() -> None:
    raw = build_message(dhcp6.REQUEST, XID, [(dhcp6.OPT_SERVERID, SERVER),
                                             (OPT_CLIENTID, DUID),
                                             (OPT_CLIENT_ARCH_TYPE, b"\x00\x07"),
                                             (OPT_VENDOR_CLASS, vendor(PXE))])
    answer = answer_proxy(_msg(raw), POLICY, SERVER, port=PROXY_PORT)
    assert isinstance(answer, Answer6) and answer.msg_type == dhcp6.REPLY
    opts = _reply_options(answer.payload)
    assert opts[OPT_BOOTFILE_URL] == b"tftp://[fd00::1]/ipxe.efi"
    assert OPT_IA_NA not in opts
    other = dhcp6.duid_ll(bytes.fromhex("021111111111"))
    raw_other = build_message(dhcp6.REQUEST, XID, [(dhcp6.OPT_SERVERID, other),
                                                   (OPT_CLIENTID, DUID),
                                                   (OPT_CLIENT_ARCH_TYPE, b"\x00\x07"),
                                                   (OPT_VENDOR_CLASS, vendor(PXE))])
    refused = answer_proxy(_msg(raw_other), POLICY, SERVER)
    assert isinstance(refused, NoAnswer) and refused.reason == "not_for_us"


@pytest.mark.parametrize(("raw", "port", "reason"), [
    (solicit(vc=b"MSFT 5.0"), 547, "not_boot_client"),
    (solicit(), PROXY_PORT, "unexpected_type"),
    (build_message(dhcp6.RENEW, XID, [(OPT_CLIENTID, DUID)]), 547, "unexpected_type"),
    (build_message(dhcp6.REQUEST, XID, [(OPT_CLIENTID, DUID)]), 547, "not_for_us"),
    (solicit(arch=4242), 547, "unsupported_arch"),
])
def test_proxy_stays_silent_with_a_reason(raw: bytes, port: int, reason: str) -> None:
    answer = answer_proxy(_msg(raw), POLICY, SERVER, port=port)
    assert isinstance(answer, NoAnswer) and answer.reason == reason


def test_full_mode_offers_and_binds_the_lease_with_the_boot_options() -> None:
    lease = Lease6("fd00::1:10", preferred=600, valid=1200)
    advertise = answer_full(_msg(solicit(arch=16, vc=HTTP)), POLICY, SERVER, lease)
    assert isinstance(advertise, Answer6) and advertise.msg_type == dhcp6.ADVERTISE
    opts = _reply_options(advertise.payload)
    assert opts[OPT_BOOTFILE_URL] == b"http://[fd00::1]:8080/ipxe/ipxe.efi"
    assert opts[OPT_VENDOR_CLASS][6:16] == b"HTTPClient"
    ia = opts[OPT_IA_NA]
    assert ia[:4] == b"\x00\x00\x00\x01" and struct.unpack("!II", ia[4:12]) == (300, 480)
    addr = dict(dhcp6.options_of(ia, 12))[dhcp6.OPT_IAADDR]
    assert addr[:16] == bytes.fromhex("fd000000000000000000000000010010")
    assert struct.unpack("!II", addr[16:24]) == (600, 1200)
    request = build_message(dhcp6.REQUEST, XID, [
        (dhcp6.OPT_SERVERID, SERVER), (OPT_CLIENTID, DUID), (OPT_IA_NA, bytes(12)),
        (OPT_CLIENT_ARCH_TYPE, b"\x00\x07"), (OPT_VENDOR_CLASS, vendor(PXE))])
    reply = answer_full(_msg(request), POLICY, SERVER, lease)
    assert isinstance(reply, Answer6) and reply.msg_type == dhcp6.REPLY and reply.lease == lease
    full = answer_full(_msg(solicit()), POLICY, SERVER, None)
    assert isinstance(full, Answer6)
    status = dict(dhcp6.options_of(_reply_options(full.payload)[OPT_IA_NA], 12))
    assert struct.unpack("!H", status[dhcp6.OPT_STATUS_CODE][:2])[0] == \
        dhcp6.STATUS_NO_ADDRS_AVAIL
    release = answer_full(_msg(build_message(dhcp6.RELEASE, XID, [
        (dhcp6.OPT_SERVERID, SERVER), (OPT_CLIENTID, DUID)])), POLICY, SERVER, lease)
    assert isinstance(release, Answer6) and release.boot is None
    no_ia = answer_full(_msg(build_message(dhcp6.SOLICIT, XID, [
        (OPT_CLIENTID, DUID), (OPT_CLIENT_ARCH_TYPE, b"\x00\x07"),
        (OPT_VENDOR_CLASS, vendor(PXE))])), POLICY, SERVER, lease)
    assert isinstance(no_ia, NoAnswer) and no_ia.reason == "no_ia_na"
