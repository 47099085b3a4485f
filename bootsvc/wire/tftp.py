"""TFTP wire format: a pure codec (RFC 1350, 2347, 2348, 2349, 7440).

``parse_*`` turn bytes into typed values or raise :class:`MalformedPacket`
naming the reason; ``build_*`` are their inverses; :func:`decide_options`
turns a request's options and the server's limits into the negotiated
transfer parameters or raises :class:`OptionRefused`.  Nothing here touches a
socket, a clock or a file; the server (``bootsvc.tftp.server``) carries the
decisions out.

Every value a peer controls is bounded here: request size, name length,
option count, option name and value lengths, and each option's range.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from enum import IntEnum

# --- constants ---------------------------------------------------------------


class Opcode(IntEnum):
    """RFC 1350 section 5 (and RFC 2347 for OACK)."""

    RRQ = 1    # read request
    WRQ = 2    # write request (always refused: the root is read-only)
    DATA = 3
    ACK = 4
    ERROR = 5
    OACK = 6   # RFC 2347 option acknowledgment


class ErrorCode(IntEnum):
    """RFC 1350 appendix, plus RFC 2347's code 8."""

    NOT_DEFINED = 0          # see the message (we use it for "server busy")
    FILE_NOT_FOUND = 1
    ACCESS_VIOLATION = 2
    DISK_FULL = 3
    ILLEGAL_OPERATION = 4
    UNKNOWN_TID = 5
    FILE_EXISTS = 6
    NO_SUCH_USER = 7
    OPTION_REFUSED = 8       # RFC 2347: the request's options were refused


#: RFC 1350: the block size without the blksize option.
DEFAULT_BLKSIZE = 512
#: RFC 2348 section "Blocksize Option Specification": valid 8..65464 octets.
MIN_BLKSIZE = 8
MAX_BLKSIZE = 65464
#: RFC 2349: timeout in seconds, valid 1..255.
MIN_TIMEOUT = 1
MAX_TIMEOUT = 255
#: RFC 7440: windowsize valid 1..65535 blocks; without it the transfer is
#: lock-step (a window of one).
MIN_WINDOWSIZE = 1
MAX_WINDOWSIZE = 65535
#: block numbers are 16 bits; a transfer past 65535 blocks rolls over to 0
#: (what tftp-hpa, curl, atftp, iPXE and EDK2 expect).
BLOCK_MODULO = 65536

#: Bounds on requests (ours, not the RFC's).  A TFTP request of a real client
#: is a few dozen bytes; 512 is RFC 1350's packet size and what most servers
#: accept.  Names longer than 255 or more than 16 options are hostile.
MAX_REQUEST_BYTES = 512
MAX_NAME_BYTES = 255
MAX_OPTIONS = 16
MAX_OPTION_NAME_BYTES = 32
MAX_OPTION_VALUE_BYTES = 32
#: an error message we build is cut to this many bytes
MAX_ERROR_MESSAGE_BYTES = 200

MODES = ("octet", "netascii")   # "mail" is obsolete (RFC 1350) and refused

_OP = struct.Struct("!H")
_HDR = struct.Struct("!HH")


class MalformedPacket(ValueError):
    """A datagram that is not valid TFTP.  ``reason`` is a short metric label."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class OptionRefused(ValueError):
    """A request option has a value we refuse; answered with ERROR 8."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# --- packet types ------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """An RRQ or WRQ.  ``options`` keeps the client's order; names are lowercase."""

    opcode: Opcode
    filename: str
    mode: str
    options: tuple[tuple[str, str], ...] = ()

    def option(self, name: str) -> str | None:
        for key, value in self.options:
            if key == name:
                return value
        return None


@dataclass(frozen=True)
class Data:
    block: int
    payload: bytes


@dataclass(frozen=True)
class Ack:
    block: int


@dataclass(frozen=True)
class Error:
    code: int
    message: str


@dataclass(frozen=True)
class Oack:
    options: tuple[tuple[str, str], ...]


Packet = Request | Data | Ack | Error | Oack


# --- parsing -----------------------------------------------------------------


def _printable(raw: bytes) -> bool:
    return all(0x20 <= b < 0x7F for b in raw)


def parse_opcode(datagram: bytes) -> int:
    """The opcode of a datagram, or raise ``MalformedPacket('truncated')``."""
    if len(datagram) < 2:
        raise MalformedPacket("truncated", f"{len(datagram)} bytes")
    return int(_OP.unpack_from(datagram)[0])


def parse_request(datagram: bytes) -> Request:
    """Parse an RRQ or WRQ strictly.

    Layout: opcode | filename | 0 | mode | 0 | (option | 0 | value | 0)*.
    Refused (``MalformedPacket.reason``): ``truncated``, ``not_a_request``,
    ``too_long`` (over :data:`MAX_REQUEST_BYTES`), ``no_terminator``,
    ``empty_name``, ``name_too_long``, ``non_printable_name``, ``bad_mode``,
    ``unpaired_option``, ``too_many_options``, ``bad_option_name``,
    ``bad_option_value``, ``duplicate_option``.  Trailing NUL padding after the
    last field is tolerated (some PXE ROMs pad requests).
    """
    opcode = parse_opcode(datagram)
    if opcode not in (Opcode.RRQ, Opcode.WRQ):
        raise MalformedPacket("not_a_request", f"opcode {opcode}")
    if len(datagram) > MAX_REQUEST_BYTES:
        raise MalformedPacket("too_long", f"{len(datagram)} bytes")
    body = datagram[2:]
    if not body.endswith(b"\0"):
        raise MalformedPacket("no_terminator")
    fields = body[:-1].split(b"\0")
    if len(fields) < 2:
        raise MalformedPacket("no_terminator", "no mode field")
    while len(fields) > 2 and fields[-1] == b"":   # NUL padding
        if (len(fields) - 2) % 2 == 1:
            fields.pop()
        elif fields[-2] == b"":
            del fields[-2:]
        else:
            break   # an option with an empty value
    name, mode_raw, rest = fields[0], fields[1], fields[2:]
    if not name:
        raise MalformedPacket("empty_name")
    if len(name) > MAX_NAME_BYTES:
        raise MalformedPacket("name_too_long", f"{len(name)} bytes")
    if not _printable(name):
        raise MalformedPacket("non_printable_name")
    mode = mode_raw.decode("ascii", "replace").lower()
    if mode not in MODES:
        raise MalformedPacket("bad_mode", repr(mode[:16]))
    if len(rest) % 2:
        raise MalformedPacket("unpaired_option")
    if len(rest) // 2 > MAX_OPTIONS:
        raise MalformedPacket("too_many_options", f"{len(rest) // 2}")
    options: list[tuple[str, str]] = []
    seen: set[str] = set()
    for i in range(0, len(rest), 2):
        key_raw, value_raw = rest[i], rest[i + 1]
        if not key_raw or len(key_raw) > MAX_OPTION_NAME_BYTES or not _printable(key_raw):
            raise MalformedPacket("bad_option_name")
        if len(value_raw) > MAX_OPTION_VALUE_BYTES or not _printable(value_raw):
            raise MalformedPacket("bad_option_value", key_raw.decode("ascii").lower())
        key = key_raw.decode("ascii").lower()
        if key in seen:
            raise MalformedPacket("duplicate_option", key)
        seen.add(key)
        options.append((key, value_raw.decode("ascii")))
    return Request(Opcode(opcode), name.decode("ascii"), mode, tuple(options))


def _parse_option_list(body: bytes) -> tuple[tuple[str, str], ...]:
    if not body:
        return ()
    if not body.endswith(b"\0"):
        raise MalformedPacket("no_terminator")
    fields = body[:-1].split(b"\0")
    if len(fields) % 2:
        raise MalformedPacket("unpaired_option")
    if len(fields) // 2 > MAX_OPTIONS:
        raise MalformedPacket("too_many_options")
    return tuple((fields[i].decode("ascii", "replace").lower(),
                  fields[i + 1].decode("ascii", "replace"))
                 for i in range(0, len(fields), 2))


def parse_packet(datagram: bytes) -> Packet:
    """Parse any TFTP datagram into its typed value.

    DATA may carry up to :data:`MAX_BLKSIZE` bytes; ACK must be exactly 4
    bytes; ERROR must have a NUL-terminated message (a missing terminator is
    tolerated, some clients omit it).  Raises :class:`MalformedPacket`.
    """
    opcode = parse_opcode(datagram)
    if opcode in (Opcode.RRQ, Opcode.WRQ):
        return parse_request(datagram)
    if opcode == Opcode.DATA:
        if len(datagram) < 4:
            raise MalformedPacket("truncated", "DATA")
        if len(datagram) > 4 + MAX_BLKSIZE:
            raise MalformedPacket("too_long", "DATA")
        return Data(_HDR.unpack_from(datagram)[1], bytes(datagram[4:]))
    if opcode == Opcode.ACK:
        if len(datagram) != 4:
            raise MalformedPacket("truncated" if len(datagram) < 4 else "too_long", "ACK")
        return Ack(_HDR.unpack_from(datagram)[1])
    if opcode == Opcode.ERROR:
        if len(datagram) < 4:
            raise MalformedPacket("truncated", "ERROR")
        text = datagram[4:].split(b"\0", 1)[0][:MAX_ERROR_MESSAGE_BYTES]
        return Error(_HDR.unpack_from(datagram)[1], text.decode("ascii", "replace"))
    if opcode == Opcode.OACK:
        return Oack(_parse_option_list(datagram[2:]))
    raise MalformedPacket("bad_opcode", str(opcode))


def parse_ack(datagram: bytes) -> int | None:
    """Fast path for the server's hot loop: the block of an ACK, or None.

    Equivalent to ``parse_packet`` returning an :class:`Ack`, without the
    allocation; anything else (including ERROR) returns None.
    """
    if len(datagram) == 4 and datagram[0] == 0 and datagram[1] == Opcode.ACK:
        return (datagram[2] << 8) | datagram[3]
    return None


# --- building ----------------------------------------------------------------


def build_request(filename: str, mode: str = "octet",
                  options: Iterable[tuple[str, str | int]] = (),
                  opcode: Opcode = Opcode.RRQ) -> bytes:
    parts = [_OP.pack(opcode), filename.encode("ascii"), b"\0", mode.encode("ascii"), b"\0"]
    for key, value in options:
        parts += [key.encode("ascii"), b"\0", str(value).encode("ascii"), b"\0"]
    return b"".join(parts)


def build_data_header(block: int) -> bytes:
    """The 4-byte DATA header of an (absolute) block number, rolled over."""
    return _HEADERS[block & 0xFFFF]


def build_data(block: int, payload: bytes) -> bytes:
    return _HEADERS[block & 0xFFFF] + payload


def build_ack(block: int) -> bytes:
    return _HDR.pack(Opcode.ACK, block & 0xFFFF)


def build_error(code: int, message: str) -> bytes:
    text = message.encode("ascii", "replace")[:MAX_ERROR_MESSAGE_BYTES]
    return _HDR.pack(Opcode.ERROR, code) + text + b"\0"


def build_oack(options: Iterable[tuple[str, str | int]]) -> bytes:
    parts = [_OP.pack(Opcode.OACK)]
    for key, value in options:
        parts += [key.encode("ascii"), b"\0", str(value).encode("ascii"), b"\0"]
    return b"".join(parts)


_HEADERS: tuple[bytes, ...] = tuple(_HDR.pack(Opcode.DATA, n) for n in range(BLOCK_MODULO))


# --- negotiation -------------------------------------------------------------


@dataclass(frozen=True)
class Limits:
    """The server's side of option negotiation."""

    max_blksize: int = 1468       # 1500 MTU - IP(20) - UDP(8) - TFTP(4)
    max_windowsize: int = 64
    default_timeout: float = 1.0


@dataclass(frozen=True)
class Negotiated:
    """The transfer parameters and what goes in the OACK (empty: no OACK)."""

    blksize: int = DEFAULT_BLKSIZE
    windowsize: int = 1
    timeout: float = 1.0
    oack: tuple[tuple[str, str], ...] = field(default_factory=tuple)


def _int_option(name: str, raw: str, lo: int, hi: int) -> int:
    if not raw.isdigit() or len(raw) > 10:
        raise OptionRefused(f"bad_{name}", f"{name}={raw!r} is not a number")
    value = int(raw)
    if not lo <= value <= hi:
        raise OptionRefused(f"bad_{name}", f"{name}={value} outside {lo}..{hi}")
    return value


def decide_options(options: Mapping[str, str] | Iterable[tuple[str, str]], size: int,
                   limits: Limits) -> Negotiated:
    """Negotiate a read transfer of a file of ``size`` bytes.

    * ``blksize`` (RFC 2348): 8..65464, else refused; clamped to
      ``limits.max_blksize``.
    * ``timeout`` (RFC 2349): 1..255 seconds, else refused.
    * ``tsize`` (RFC 2349): a number (0 in a read request); answered with
      ``size``.
    * ``windowsize`` (RFC 7440): 1..65535, else refused; clamped to
      ``limits.max_windowsize``.

    Unknown options are ignored (RFC 2347); the OACK lists only options the
    client asked for, in its order.  Raises :class:`OptionRefused`.
    """
    items = list(options.items()) if isinstance(options, Mapping) else list(options)
    blksize, windowsize, timeout = DEFAULT_BLKSIZE, 1, limits.default_timeout
    oack: list[tuple[str, str]] = []
    for key, raw in items:
        if key == "blksize":
            blksize = min(_int_option(key, raw, MIN_BLKSIZE, MAX_BLKSIZE), limits.max_blksize)
            oack.append((key, str(blksize)))
        elif key == "timeout":
            value = _int_option(key, raw, MIN_TIMEOUT, MAX_TIMEOUT)
            timeout = float(value)
            oack.append((key, str(value)))
        elif key == "tsize":
            _int_option(key, raw, 0, 2**63)
            oack.append((key, str(size)))
        elif key == "windowsize":
            windowsize = min(_int_option(key, raw, MIN_WINDOWSIZE, MAX_WINDOWSIZE),
                             limits.max_windowsize)
            oack.append((key, str(windowsize)))
    return Negotiated(blksize, windowsize, timeout, tuple(oack))


def block_count(size: int, blksize: int) -> int:
    """Number of DATA blocks for ``size`` bytes: the last block is always
    shorter than ``blksize`` (empty when ``size`` is a multiple of it)."""
    return size // blksize + 1


def to_netascii(data: bytes) -> bytes:
    """RFC 764 netascii as RFC 1350 uses it: CR -> CR NUL, LF -> CR LF."""
    return data.replace(b"\r", b"\r\0").replace(b"\n", b"\r\n")


def unwrap_block(ack16: int, last_sent: int) -> int:
    """The absolute block number of a 16-bit ACK, taking it as the latest
    block at or before ``last_sent`` with those low 16 bits."""
    return last_sent - ((last_sent - ack16) & 0xFFFF)
