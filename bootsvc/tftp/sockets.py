"""The TFTP server's sockets: the request socket, one connected socket per
transfer, and how a window of blocks reaches the wire.

A transfer's socket is ``connect()``-ed to its client, so the kernel drops
strangers' datagrams and an ICMP "port unreachable" from a vanished client
ends the session at once.  A window goes out in one ``sendmsg`` with UDP
generic segmentation offload (``UDP_SEGMENT``: the kernel cuts the buffer
into datagrams) where the kernel allows it, else one ``send`` per block.
Send errors are returned as the status the session closes with; a full
socket buffer loses the rest of a window as the wire would, and the
retransmission timer resends it.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import struct

from bootsvc.tftp.session import Session
from bootsvc.wire import tftp

log = logging.getLogger("lpmos.tftp")

#: Linux UDP generic segmentation offload (include/uapi/linux/udp.h).
UDP_SEGMENT = 103
SOL_UDP = 17
#: the kernel accepts at most 64 segments and 64 KiB per GSO send
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
#: Linux ``IP_PKTINFO`` (Python 3.11 does not export it)
IP_PKTINFO = 8
#: the DATA header of every 16-bit block number, built once
HEADERS = tuple(tftp.build_data_header(n) for n in range(tftp.BLOCK_MODULO))
#: errors of a GSO send that mean the kernel or device refuses GSO itself
_GSO_REFUSED = (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP)


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def open_request_socket(host: str, port: int) -> tuple[socket.socket, bool]:
    """The non-blocking socket requests arrive on, and whether it reports
    each request's destination address (``IP_PKTINFO``, ``IPV6_PKTINFO``:
    on a wildcard, so a multi-homed node answers from the address the
    client asked; an IPv6 interface nearly always has several, and UEFI
    PXE drops DATA from any other)."""
    family = family_of(host)
    sock = socket.socket(family, socket.SOCK_DGRAM)
    pktinfo = False
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        if family == socket.AF_INET6 and host == "::":
            # both families on one socket whatever net.ipv6.bindv6only says
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        if family == socket.AF_INET and host in ("0.0.0.0", ""):
            sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
            pktinfo = True
        elif family == socket.AF_INET6 and host == "::":
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
            pktinfo = True
    except OSError:
        sock.close()
        raise
    return sock, pktinfo


def pktinfo_dst(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    """The destination address of a request, from its ``IP_PKTINFO`` or
    ``IPV6_PKTINFO`` (an IPv4 client of the dual-stack socket: ``::ffff:a.b.c.d``,
    which a session socket of that family binds as it is)."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return str(ipaddress.IPv4Address(data[8:12]))
        if level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO and len(data) >= 20:
            # struct in6_pktinfo { in6_addr addr; int ifindex; }
            return ipaddress.IPv6Address(data[:16]).compressed
    return None


def open_session_socket(host: str, addr: tuple[str, int], local: str | None) -> socket.socket:
    """A non-blocking socket on an ephemeral port of ``local`` (the address
    the request came to; ``host`` when it cannot be bound), connected to the
    client at ``addr``."""
    sock = socket.socket(family_of(host), socket.SOCK_DGRAM)
    try:
        sock.setblocking(False)
        try:
            sock.bind((local or host, 0))
        except OSError:
            sock.bind((host, 0))
        sock.connect(addr)
    except OSError:
        sock.close()
        raise
    return sock


def error_status(exc: OSError, default: str) -> str:
    """The status a session closes with after ``exc``: a refused connection
    (ICMP port unreachable) means the client is gone."""
    return "vanished" if exc.errno == errno.ECONNREFUSED else default


def send_packet(s: Session, packet: bytes | memoryview) -> str | None:
    """Send one datagram; the status to close with when the socket failed."""
    try:
        s.sock.send(packet)
    except (BlockingIOError, InterruptedError):
        pass                # lost like on the wire; the timer resends
    except OSError as exc:
        return error_status(exc, "send_error")
    return None


class Transmitter:
    """Sends windows of DATA blocks.  ``use_gso`` is whether new sessions
    may use GSO; it turns off for good when the kernel refuses it."""

    def __init__(self, use_gso: bool) -> None:
        self.use_gso = use_gso

    def wants_gso(self, blksize: int, windowsize: int) -> bool:
        """Whether a session with these parameters sends its windows with GSO."""
        return self.use_gso and windowsize > 1 and 2 * (blksize + 4) <= GSO_MAX_BYTES

    def send_window(self, s: Session) -> str | None:
        """Send blocks ``base .. base + windowsize - 1``, counting the ones
        sent before as retransmissions; the status to close with when the
        socket failed."""
        first = s.base
        last = min(s.base + s.windowsize - 1, s.nblocks)
        if first <= s.sent_upto:
            s.retransmits += min(last, s.sent_upto) - first + 1
        if last > s.sent_upto:
            s.sent_upto = last
        if s.gso:
            following = self._send_gso(s, first, last)
            if isinstance(following, str):
                return following
            first = following
        blksize, mv, size, sock = s.blksize, s.mv, s.size, s.sock
        for b in range(first, last + 1):
            off = (b - 1) * blksize
            try:
                sock.send(HEADERS[b & 0xFFFF] + mv[off:min(off + blksize, size)])
            except (BlockingIOError, InterruptedError):
                return None
            except OSError as exc:
                return error_status(exc, "send_error")
        return None

    def _send_gso(self, s: Session, first: int, last: int) -> int | str:
        """Hand blocks ``first .. last`` to the kernel a batch per ``sendmsg``
        (UDP_SEGMENT cuts the batch into datagrams; only the last may be
        short, which is where a file's short last block always is).  Returns
        the first block left for plain sends (``last + 1`` when none is, or
        when the socket buffer is full), or the status to close with."""
        blksize, mv, size = s.blksize, s.mv, s.size
        seg = blksize + 4
        per_call = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // seg))
        anc = [(SOL_UDP, UDP_SEGMENT, struct.pack("=H", seg))]
        block = first
        while block <= last:
            end = min(last, block + per_call - 1)
            iov: list[bytes | memoryview] = []
            for b in range(block, end + 1):
                off = (b - 1) * blksize
                iov.append(HEADERS[b & 0xFFFF])
                iov.append(mv[off:min(off + blksize, size)])
            try:
                s.sock.sendmsg(iov, anc if end > block else [])
            except (BlockingIOError, InterruptedError):
                return last + 1
            except OSError as exc:
                if exc.errno in _GSO_REFUSED:
                    log.warning("tftp: UDP segmentation offload refused (%s); sending each "
                                "block alone from now on", exc.strerror)
                    s.gso = False
                    self.use_gso = False
                    return block
                return error_status(exc, "send_error")
            block = end + 1
        return block


__all__ = [
    "HEADERS",
    "IP_PKTINFO",
    "Transmitter",
    "error_status",
    "family_of",
    "open_request_socket",
    "open_session_socket",
    "pktinfo_dst",
    "send_packet",
]
