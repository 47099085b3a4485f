"""One TFTP read transfer's state, and the pure decisions the server makes
on it: what an ACK means, how long to wait before a retransmission, which
session to evict, what a finished transfer reports.

Block numbers here are absolute (1-based, never rolled over at 65536); the
wire's 16-bit numbers are unwrapped against the highest block sent.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterable
from enum import Enum
from typing import Any

from bootsvc.wire import tftp

#: longest wait between retransmissions (atftp's and tftp-hpa's own timeout)
BACKOFF_CAP = 5.0

#: waiting for the ACK of the OACK (block 0)
STATE_OACK = 0
#: sending DATA blocks
STATE_DATA = 1


class Session:
    """One transfer: its socket, its file, and where the window stands."""

    __slots__ = ("acked_dup", "base", "blksize", "client", "closed", "data", "deadline", "fd",
                 "gso", "last_progress", "mv", "name", "nblocks", "oack", "request",
                 "retransmits", "retries_left", "sent_upto", "size", "sock", "started", "state",
                 "timeout", "timer", "virtual", "windowsize")

    acked_dup: bool          # the gap signal was answered for the current window
    base: int                # first block not yet acknowledged
    blksize: int
    client: tuple[str, int]
    closed: bool
    data: bytes
    deadline: float          # loop time after which the timer retransmits
    fd: int
    gso: bool
    last_progress: float
    mv: memoryview
    name: str
    nblocks: int
    oack: bytes              # empty when no option was negotiated
    request: bytes           # the RRQ datagram, to recognise its retransmissions
    retransmits: int
    retries_left: int
    sent_upto: int           # highest block sent so far
    size: int
    sock: socket.socket
    started: float
    state: int
    timeout: float
    timer: asyncio.TimerHandle | None
    virtual: bool
    windowsize: int


def new_session(sock: socket.socket, client: tuple[str, int], request: bytes, name: str,
                data: bytes, virtual: bool, negotiated: tftp.Negotiated, *, now: float,
                retries: int, default_timeout: float, gso: bool) -> Session:
    """A session about to send its first packet: the OACK when options were
    negotiated, else block 1."""
    s = Session()
    s.closed, s.timer = False, None
    s.sock, s.fd, s.client, s.request = sock, sock.fileno(), client, request
    s.name, s.data, s.mv, s.size, s.virtual = name, data, memoryview(data), len(data), virtual
    # retransmit after the client's timeout (RFC 2349) or ours, whichever
    # is shorter: an early retransmission costs a duplicate the client
    # ignores, a late one costs the whole transfer a stall
    s.blksize, s.windowsize = negotiated.blksize, negotiated.windowsize
    s.timeout = min(negotiated.timeout, default_timeout)
    s.nblocks = tftp.block_count(len(data), negotiated.blksize)
    s.base, s.sent_upto, s.acked_dup = 1, 0, False
    s.retransmits = 0
    s.retries_left = retries
    s.started = s.last_progress = now
    s.deadline = s.started + s.timeout
    s.gso = gso
    s.oack = tftp.build_oack(negotiated.oack) if negotiated.oack else b""
    s.state = STATE_OACK if s.oack else STATE_DATA
    return s


def release(s: Session) -> None:
    """Drop the session's view of its file's bytes."""
    s.data = b""
    try:
        s.mv.release()
    except BufferError:   # a slice still queued somewhere; the GC frees it
        pass


# --- decisions ---------------------------------------------------------------


class AckAction(Enum):
    """What the server does with an ACK."""

    IGNORE = "ignore"      # stray or duplicate: never answered (Sorcerer's Apprentice)
    START = "start"        # the OACK is acknowledged: send the first window
    ADVANCE = "advance"    # blocks up to the returned one are acknowledged: slide the window
    DONE = "done"          # the last block is acknowledged: the transfer is complete
    GAP = "gap"            # RFC 7440: the receiver missed the window's first block: resend


def decide_ack(ack16: int, *, oack_pending: bool, base: int, sent_upto: int, nblocks: int,
               windowsize: int, gap_answered: bool) -> tuple[AckAction, int]:
    """What the ACK of 16-bit block ``ack16`` means for a session whose first
    unacknowledged block is ``base``, and the absolute block it acknowledges.

    A repeated ACK of the block before the window is the RFC 7440 gap signal,
    answered at most once per window (``gap_answered``) and never in
    lock-step, where it is just a duplicate."""
    if oack_pending:
        return (AckAction.START, 0) if ack16 == 0 else (AckAction.IGNORE, 0)
    block = tftp.unwrap_block(ack16, sent_upto)
    if block >= base:
        return (AckAction.DONE if block >= nblocks else AckAction.ADVANCE), block
    if block == base - 1 and windowsize > 1 and not gap_answered and sent_upto >= base:
        return AckAction.GAP, block
    return AckAction.IGNORE, block


class Repeat(Enum):
    """What the server does with a request from the address of a live session."""

    RESEND = "resend"          # the same request before the transfer got going: answer again
    IGNORE = "ignore"          # the same request, late: the transfer is under way
    SUPERSEDE = "supersede"    # another request: the old session ends, a new one starts


def decide_repeat(same_request: bool, *, oack_pending: bool, base: int) -> Repeat:
    """A request from a client that has a session: a copy of the session's
    own request means the client did not hear the first answer, which is
    said again only while nothing else has been acknowledged."""
    if not same_request:
        return Repeat.SUPERSEDE
    return Repeat.RESEND if oack_pending or base == 1 else Repeat.IGNORE


def backoff_delay(timeout: float, tries: int) -> float:
    """Seconds before the next retransmission after ``tries`` timeouts without
    progress: the wait doubles per timeout, up to :data:`BACKOFF_CAP` (never
    below ``timeout``), so a client that only re-ACKs after its own (often
    5 s) timeout is still heard before the session is given up."""
    return min(timeout * (2.0 ** tries), max(timeout, BACKOFF_CAP))


def stalest(sessions: Iterable[Session], now: float, ip: str | None) -> Session | None:
    """The session (of ``ip``, or any) idle longest, if idle a full timeout:
    the one a new request may evict."""
    best: Session | None = None
    for session in sessions:
        if ip is not None and session.client[0] != ip:
            continue
        if best is None or session.last_progress < best.last_progress:
            best = session
    if best is not None and now - best.last_progress >= best.timeout:
        return best
    return None


def sent_bytes(status: str, size: int, sent_upto: int, blksize: int) -> int:
    """File bytes a transfer that ended with ``status`` sent: the whole file
    when it completed, else the blocks sent so far (at most the file)."""
    return size if status == "ok" else min(size, max(0, sent_upto) * blksize)


def transfer_record(s: Session, status: str, seconds: float) -> dict[str, Any]:
    """What ``on_transfer`` receives for a finished transfer."""
    return {"client": s.client[0], "port": s.client[1], "file": s.name,
            "bytes": sent_bytes(status, s.size, s.sent_upto, s.blksize),
            "size": s.size, "seconds": round(seconds, 6), "status": status,
            "blksize": s.blksize, "windowsize": s.windowsize,
            "retransmits": s.retransmits, "virtual": s.virtual}


__all__ = [
    "BACKOFF_CAP",
    "STATE_DATA",
    "STATE_OACK",
    "AckAction",
    "Repeat",
    "Session",
    "backoff_delay",
    "decide_ack",
    "decide_repeat",
    "new_session",
    "release",
    "sent_bytes",
    "stalest",
    "transfer_record",
]
