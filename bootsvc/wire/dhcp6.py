"""DHCPv6 message codec (RFC 8415; network boot options RFC 5970).  Pure.

:func:`parse_message` turns a datagram into a :class:`Dhcp6Message` (a
client/server message) or a :class:`RelayMessage` (RELAY-FORW/RELAY-REPL,
with the relayed message parsed inside), or raises
:class:`MalformedMessage` whose ``reason`` is a short, bounded token (a
metric label).  Strict, as the DHCPv4 codec is, because every field it lets
through reaches a boot decision:

* ``truncated`` — shorter than a message header (4 bytes; 34 for a relay);
* ``oversized`` — longer than :data:`MAX_MESSAGE`;
* ``bad_type`` — a message type a server never receives (ADVERTISE, REPLY,
  RECONFIGURE, RELAY-REPL from a client) or not assigned;
* ``option_overrun`` — an option header or value runs past the end;
* ``relay_loop`` — a hop count above :data:`HOP_COUNT_LIMIT` or relays
  nested deeper than that (RFC 8415 section 19.1.1: a loop);
* ``relay_without_message`` — a RELAY-FORW with no Relay Message option;
* ``duplicate_option`` — a single-valued option twice (client id, server
  id, elapsed time, relay message, client arch types, vendor class of one
  enterprise is allowed to repeat);
* ``bad_option_length`` — client arch types of odd length, elapsed time not
  2 bytes, a client id shorter than a DUID's 2-byte type or longer than
  130 bytes (RFC 8415 section 11.1), NII not 3 bytes;
* ``bad_option_value`` — a user/vendor class or boot file parameter list
  whose items run past the option;
* ``oversized_option`` — a boot file parameter option (60) longer than
  :data:`MAX_BOOTFILE_PARAM`, or a boot file URL (59) longer than
  :data:`MAX_BOOTFILE_URL`.

:func:`build_message` and :func:`build_relay_reply` are the inverse, used
for answers.  No sockets, clocks, logging or store access in this module.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

# --- message types (RFC 8415 section 7.3) ----------------------------------------
SOLICIT, ADVERTISE, REQUEST, CONFIRM, RENEW, REBIND, REPLY, RELEASE, DECLINE, \
    RECONFIGURE, INFORMATION_REQUEST, RELAY_FORW, RELAY_REPL = range(1, 14)
MESSAGE_NAMES = {
    SOLICIT: "solicit", ADVERTISE: "advertise", REQUEST: "request", CONFIRM: "confirm",
    RENEW: "renew", REBIND: "rebind", REPLY: "reply", RELEASE: "release",
    DECLINE: "decline", RECONFIGURE: "reconfigure",
    INFORMATION_REQUEST: "information-request", RELAY_FORW: "relay-forw",
    RELAY_REPL: "relay-repl",
}
#: what a server accepts from clients (and relays)
CLIENT_TYPES = frozenset({SOLICIT, REQUEST, CONFIRM, RENEW, REBIND, RELEASE, DECLINE,
                          INFORMATION_REQUEST})

# --- option codes (RFC 8415 section 21, RFC 5970) -------------------------------
OPT_CLIENTID = 1
OPT_SERVERID = 2
OPT_IA_NA = 3
OPT_IAADDR = 5
OPT_ORO = 6
OPT_PREFERENCE = 7
OPT_ELAPSED_TIME = 8
OPT_RELAY_MSG = 9
OPT_STATUS_CODE = 13
OPT_RAPID_COMMIT = 14
OPT_USER_CLASS = 15
OPT_VENDOR_CLASS = 16
OPT_VENDOR_OPTS = 17
OPT_INTERFACE_ID = 18
OPT_DNS_SERVERS = 23
OPT_BOOTFILE_URL = 59
OPT_BOOTFILE_PARAM = 60
OPT_CLIENT_ARCH_TYPE = 61
OPT_NII = 62

#: options that may appear once per message
SINGLE = frozenset({OPT_CLIENTID, OPT_SERVERID, OPT_ELAPSED_TIME, OPT_RELAY_MSG,
                    OPT_CLIENT_ARCH_TYPE, OPT_NII, OPT_ORO, OPT_RAPID_COMMIT,
                    OPT_BOOTFILE_URL, OPT_BOOTFILE_PARAM, OPT_INTERFACE_ID, OPT_USER_CLASS})

STATUS_SUCCESS = 0
STATUS_NO_ADDRS_AVAIL = 2
STATUS_NO_BINDING = 3

HOP_COUNT_LIMIT = 8
MAX_MESSAGE = 4096
MAX_BOOTFILE_PARAM = 1024
MAX_BOOTFILE_URL = 1024
MAX_DUID = 130
RELAY_HEADER = 34          # type, hop count, link address, peer address

CLIENT_PORT = 546
SERVER_PORT = 547
#: All_DHCP_Relay_Agents_and_Servers (RFC 8415 section 7.1)
ALL_SERVERS = "ff02::1:2"


class MalformedMessage(ValueError):
    """A datagram that is not a DHCPv6 message we accept; ``reason`` is a
    bounded token for the drop counter."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Dhcp6Message:
    """A client/server message: type, 3-byte transaction id, options in
    order (``options``) and by code (first occurrence, ``by_code``)."""

    msg_type: int
    transaction_id: bytes
    options: tuple[tuple[int, bytes], ...] = ()
    by_code: dict[int, bytes] = field(default_factory=dict, compare=False, repr=False)

    def get(self, code: int) -> bytes | None:
        return self.by_code.get(code)

    def all(self, code: int) -> list[bytes]:
        return [v for c, v in self.options if c == code]

    @property
    def name(self) -> str:
        return MESSAGE_NAMES.get(self.msg_type, str(self.msg_type))

    @property
    def client_id(self) -> bytes | None:
        return self.get(OPT_CLIENTID)

    @property
    def client_arches(self) -> tuple[int, ...]:
        raw = self.get(OPT_CLIENT_ARCH_TYPE) or b""
        return tuple(struct.unpack(f"!{len(raw) // 2}H", raw))

    @property
    def vendor_classes(self) -> list[tuple[int, list[bytes]]]:
        """``(enterprise number, [vendor-class-data, ...])`` of each option 16."""
        return [(struct.unpack_from("!I", v)[0], length_prefixed(v[4:]))
                for v in self.all(OPT_VENDOR_CLASS)]

    @property
    def user_classes(self) -> list[bytes]:
        raw = self.get(OPT_USER_CLASS)
        return length_prefixed(raw) if raw is not None else []

    @property
    def ia_na_iaids(self) -> list[bytes]:
        return [v[:4] for v in self.all(OPT_IA_NA)]


@dataclass(frozen=True)
class RelayMessage:
    """A RELAY-FORW (or RELAY-REPL) with the message it carries."""

    msg_type: int
    hop_count: int
    link_address: bytes
    peer_address: bytes
    options: tuple[tuple[int, bytes], ...]
    inner: Dhcp6Message | RelayMessage

    @property
    def interface_id(self) -> bytes | None:
        return next((v for c, v in self.options if c == OPT_INTERFACE_ID), None)

    @property
    def client_message(self) -> Dhcp6Message:
        inner: Dhcp6Message | RelayMessage = self.inner
        while isinstance(inner, RelayMessage):
            inner = inner.inner
        return inner

    @property
    def depth(self) -> int:
        return 1 + (self.inner.depth if isinstance(self.inner, RelayMessage) else 0)


def length_prefixed(raw: bytes) -> list[bytes]:
    """Items of a list of 2-byte-length-prefixed values (user class, vendor
    class data, boot file parameters); :class:`MalformedMessage` when one
    runs past the end."""
    items, i = [], 0
    while i < len(raw):
        if i + 2 > len(raw):
            raise MalformedMessage("bad_option_value", "a list item's length runs past the end")
        (n,) = struct.unpack_from("!H", raw, i)
        if i + 2 + n > len(raw):
            raise MalformedMessage("bad_option_value", f"a list item of {n} bytes runs past "
                                                       "the end")
        items.append(raw[i + 2:i + 2 + n])
        i += 2 + n
    return items


def options_of(raw: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    """The options of ``raw`` from byte ``start`` on (also those nested in an
    IA_NA: start 12), checked as :func:`parse_message` checks them."""
    out: list[tuple[int, bytes]] = []
    seen: set[int] = set()
    i = start
    while i < len(raw):
        if i + 4 > len(raw):
            raise MalformedMessage("option_overrun", f"an option header at byte {i} is cut off")
        code, n = struct.unpack_from("!HH", raw, i)
        if i + 4 + n > len(raw):
            raise MalformedMessage("option_overrun", f"option {code} says {n} bytes, "
                                                     f"{len(raw) - i - 4} remain")
        value = raw[i + 4:i + 4 + n]
        if code in SINGLE:
            if code in seen:
                raise MalformedMessage("duplicate_option", f"option {code} twice")
            seen.add(code)
        _check_option(code, value)
        out.append((code, value))
        i += 4 + n
    return tuple(out)


def _check_option(code: int, value: bytes) -> None:
    n = len(value)
    if code == OPT_CLIENT_ARCH_TYPE and (n == 0 or n % 2):
        raise MalformedMessage("bad_option_length", f"client arch types of {n} bytes")
    if code == OPT_ELAPSED_TIME and n != 2:
        raise MalformedMessage("bad_option_length", f"elapsed time of {n} bytes")
    if code in (OPT_CLIENTID, OPT_SERVERID) and not 2 < n <= MAX_DUID:
        raise MalformedMessage("bad_option_length", f"a DUID of {n} bytes")
    if code == OPT_NII and n != 3:
        raise MalformedMessage("bad_option_length", f"NII of {n} bytes")
    if code == OPT_IA_NA and n < 12:
        raise MalformedMessage("bad_option_length", f"IA_NA of {n} bytes")
    if code == OPT_VENDOR_CLASS:
        if n < 4:
            raise MalformedMessage("bad_option_length", f"vendor class of {n} bytes")
        length_prefixed(value[4:])
    if code == OPT_USER_CLASS:
        length_prefixed(value)
    if code == OPT_BOOTFILE_PARAM:
        if n > MAX_BOOTFILE_PARAM:
            raise MalformedMessage("oversized_option", f"boot file parameters of {n} bytes")
        length_prefixed(value)
    if code == OPT_BOOTFILE_URL and n > MAX_BOOTFILE_URL:
        raise MalformedMessage("oversized_option", f"a boot file URL of {n} bytes")


def parse_message(raw: bytes, *, depth: int = 0) -> Dhcp6Message | RelayMessage:
    """The message in ``raw`` (see the module docstring for what is refused)."""
    if len(raw) > MAX_MESSAGE:
        raise MalformedMessage("oversized", f"{len(raw)} bytes")
    if len(raw) < 4:
        raise MalformedMessage("truncated", f"{len(raw)} bytes")
    msg_type = raw[0]
    if msg_type == RELAY_FORW:
        if len(raw) < RELAY_HEADER:
            raise MalformedMessage("truncated", f"a relay message of {len(raw)} bytes")
        hops = raw[1]
        if hops > HOP_COUNT_LIMIT or depth >= HOP_COUNT_LIMIT:
            raise MalformedMessage("relay_loop", f"hop count {hops}, nesting {depth + 1}")
        options = options_of(raw, RELAY_HEADER)
        relayed = next((v for c, v in options if c == OPT_RELAY_MSG), None)
        if relayed is None:
            raise MalformedMessage("relay_without_message", "RELAY-FORW without option 9")
        inner = parse_message(relayed, depth=depth + 1)
        if isinstance(inner, RelayMessage) and inner.hop_count >= hops:
            # each relay adds one: an inner relay's count is below the outer's
            raise MalformedMessage("relay_loop", f"inner hop count {inner.hop_count} "
                                                 f"not below {hops}")
        return RelayMessage(msg_type, hops, raw[2:18], raw[18:34], options, inner)
    if msg_type not in CLIENT_TYPES:
        raise MalformedMessage("bad_type", f"message type {msg_type} "
                                           f"({MESSAGE_NAMES.get(msg_type, 'unassigned')})")
    options = options_of(raw, 4)
    by_code: dict[int, bytes] = {}
    for code, value in options:
        by_code.setdefault(code, value)
    return Dhcp6Message(msg_type, raw[1:4], options, by_code)


# --- building ----------------------------------------------------------------------


def option(code: int, value: bytes) -> bytes:
    return struct.pack("!HH", code, len(value)) + value


def length_prefix(items: Iterable[bytes]) -> bytes:
    return b"".join(struct.pack("!H", len(i)) + i for i in items)


def build_message(msg_type: int, transaction_id: bytes,
                  options: Sequence[tuple[int, bytes]]) -> bytes:
    if len(transaction_id) != 3:
        raise ValueError("a transaction id is 3 bytes")
    return bytes([msg_type]) + transaction_id + b"".join(option(c, v) for c, v in options)


def build_relay_reply(relay: RelayMessage, inner_reply: bytes) -> bytes:
    """The RELAY-REPL for ``relay`` carrying ``inner_reply`` (nested relays
    are answered through each of them, RFC 8415 section 19.3), with the
    Interface-Id echoed."""
    if isinstance(relay.inner, RelayMessage):
        inner_reply = build_relay_reply(relay.inner, inner_reply)
    options = [(OPT_RELAY_MSG, inner_reply)]
    if relay.interface_id is not None:
        options.insert(0, (OPT_INTERFACE_ID, relay.interface_id))
    return bytes([RELAY_REPL, relay.hop_count]) + relay.link_address + relay.peer_address + \
        b"".join(option(c, v) for c, v in options)


def duid_ll(mac: bytes) -> bytes:
    """DUID-LL (type 3) of an Ethernet MAC: what the node calls itself."""
    if len(mac) != 6:
        raise ValueError("a MAC is 6 bytes")
    return struct.pack("!HH", 3, 1) + mac


def ia_na(iaid: bytes, t1: int, t2: int, addresses: Sequence[tuple[bytes, int, int]] = (),
          status: tuple[int, str] | None = None) -> bytes:
    """An IA_NA option value: IAID, T1, T2 and IA Address options
    ``(address, preferred, valid)``, or a status code inside."""
    body = iaid + struct.pack("!II", t1, t2)
    for addr, preferred, valid in addresses:
        body += option(OPT_IAADDR, addr + struct.pack("!II", preferred, valid))
    if status is not None:
        body += option(OPT_STATUS_CODE, struct.pack("!H", status[0]) + status[1].encode())
    return body


def status_code(code: int, message: str) -> bytes:
    return struct.pack("!H", code) + message.encode()
