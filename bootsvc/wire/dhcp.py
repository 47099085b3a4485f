"""DHCP/BOOTP packet codec (RFC 2131, 2132, 3396, 4578; PXE 2.1).  Pure.

:func:`parse_packet` turns a datagram into a :class:`DhcpPacket` or raises
:class:`MalformedPacket` whose ``reason`` is a short, bounded token (used as a
metric label) and whose message says what exactly is wrong.  It is strict
where lenient parsers (scapy) are not, because every field it lets through
reaches a boot decision:

* ``truncated`` — shorter than the 236-byte BOOTP header + 4-byte cookie;
* ``oversized`` — longer than :data:`MAX_PACKET`;
* ``bad_op`` / ``bad_htype`` / ``bad_hlen`` — op not 1/2, hardware type not
  Ethernet, hardware address length not 6;
* ``bad_chaddr`` — all-zero or multicast client MAC (no NIC boots from one);
* ``bad_cookie`` — magic cookie is not 99.130.83.99;
* ``option_overrun`` — an option's length byte, or its value, runs past the end;
* ``missing_end`` — the options end without the END (255) option;
* ``duplicate_option_53`` / ``duplicate_option`` — a single-valued option
  appears twice (other options repeat legitimately and are concatenated,
  RFC 3396);
* ``zero_length_option`` — options 50, 53, 54, 60, 61, 93, 94, 97 with no value;
* ``bad_option_length`` / ``bad_option_value`` — e.g. option 93 of odd length,
  option 97 not 17 bytes or not type 0, option 53 not 1..18;
* ``option_overload`` — option 52 (options in sname/file) is not supported.

Anything after the END option is ignored (clients pad with zeros).

:func:`build_packet` is the inverse.  It is hand-written (``struct`` and one
``bytes.join``) because it sits on the hot path: a scapy build of one OFFER
costs about 250 us, a ceiling near 3,000 answers per second, while this
costs a few microseconds (``python -m bench.dhcp_bench`` measures both).
scapy is kept for crafting and sniffing in tests only.

No sockets, clocks, logging or store access in this module.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

# --- constants (RFC 2131 section 2, RFC 2132, RFC 4578) ------------------------

BOOTREQUEST = 1
BOOTREPLY = 2
HTYPE_ETHERNET = 1
MAGIC_COOKIE = 0x63825363          # 99.130.83.99
HEADER_LEN = 236                   # fixed BOOTP header
MIN_PACKET = HEADER_LEN + 4        # header + cookie
MAX_PACKET = 4096                  # larger than any Ethernet-framed DHCP packet we accept
MIN_REPLY = 300                    # BOOTP minimum; some ROMs drop shorter replies
FLAG_BROADCAST = 0x8000

# message types (option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
MESSAGE_NAMES = {
    DISCOVER: "discover", OFFER: "offer", REQUEST: "request", DECLINE: "decline",
    ACK: "ack", NAK: "nak", RELEASE: "release", INFORM: "inform",
}

# option codes
OPT_PAD = 0
OPT_SUBNET_MASK = 1
OPT_ROUTER = 3
OPT_DNS = 6
OPT_HOSTNAME = 12
OPT_VENDOR_SPECIFIC = 43           # PXE vendor options (encapsulated)
OPT_REQUESTED_IP = 50
OPT_LEASE_TIME = 51
OPT_OVERLOAD = 52
OPT_MESSAGE_TYPE = 53
OPT_SERVER_ID = 54
OPT_PARAM_REQUEST = 55
OPT_MESSAGE = 56
OPT_MAX_SIZE = 57
OPT_RENEWAL_T1 = 58
OPT_REBINDING_T2 = 59
OPT_VENDOR_CLASS = 60
OPT_CLIENT_ID = 61
OPT_TFTP_SERVER = 66
OPT_BOOTFILE = 67
OPT_USER_CLASS = 77
OPT_RELAY_AGENT = 82
OPT_CLIENT_ARCH = 93
OPT_CLIENT_NDI = 94
OPT_CLIENT_UUID = 97
OPT_IPXE = 175                     # iPXE encapsulated options
OPT_END = 255

# PXE vendor sub-options inside option 43 (PXE 2.1 table 2-1)
PXE_DISCOVERY_CONTROL = 6
PXE_BOOT_ITEM = 71

#: single-valued options that must not repeat (a repeat is rejected, not
#: concatenated as RFC 3396 would for long options)
SINGLE_VALUED = frozenset({
    OPT_REQUESTED_IP, OPT_LEASE_TIME, OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_MAX_SIZE,
    OPT_VENDOR_CLASS, OPT_CLIENT_ID, OPT_CLIENT_ARCH, OPT_CLIENT_NDI, OPT_CLIENT_UUID,
})

#: options that must carry a value
NON_EMPTY = frozenset({
    OPT_REQUESTED_IP, OPT_MESSAGE_TYPE, OPT_SERVER_ID, OPT_VENDOR_CLASS, OPT_CLIENT_ID,
    OPT_CLIENT_ARCH, OPT_CLIENT_NDI, OPT_CLIENT_UUID,
})

#: exact lengths
FIXED_LENGTH = {
    OPT_SUBNET_MASK: 4, OPT_REQUESTED_IP: 4, OPT_LEASE_TIME: 4, OPT_MESSAGE_TYPE: 1,
    OPT_SERVER_ID: 4, OPT_MAX_SIZE: 2, OPT_CLIENT_NDI: 3, OPT_CLIENT_UUID: 17,
}

ZERO_IP = "0.0.0.0"
BROADCAST_IP = "255.255.255.255"

_HEADER = struct.Struct("!BBBBIHH4s4s4s4s16s64s128sI")
assert _HEADER.size == MIN_PACKET
_COOKIE_BYTES = struct.pack("!I", MAGIC_COOKIE)
_END = b"\xff"
_inet_ntoa = socket.inet_ntoa
_inet_aton = socket.inet_aton


class MalformedPacket(ValueError):
    """A datagram that is not an acceptable DHCP packet.

    ``reason`` is one of a fixed set of tokens (see the module docstring);
    ``str()`` names the exact problem.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class DhcpPacket:
    """One DHCP/BOOTP message.

    Addresses are dotted-quad strings; ``chaddr`` is the 6-byte client MAC;
    ``options`` maps option code to its (concatenated) value in wire order,
    without PAD and END.  ``sname`` and ``file`` are the raw header fields
    with trailing NULs removed.
    """

    op: int = BOOTREQUEST
    xid: int = 0
    chaddr: bytes = b"\x00" * 6
    secs: int = 0
    flags: int = 0
    ciaddr: str = ZERO_IP
    yiaddr: str = ZERO_IP
    siaddr: str = ZERO_IP
    giaddr: str = ZERO_IP
    hops: int = 0
    sname: bytes = b""
    file: bytes = b""
    options: dict[int, bytes] = field(default_factory=dict)

    # -- convenient views -------------------------------------------------------
    @property
    def mac(self) -> str:
        """The client MAC, lowercase with colons."""
        return self.chaddr.hex(":")

    @property
    def msg_type(self) -> int | None:
        """Option 53, or ``None`` for a plain BOOTP packet."""
        value = self.options.get(OPT_MESSAGE_TYPE)
        return value[0] if value else None

    @property
    def msg_name(self) -> str:
        mt = self.msg_type
        return "bootp" if mt is None else MESSAGE_NAMES.get(mt, f"type{mt}")

    @property
    def client_arch(self) -> int | None:
        """The first architecture type of option 93, or ``None``."""
        value = self.options.get(OPT_CLIENT_ARCH)
        return (value[0] << 8 | value[1]) if value else None

    @property
    def vendor_class(self) -> bytes:
        return self.options.get(OPT_VENDOR_CLASS, b"")

    @property
    def server_id(self) -> str | None:
        value = self.options.get(OPT_SERVER_ID)
        return _inet_ntoa(value) if value else None

    @property
    def requested_ip(self) -> str | None:
        value = self.options.get(OPT_REQUESTED_IP)
        return _inet_ntoa(value) if value else None

    @property
    def broadcast(self) -> bool:
        return bool(self.flags & FLAG_BROADCAST)

    @property
    def boot_file(self) -> str:
        """The boot file name: option 67 if present, else the ``file`` field."""
        value = self.options.get(OPT_BOOTFILE) or self.file
        return value.decode("latin-1")


def _validate_option(code: int, value: bytes) -> None:
    n = len(value)
    if n == 0:
        if code in NON_EMPTY:
            raise MalformedPacket("zero_length_option", f"option {code} has no value")
        return
    fixed = FIXED_LENGTH.get(code)
    if fixed is not None and n != fixed:
        raise MalformedPacket("bad_option_length",
                              f"option {code} has length {n}, expected {fixed}")
    if code == OPT_MESSAGE_TYPE and not 1 <= value[0] <= 18:
        raise MalformedPacket("bad_option_value", f"message type {value[0]} unknown")
    elif code == OPT_CLIENT_ARCH and n % 2:
        raise MalformedPacket("bad_option_length",
                              f"option 93 has odd length {n} (a list of 16-bit types)")
    elif code == OPT_CLIENT_UUID and value[0] != 0:
        raise MalformedPacket("bad_option_value",
                              f"option 97 type {value[0]}, only 0 (UUID) is defined")
    elif code == OPT_CLIENT_ID and n < 2:
        raise MalformedPacket("bad_option_length", "option 61 shorter than 2 bytes")
    elif code == OPT_OVERLOAD:
        raise MalformedPacket("option_overload",
                              "option 52 (options in sname/file) is not supported")


def parse_options(data: bytes, start: int = 0, *, require_end: bool = True) -> dict[int, bytes]:
    """Parse a DHCP option area (also used for option 43's sub-options).

    Raises :class:`MalformedPacket` on overruns, a missing END (when
    ``require_end``) and repeated single-valued options; repeated other
    options are concatenated (RFC 3396).
    """
    options: dict[int, bytes] = {}
    n = len(data)
    i = start
    while True:
        if i >= n:
            if require_end:
                raise MalformedPacket("missing_end", "options end without END (255)")
            return options
        code = data[i]
        if code == OPT_PAD:
            i += 1
            continue
        if code == OPT_END:
            return options
        if i + 1 >= n:
            raise MalformedPacket("option_overrun", f"option {code} has no length byte")
        end = i + 2 + data[i + 1]
        if end > n:
            raise MalformedPacket("option_overrun",
                                  f"option {code} length {data[i + 1]} runs past the end")
        value = data[i + 2:end]
        old = options.get(code)
        if old is None:
            options[code] = value
        elif code == OPT_MESSAGE_TYPE:
            raise MalformedPacket("duplicate_option_53", "option 53 appears twice")
        elif code in SINGLE_VALUED:
            raise MalformedPacket("duplicate_option", f"option {code} appears twice")
        else:
            options[code] = old + value
        i = end


#: (min, max) value length of the options parse_packet checks; option 52
#: has an impossible range (it is refused)
_LENGTHS: dict[int, tuple[int, int]] = {
    **{code: (1, 1 << 16) for code in NON_EMPTY},
    **{code: (n, n) for code, n in FIXED_LENGTH.items()},
    OPT_CLIENT_ID: (2, 1 << 16),
    OPT_OVERLOAD: (1, 0),
}
_CHECKED = frozenset(_LENGTHS)
_ZERO4 = b"\x00\x00\x00\x00"


def parse_packet(data: bytes) -> DhcpPacket:
    """Parse one datagram strictly; see the module docstring for the reasons."""
    n = len(data)
    if n < MIN_PACKET:
        raise MalformedPacket("truncated", f"{n} bytes, a DHCP packet has at least {MIN_PACKET}")
    if n > MAX_PACKET:
        raise MalformedPacket("oversized", f"{n} bytes, at most {MAX_PACKET} accepted")
    (op, htype, hlen, hops, xid, secs, flags, ci, yi, si, gi, chaddr, sname, bootfile,
     cookie) = _HEADER.unpack_from(data)
    if op != BOOTREQUEST and op != BOOTREPLY:
        raise MalformedPacket("bad_op", f"op {op}")
    if htype != HTYPE_ETHERNET:
        raise MalformedPacket("bad_htype", f"hardware type {htype}, only Ethernet (1)")
    if hlen != 6:
        raise MalformedPacket("bad_hlen", f"hardware address length {hlen}, expected 6")
    if cookie != MAGIC_COOKIE:
        raise MalformedPacket("bad_cookie", f"magic cookie {cookie:#010x}")
    mac = chaddr[:6]
    if mac[0] & 1 or mac == b"\x00\x00\x00\x00\x00\x00":
        raise MalformedPacket("bad_chaddr", f"client MAC {mac.hex(':')} is not a unicast MAC")
    options = parse_options(data, MIN_PACKET)
    # the common case stays cheap: a length check per present checked option,
    # the detailed (raising) check only when something is off
    for code in _CHECKED.intersection(options):
        value = options[code]
        lo, hi = _LENGTHS[code]
        if not lo <= len(value) <= hi:
            _validate_option(code, value)
    mt = options.get(OPT_MESSAGE_TYPE)
    if mt is not None and not 1 <= mt[0] <= 18:
        _validate_option(OPT_MESSAGE_TYPE, mt)
    arch = options.get(OPT_CLIENT_ARCH)
    if arch is not None and len(arch) % 2:
        _validate_option(OPT_CLIENT_ARCH, arch)
    uuid = options.get(OPT_CLIENT_UUID)
    if uuid is not None and uuid[0] != 0:
        _validate_option(OPT_CLIENT_UUID, uuid)
    return DhcpPacket(op, xid, mac, secs, flags,
                      ZERO_IP if ci == _ZERO4 else _inet_ntoa(ci),
                      ZERO_IP if yi == _ZERO4 else _inet_ntoa(yi),
                      ZERO_IP if si == _ZERO4 else _inet_ntoa(si),
                      ZERO_IP if gi == _ZERO4 else _inet_ntoa(gi),
                      hops, sname.rstrip(b"\x00"), bootfile.rstrip(b"\x00"), options)


def encode_options(options: Mapping[int, bytes] | Iterable[tuple[int, bytes]],
                   *, end: bool = True) -> bytes:
    """Encode options (code → value); values over 255 bytes are split into
    consecutive instances of the same option (RFC 3396)."""
    items = options.items() if isinstance(options, dict | Mapping) else options
    parts: list[bytes] = []
    for code, value in items:
        if not 0 < code < 255:
            raise ValueError(f"option code {code} cannot be encoded")
        if len(value) <= 255:
            parts.append(bytes((code, len(value))))
            parts.append(value)
            continue
        for i in range(0, len(value), 255):
            chunk = value[i:i + 255]
            parts.append(bytes((code, len(chunk))))
            parts.append(chunk)
    if end:
        parts.append(_END)
    return b"".join(parts)


def build_packet(packet: DhcpPacket) -> bytes:
    """Encode ``packet`` (the inverse of :func:`parse_packet`), padded to
    the 300-byte BOOTP minimum.  ``sname`` over 64 or ``file`` over 128
    bytes raises ``ValueError`` (put a long boot file in option 67)."""
    if len(packet.sname) > 64 or len(packet.file) > 128:
        raise ValueError("sname or file too long for the BOOTP header")
    head = _HEADER.pack(
        packet.op, HTYPE_ETHERNET, 6, packet.hops, packet.xid, packet.secs, packet.flags,
        _inet_aton(packet.ciaddr), _inet_aton(packet.yiaddr), _inet_aton(packet.siaddr),
        _inet_aton(packet.giaddr), packet.chaddr, packet.sname, packet.file, MAGIC_COOKIE)
    out = head + encode_options(packet.options)
    if len(out) < MIN_REPLY:
        out += bytes(MIN_REPLY - len(out))
    return out


class ReplyTemplate:
    """The lean encoder of the hot path: a reply whose per-answer part is
    encoded once and whose per-client fields are patched in.

    Built from a :class:`DhcpPacket` that has everything except ``xid``,
    ``chaddr``, ``flags``, ``ciaddr``, ``giaddr`` and the per-client options;
    :meth:`render` gives exactly the bytes :func:`build_packet` would give
    for the same packet with those fields set and ``tail`` options appended
    (a test holds it to that).
    """

    __slots__ = ("_head", "_options")

    def __init__(self, packet: DhcpPacket) -> None:
        self._head = build_packet(DhcpPacket(
            packet.op, 0, b"\x02" + bytes(5), packet.secs, 0, ZERO_IP, packet.yiaddr,
            packet.siaddr, ZERO_IP, packet.hops, packet.sname, packet.file))[:MIN_PACKET]
        self._options = encode_options(packet.options, end=False)

    def render(self, xid: int, chaddr: bytes, flags: int, ciaddr: bytes, giaddr: bytes,
               tail: bytes = b"") -> bytes:
        """The reply; ``ciaddr``/``giaddr`` are 4 packed bytes, ``tail`` is
        already-encoded options placed after the template's (no END)."""
        head = bytearray(self._head)
        _CLIENT_A.pack_into(head, 4, xid, 0, flags, ciaddr)
        _CLIENT_B.pack_into(head, 24, giaddr, chaddr)
        out = bytes(head) + self._options + tail + _END
        if len(out) < MIN_REPLY:
            out += bytes(MIN_REPLY - len(out))
        return out


_CLIENT_A = struct.Struct("!IHH4s")     # xid, secs, flags, ciaddr at offset 4
_CLIENT_B = struct.Struct("!4s16s")     # giaddr, chaddr at offset 24


# --- helpers for option values --------------------------------------------------


def ip_bytes(ip: str) -> bytes:
    return _inet_aton(ip)


def ips_bytes(ips: Iterable[str]) -> bytes:
    return b"".join(_inet_aton(ip) for ip in ips)


def u32(value: int) -> bytes:
    return struct.pack("!I", value)


def user_class_items(value: bytes) -> list[bytes]:
    """Option 77 as a list of classes.  RFC 3004 encodes length-prefixed
    items, but iPXE and many ROMs send one raw string; both are accepted: the
    raw value is always one item, and the RFC 3004 reading is added when
    it consumes the value exactly."""
    items = [value]
    i, decoded = 0, []
    while i < len(value):
        n = value[i]
        if n == 0 or i + 1 + n > len(value):
            return items
        decoded.append(value[i + 1:i + 1 + n])
        i += 1 + n
    return items + decoded


def pxe_vendor_options(sub: Mapping[int, bytes]) -> bytes:
    """Encode PXE vendor sub-options for option 43 (terminated by END)."""
    return encode_options(sub)


#: option 43 telling a BIOS PXE ROM to skip boot server discovery and boot
#: the file named in the offer (PXE 2.1, PXE_DISCOVERY_CONTROL bit 3).
PXE_BYPASS_DISCOVERY = pxe_vendor_options({PXE_DISCOVERY_CONTROL: b"\x08"})


def build_request(
    mac: str | bytes,
    msg_type: int = DISCOVER,
    *,
    xid: int = 0,
    arch: int | None = None,
    vendor_class: bytes | None = b"PXEClient:Arch:00000:UNDI:002001",
    uuid: bytes | None = None,
    user_class: bytes | None = None,
    requested_ip: str | None = None,
    server_id: str | None = None,
    ciaddr: str = ZERO_IP,
    giaddr: str = ZERO_IP,
    flags: int = 0,
    extra: Mapping[int, bytes] | None = None,
) -> bytes:
    """A client request as a PXE ROM or iPXE sends it (tests, load generator).

    ``uuid`` is the 16-byte machine UUID; option 97 gets type 0 prepended.
    Option 94 (NDI, UNDI 2.1) is added whenever ``arch`` is given.
    """
    chaddr = bytes.fromhex(mac.replace(":", "")) if isinstance(mac, str) else mac
    options: dict[int, bytes] = {OPT_MESSAGE_TYPE: bytes((msg_type,))}
    if requested_ip:
        options[OPT_REQUESTED_IP] = ip_bytes(requested_ip)
    if server_id:
        options[OPT_SERVER_ID] = ip_bytes(server_id)
    options[OPT_MAX_SIZE] = struct.pack("!H", 1472)
    if vendor_class is not None:
        options[OPT_VENDOR_CLASS] = vendor_class
    if arch is not None:
        options[OPT_CLIENT_ARCH] = struct.pack("!H", arch)
        options[OPT_CLIENT_NDI] = b"\x01\x02\x01"
    if uuid is not None:
        options[OPT_CLIENT_UUID] = b"\x00" + uuid
    if user_class is not None:
        options[OPT_USER_CLASS] = user_class
    if extra:
        options.update(extra)
    return build_packet(DhcpPacket(BOOTREQUEST, xid, chaddr, flags=flags, ciaddr=ciaddr,
                                   giaddr=giaddr, options=options))
