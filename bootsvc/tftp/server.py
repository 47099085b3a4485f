"""The TFTP service of a regional node: asyncio UDP, one socket per transfer.

Protocol decisions come from the pure codec (``bootsvc.wire.tftp``) and the safe
root (``bootsvc.tftp.root``); this module only moves datagrams and keeps
sessions.

How it is fast:

* files come from the root's in-memory cache; a transfer slices a
  ``memoryview`` of the cached bytes, so no file system call happens per
  block;
* each transfer's socket is ``connect()``-ed to the client (the kernel drops
  strangers' datagrams, and an ICMP "port unreachable" from a vanished client
  ends the session at once);
* the transfer sockets sit in one epoll set of our own, and that set's file
  descriptor is the only thing the asyncio loop watches for them: one loop
  callback drains every ready session with a plain loop, instead of one
  asyncio handle per datagram (no transport/protocol pair either);
* a window of blocks (RFC 7440 windowsize) goes out in one ``sendmsg`` with
  UDP generic segmentation offload (``UDP_SEGMENT``): the kernel cuts the
  buffer into datagrams, so a window of 16 blocks costs one system call;
  without GSO it falls back to one ``send`` per block;
* retransmission timers are lazy: each send only stores a deadline, and one
  timer per session re-arms itself when it fires early;
* metrics are counted per session and added to the registry once, at the
  end of the transfer;
* a lock-step transfer (no windowsize: most firmware) waits a round trip
  per block, and on loopback or a fast LAN the kernel's wake-up of a
  sleeping process is as long as the round trip itself (longer on a VM):
  after the ready sessions are served, the set is polled again for up to
  ``spin`` seconds (yielding the CPU between polls) before the loop may
  sleep, and while ACKs keep coming the callback hands the loop its other
  work every few polls and then goes on (see :meth:`_on_sessions_ready`);
  it does not poll while another thread of the process has work
  (:attr:`TftpServer.threads_busy`: boot HTTP's WSGI pool), since a thread
  waiting for the GIL behind a busy loop gets it only when the loop blocks
  or after a whole switch interval (5 ms) per acquisition.
  An earlier design drove an idle server's lock-step transfers from threads
  of their own; a thread waiting for the GIL behind a busy event loop got it
  only every few milliseconds (CPython's switch interval), which stalled its
  transfer, and polling on the loop is as fast.

How it stays up: sessions are bounded in total and per client address; a
request that breaks a bound gets an ERROR and creates no session; when the
table is full, a session that has made no progress for a full timeout is
evicted to make room, so abandoned sessions never stop the service.  A
session ends after ``retries`` timeouts without progress, on the client's
ERROR, or on ICMP unreachable.  Duplicate ACKs never trigger a retransmission
in lock-step (Sorcerer's Apprentice); in windowed mode a repeated ACK of the
block before the window (the RFC 7440 "gap" signal) resends the window at
most once per window.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import select
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bootsvc.tftp.root import (
    DEFAULT_VIRTUAL_PATTERN,
    PathRejected,
    TftpRoot,
    VirtualSource,
    prepare_tftp_root,
)
from bootsvc.threaded_loop import ThreadedLoop
from bootsvc.wire import tftp
from bootsvc.wire.tftp import ErrorCode, MalformedPacket, Opcode, OptionRefused
from lpmos.config import Setting, float_range, int_range, parse_optional_path
from lpmos.metrics import Registry

if TYPE_CHECKING:
    from bootsvc.context import NodeContext

log = logging.getLogger("lpmos.tftp")

#: the event loop's busy-poll of the transfer sockets lasts at most this many spins
SPIN_LOOP_SPAN = 4

SETTINGS: tuple[Setting, ...] = (
    Setting("tftp.port", "--tftp-port", 69, int_range(0, 65535),
            "UDP port of the TFTP server (69 is privileged; tests use a high port)",
            metavar="PORT"),
    Setting("tftp.root", "--tftp-root", None, parse_optional_path,
            "read-only directory served over TFTP (default: STATE_DIR/tftp, filled with "
            "Debian's iPXE builds from /usr/lib/ipxe at start)", metavar="DIR"),
    Setting("tftp.max_blksize", "--tftp-max-blksize", 1468, int_range(512, tftp.MAX_BLKSIZE),
            "largest block size (RFC 2348) granted; a client asking more gets this "
            "(1468 fills a 1500-byte Ethernet frame)", metavar="BYTES"),
    Setting("tftp.max_windowsize", "--tftp-max-windowsize", 64, int_range(1, 65535),
            "largest window (RFC 7440 windowsize, blocks sent before an ACK) granted",
            metavar="BLOCKS"),
    Setting("tftp.max_sessions", "--tftp-max-sessions", 1000, int_range(1, 100000),
            "most concurrent transfers; past it, stalled sessions are evicted, else the "
            "request gets ERROR 0 'server busy'", metavar="N"),
    Setting("tftp.max_sessions_per_client", "--tftp-max-sessions-per-client", 8,
            int_range(1, 10000),
            "most concurrent transfers per client IP address", metavar="N"),
    Setting("tftp.timeout", "--tftp-timeout", 1.0, float_range(0.01, 255.0),
            "seconds before a block is retransmitted when the client does not ask for a "
            "timeout (RFC 2349) itself", metavar="SECONDS"),
    Setting("tftp.retries", "--tftp-retries", 5, int_range(1, 50),
            "timeouts without progress before a transfer is abandoned and its session freed "
            "(the wait doubles after each, up to 5 s; a stalled session is evicted sooner "
            "when its slot is needed)",
            metavar="N"),
    Setting("tftp.cache_mb", "--tftp-cache-mb", 256, int_range(0, 65536),
            "megabytes of hot files kept in memory", metavar="MB"),
    Setting("tftp.spin_us", "--tftp-spin", 50, int_range(0, 1000),
            "microseconds the server keeps polling for the next ACK, yielding the CPU "
            "between polls, before it sleeps: saves the kernel's wake-up on a block's "
            f"round trip (lock-step about 2x faster on loopback); at most {SPIN_LOOP_SPAN}x "
            "that before the node's other work gets its turn; 0: never poll",
            metavar="USEC"),
)

#: Linux UDP generic segmentation offload (include/uapi/linux/udp.h).
UDP_SEGMENT = 103
SOL_UDP = 17
#: the kernel accepts at most 64 segments and 64 KiB per GSO send
GSO_MAX_SEGMENTS = 64
GSO_MAX_BYTES = 65000
#: Linux ``IP_PKTINFO`` (Python 3.11 does not export it)
IP_PKTINFO = 8
#: longest wait between retransmissions (atftp's and tftp-hpa's own timeout)
BACKOFF_CAP = 5.0
#: ready transfer sockets handled per wake-up (the rest on the next one)
SESSION_BATCH = 512
#: datagrams taken from the request socket per wake-up
REQUEST_BATCH = 64

_STATE_OACK = 0
_monotonic = time.monotonic   # the clock asyncio's loop.time() reads
_sched_yield = os.sched_yield
_HEADERS = tuple(tftp.build_data_header(n) for n in range(tftp.BLOCK_MODULO))
_STATE_DATA = 1


class _Session:
    """One transfer.  Block numbers here are absolute (1-based, never rolled)."""

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


class TftpServer:
    """A read-only TFTP server on ``host:port`` serving ``root``.

    Usable without a node (benches, tests): ``await start()``, read
    :attr:`port` (the bound port, so ``port=0`` works), ``await stop()``.
    ``virtual(name, (ip, port))`` generates files whose normalised name fully
    matches ``virtual_pattern``; ``on_transfer(record)`` receives a dict per
    finished transfer (client, file, bytes, seconds, status, ...); it must not
    block.
    """

    def __init__(self, root: Path, *, host: str = "0.0.0.0", port: int = 69,
                 metrics: Registry | None = None, virtual: VirtualSource | None = None,
                 on_transfer: Callable[[dict[str, Any]], None] | None = None,
                 max_blksize: int = 1468, max_windowsize: int = 64, max_sessions: int = 1000,
                 max_sessions_per_client: int = 8, timeout: float = 1.0, retries: int = 5,
                 cache_bytes: int = 256 * 1024 * 1024,
                 virtual_pattern: str = DEFAULT_VIRTUAL_PATTERN,
                 use_gso: bool = True, spin: float = 50e-6) -> None:
        self.root = TftpRoot(root, cache_bytes=cache_bytes, virtual=virtual,
                             virtual_pattern=virtual_pattern)
        self.host = host
        self._want_port = port
        self.metrics = metrics if metrics is not None else Registry()
        self.on_transfer = on_transfer
        self.limits = tftp.Limits(max_blksize=max_blksize, max_windowsize=max_windowsize,
                                  default_timeout=timeout)
        self.max_sessions = max_sessions
        self.max_sessions_per_client = max_sessions_per_client
        self.retries = retries
        self.use_gso = use_gso
        self.spin = spin
        self._family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._per_client: dict[str, int] = {}
        self._pktinfo = False
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, _Session] = {}
        #: true while other threads of the process have work (boot HTTP's
        #: WSGI pool): the loop then does not busy-poll for ACKs, see
        #: :meth:`bootsvc.context.NodeContext.threads_busy`
        self.threads_busy: Callable[[], bool] | None = None
        self._describe()

    # --- lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._sock is None:
            return self._want_port
        return int(self._sock.getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
            sock.bind((self.host, self._want_port))
            if self._family == socket.AF_INET and self.host in ("0.0.0.0", ""):
                # learn which of our addresses each request was sent to, so the
                # transfer answers from that address on a multi-homed node
                sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
                self._pktinfo = True
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._loop.add_reader(sock.fileno(), self._on_request)
        self._epoll = select.epoll()
        self._loop.add_reader(self._epoll.fileno(), self._on_sessions_ready)
        log.info("tftp: serving %s on %s:%d", self.root.root, self.host, self.port)

    async def stop(self) -> None:
        if self._sock is not None and self._loop is not None:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
            self._sock = None
        for session in list(self._sessions.values()):
            self._close(session, "shutdown")
        if self._epoll is not None and self._loop is not None:
            self._loop.remove_reader(self._epoll.fileno())
            self._epoll.close()
            self._epoll = None

    # --- metrics -------------------------------------------------------------

    def _describe(self) -> None:
        m = self.metrics
        m.describe("tftp_requests_total", "TFTP requests received on the server port")
        m.describe("tftp_refused_total", "requests answered with an ERROR and no session, "
                                         "by reason")
        m.describe("tftp_dropped_total", "datagrams dropped without an answer, by reason")
        m.describe("tftp_sessions_total", "finished transfers by status")
        m.describe("tftp_bytes_total", "file bytes sent (first transmissions)")
        m.describe("tftp_retransmits_total", "DATA/OACK packets sent again after a timeout "
                                             "or a gap")
        m.describe("tftp_errors_sent_total", "ERROR packets sent, by code")
        m.describe("tftp_client_errors_total", "ERROR packets received from clients, by code")
        m.describe("tftp_transfer_seconds", "time from request to last ACK of finished "
                                            "transfers")
        m.gauge("tftp_sessions_active", lambda: float(len(self._sessions)),
                "transfers in progress")
        m.gauge("tftp_cache_bytes", lambda: float(self.root.cached_bytes),
                "bytes of files held in the TFTP cache")

    # --- requests ------------------------------------------------------------

    def _on_request(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(REQUEST_BATCH):
            try:
                if self._pktinfo:
                    datagram, anc, _flags, addr = sock.recvmsg(2048, 64)
                    local = _pktinfo_dst(anc)
                else:
                    datagram, addr = sock.recvfrom(2048)
                    local = None
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                # an ICMP error queued on the server socket: nothing to do
                continue
            try:
                self._handle_request(datagram, (addr[0], addr[1]), local)
            except Exception:   # one bad datagram must never stop the server
                log.exception("tftp: unexpected error handling a request from %s", addr[0])
                self.metrics.inc("tftp_dropped_total", reason="internal_error")

    def _refuse(self, addr: tuple[str, int], code: int, message: str, reason: str) -> None:
        self.metrics.inc("tftp_refused_total", reason=reason)
        self.metrics.inc("tftp_errors_sent_total", code=code)
        if self._sock is not None:
            try:
                self._sock.sendto(tftp.build_error(code, message), addr)
            except OSError:
                pass

    def _handle_request(self, datagram: bytes, addr: tuple[str, int], local: str | None) -> None:
        self.metrics.inc("tftp_requests_total")
        if addr[1] == 0:
            self.metrics.inc("tftp_dropped_total", reason="source_port_zero")
            return
        try:
            request = tftp.parse_request(datagram)
        except MalformedPacket as exc:
            if len(datagram) >= 2 and datagram[1] == Opcode.ERROR and datagram[0] == 0:
                # never answer an ERROR (two servers could ping-pong forever)
                self.metrics.inc("tftp_dropped_total", reason="error_on_server_port")
                return
            message = ("only read requests are served here"
                       if exc.reason == "not_a_request" else f"malformed request: {exc.reason}")
            self._refuse(addr, ErrorCode.ILLEGAL_OPERATION, message, exc.reason)
            return
        if request.opcode == Opcode.WRQ:
            self._refuse(addr, ErrorCode.ILLEGAL_OPERATION,
                         "write requests are refused (read-only server)", "wrq")
            return
        existing = self._sessions.get(addr)
        if existing is not None:
            # a pending ERROR on the old session (a tsize probe being aborted,
            # or a transfer the client gives up and asks for again) must be
            # seen before deciding the new request is a duplicate
            self._on_readable(existing)
            if not existing.closed:
                if existing.request == datagram:
                    # the client did not hear our first answer: say it again;
                    # a late copy once the transfer is under way is ignored
                    self.metrics.inc("tftp_dropped_total", reason="duplicate_request")
                    if existing.state == _STATE_OACK or existing.base == 1:
                        existing.retransmits += 1
                        self._send_current(existing)
                    return
                self._close(existing, "superseded")
        if not self._make_room(addr):
            return
        try:
            content = self.root.open(request.filename, addr,
                                     netascii=request.mode == "netascii")
        except PathRejected as exc:
            self._refuse(addr, exc.code, str(exc), exc.reason)
            return
        try:
            negotiated = tftp.decide_options(request.options, len(content.data), self.limits)
        except OptionRefused as exc:
            self._refuse(addr, ErrorCode.OPTION_REFUSED, str(exc), exc.reason)
            return
        try:
            sock = self._session_socket(addr, local)
        except OSError as exc:
            self._refuse(addr, ErrorCode.NOT_DEFINED, "server cannot open a socket",
                         f"socket_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
            return
        self._open_session(sock, addr, request, datagram, content.name, content.data,
                           content.virtual, negotiated)

    def _make_room(self, addr: tuple[str, int]) -> bool:
        """Apply the session bounds; evict stalled sessions rather than refuse.

        False means the request was refused with ERROR 0 and counted."""
        assert self._loop is not None
        now = self._loop.time()
        ip = addr[0]
        if self._per_client.get(ip, 0) >= self.max_sessions_per_client:
            victim = self._stalest(now, ip)
            if victim is None:
                self._refuse(addr, ErrorCode.NOT_DEFINED,
                             "too many transfers from your address", "per_client_limit")
                return False
            self._close(victim, "evicted")
        if len(self._sessions) >= self.max_sessions:
            victim = self._stalest(now, None)
            if victim is None:
                self._refuse(addr, ErrorCode.NOT_DEFINED, "server busy", "session_limit")
                return False
            self._close(victim, "evicted")
        return True

    def _stalest(self, now: float, ip: str | None) -> _Session | None:
        """The session (of ``ip``, or any) idle longest, if idle a full timeout."""
        best: _Session | None = None
        for session in self._sessions.values():
            if ip is not None and session.client[0] != ip:
                continue
            if best is None or session.last_progress < best.last_progress:
                best = session
        if best is not None and now - best.last_progress >= best.timeout:
            return best
        return None

    def _session_socket(self, addr: tuple[str, int], local: str | None) -> socket.socket:
        sock = socket.socket(self._family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            bind_host = local or self.host
            try:
                sock.bind((bind_host, 0))
            except OSError:
                sock.bind((self.host, 0))
            sock.connect(addr)
        except OSError:
            sock.close()
            raise
        return sock

    def _open_session(self, sock: socket.socket, addr: tuple[str, int], request: tftp.Request,
                      datagram: bytes, name: str, data: bytes, virtual: bool,
                      negotiated: tftp.Negotiated) -> None:
        assert self._loop is not None
        s = _Session()
        s.closed, s.timer = False, None
        s.sock, s.fd, s.client, s.request = sock, sock.fileno(), addr, datagram
        s.name, s.data, s.mv, s.size, s.virtual = name, data, memoryview(data), len(data), virtual
        # retransmit after the client's timeout (RFC 2349) or ours, whichever
        # is shorter: an early retransmission costs a duplicate the client
        # ignores, a late one costs the whole transfer a stall
        s.blksize, s.windowsize = negotiated.blksize, negotiated.windowsize
        s.timeout = min(negotiated.timeout, self.limits.default_timeout)
        s.nblocks = tftp.block_count(len(data), negotiated.blksize)
        s.base, s.sent_upto, s.acked_dup = 1, 0, False
        s.retransmits = 0
        s.retries_left = self.retries
        s.started = s.last_progress = self._loop.time()
        s.deadline = s.started + s.timeout
        s.gso = self.use_gso and negotiated.windowsize > 1 and \
            2 * (negotiated.blksize + 4) <= GSO_MAX_BYTES
        s.oack = tftp.build_oack(negotiated.oack) if negotiated.oack else b""
        s.state = _STATE_OACK if s.oack else _STATE_DATA
        self._sessions[addr] = s
        self._per_client[addr[0]] = self._per_client.get(addr[0], 0) + 1
        assert self._epoll is not None
        self._by_fd[s.fd] = s
        self._epoll.register(s.fd, select.EPOLLIN)
        self._send_current(s)

    # --- transfers -----------------------------------------------------------

    def _send_current(self, s: _Session) -> None:
        """(Re)send what the session is waiting an ACK for: OACK or the window."""
        if s.state == _STATE_OACK:
            self._send(s, s.oack)
        else:
            self._send_window(s)
        self._arm(s)

    def _send(self, s: _Session, packet: bytes | memoryview) -> bool:
        try:
            s.sock.send(packet)
            return True
        except (BlockingIOError, InterruptedError):
            return True     # lost like on the wire; the timer resends
        except OSError as exc:
            self._close(s, "vanished" if exc.errno == errno.ECONNREFUSED else "send_error")
            return False

    def _send_window(self, s: _Session) -> None:
        """Send blocks ``base .. base + windowsize - 1``.  A full socket buffer
        loses the rest of the window, as the wire would; the timer resends."""
        first = s.base
        last = min(s.base + s.windowsize - 1, s.nblocks)
        if first <= s.sent_upto:
            s.retransmits += min(last, s.sent_upto) - first + 1
        if last > s.sent_upto:
            s.sent_upto = last
        if s.gso:
            following = self._send_gso(s, first, last)
            if following is None:
                return
            first = following
        blksize, mv, size, sock = s.blksize, s.mv, s.size, s.sock
        for b in range(first, last + 1):
            off = (b - 1) * blksize
            try:
                sock.send(_HEADERS[b & 0xFFFF] + mv[off:min(off + blksize, size)])
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._close(s, "vanished" if exc.errno == errno.ECONNREFUSED else "send_error")
                return

    def _send_gso(self, s: _Session, first: int, last: int) -> int | None:
        """Hand blocks ``first .. last`` to the kernel a batch per ``sendmsg``
        (UDP_SEGMENT cuts the batch into datagrams; only the last may be
        short, which is where a file's short last block always is).  Returns
        the first block left for plain sends (``last + 1`` when none is, or
        when the socket buffer is full), None when the session was closed."""
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
                iov.append(_HEADERS[b & 0xFFFF])
                iov.append(mv[off:min(off + blksize, size)])
            try:
                s.sock.sendmsg(iov, anc if end > block else [])
            except (BlockingIOError, InterruptedError):
                return last + 1
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.ENOPROTOOPT, errno.EOPNOTSUPP):
                    log.warning("tftp: UDP segmentation offload refused (%s); sending each "
                                "block alone from now on", exc.strerror)
                    s.gso = False
                    self.use_gso = False
                    return block
                self._close(s, "vanished" if exc.errno == errno.ECONNREFUSED else "send_error")
                return None
            block = end + 1
        return block

    def _arm(self, s: _Session) -> None:
        if s.closed:
            return
        assert self._loop is not None
        s.deadline = self._loop.time() + s.timeout
        if s.timer is None:
            s.timer = self._loop.call_at(s.deadline, self._on_timer, s)

    def _on_timer(self, s: _Session) -> None:
        s.timer = None
        if s.closed:
            return
        assert self._loop is not None
        now = self._loop.time()
        if now < s.deadline - 0.0005:
            s.timer = self._loop.call_at(s.deadline, self._on_timer, s)
            return
        s.retries_left -= 1
        if s.retries_left < 0:
            self._close(s, "timeout")
            return
        if s.state == _STATE_OACK:
            s.retransmits += 1
        s.acked_dup = False
        self._send_current(s)
        # back off: the wait doubles per timeout without progress, up to
        # BACKOFF_CAP, so a client that only re-ACKs after its own (often
        # 5 s) timeout is still heard before the session is given up
        tries = self.retries - s.retries_left
        s.deadline = now + min(s.timeout * (2 ** tries), max(s.timeout, BACKOFF_CAP))

    def _on_sessions_ready(self) -> None:
        """Every ready transfer socket, from our epoll set, in one callback.

        Then, while transfers are in flight, the set is polled again (yielding
        the CPU between polls) until no ACK came for :attr:`spin` seconds: an
        ACK that arrives within the spin is answered without a wake-up.  After
        :data:`SPIN_LOOP_SPAN` times that with ACKs still coming, the callback
        schedules itself again and returns, so the loop's other work (new
        requests, DHCP, HTTP) is at most that long behind and the transfers
        go on without sleeping; once no ACK comes for a spin, the loop may
        sleep.  No polling while :attr:`threads_busy` says other threads
        have work: they need the GIL, which they get when the loop blocks."""
        epoll = self._epoll
        if epoll is None:
            return
        by_fd = self._by_fd
        on_readable = self._on_readable
        for fd, _ in epoll.poll(0, SESSION_BATCH):
            s = by_fd.get(fd)
            if s is not None:
                on_readable(s)
        spin = self.spin
        if not spin or not by_fd or (self.threads_busy is not None and self.threads_busy()):
            return
        now = _monotonic()
        end, limit = now + spin, now + SPIN_LOOP_SPAN * spin
        while now < end:
            _sched_yield()
            ready = epoll.poll(0, SESSION_BATCH)
            for fd, _ in ready:
                s = by_fd.get(fd)
                if s is not None:
                    on_readable(s)
            if not by_fd:
                return
            now = _monotonic()
            if ready:
                end = now + spin
                if end > limit:
                    # ACKs still flowing: let the loop's other work run, then go on
                    self._loop.call_soon(self._on_sessions_ready)  # type: ignore[union-attr]
                    return

    def _on_readable(self, s: _Session) -> None:
        if s.closed:
            return
        try:
            datagram = s.sock.recv(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(s, "vanished" if exc.errno == errno.ECONNREFUSED else "recv_error")
            return
        if len(datagram) == 4 and datagram[1] == 4 and datagram[0] == 0:
            ack = (datagram[2] << 8) | datagram[3]
        else:
            self._on_other_packet(s, datagram)
            return
        if s.windowsize == 1 and s.state == _STATE_DATA:
            # lock-step fast path: the ACK of the one block in flight
            block = s.base
            if ack != block & 0xFFFF:
                return      # duplicate or stray ACK: never answered (Sorcerer's Apprentice)
            if block >= s.nblocks:
                s.base = block + 1
                self._close(s, "ok")
                return
            block += 1
            s.base = s.sent_upto = block
            off = (block - 1) * s.blksize
            now = _monotonic()
            s.last_progress = now
            s.deadline = now + s.timeout
            s.retries_left = self.retries
            try:
                s.sock.send(_HEADERS[block & 0xFFFF] + s.mv[off:off + s.blksize])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._close(s, "vanished" if exc.errno == errno.ECONNREFUSED else "send_error")
                return
            if s.timer is None:
                s.timer = self._loop.call_at(s.deadline, self._on_timer, s)  # type: ignore[union-attr]
            return
        if s.state == _STATE_OACK:
            if ack != 0:
                return      # stray; wait for ACK 0 or the timer
            s.state = _STATE_DATA
            self._progress(s)
            self._send_window(s)
            self._arm(s)
            return
        block = tftp.unwrap_block(ack, s.sent_upto)
        if block >= s.base:
            if block >= s.nblocks:
                s.base = s.nblocks + 1
                self._close(s, "ok")
                return
            s.base = block + 1
            s.acked_dup = False
            self._progress(s)
            self._send_window(s)
            self._arm(s)
        elif block == s.base - 1 and s.windowsize > 1 and not s.acked_dup \
                and s.sent_upto >= s.base:
            # RFC 7440: the receiver saw a gap at the window's first block
            s.acked_dup = True
            self._send_window(s)
            self._arm(s)
        # else: a duplicate ACK; never answered (Sorcerer's Apprentice)

    def _progress(self, s: _Session) -> None:
        assert self._loop is not None
        s.last_progress = self._loop.time()
        s.retries_left = self.retries

    def _on_other_packet(self, s: _Session, datagram: bytes) -> None:
        """Anything but an ACK on a session's port: dropped (malformed), or
        the end of the session (the client's ERROR, an illegal packet)."""
        try:
            packet = tftp.parse_packet(datagram)
        except MalformedPacket as exc:
            self.metrics.inc("tftp_dropped_total", reason=f"session_{exc.reason}")
            return
        if isinstance(packet, tftp.Error):
            self.metrics.inc("tftp_client_errors_total", code=packet.code)
            self._close(s, "aborted" if s.state == _STATE_OACK else "client_error")
            return
        # DATA, RRQ, OACK on a read transfer's port: illegal (RFC 1350)
        self.metrics.inc("tftp_errors_sent_total", code=ErrorCode.ILLEGAL_OPERATION)
        if self._send(s, tftp.build_error(ErrorCode.ILLEGAL_OPERATION, "unexpected packet")):
            self._close(s, "illegal_packet")

    def _close(self, s: _Session, status: str) -> None:
        if s.closed:
            return
        s.closed = True
        if s.timer is not None:
            s.timer.cancel()
            s.timer = None
        if self._by_fd.get(s.fd) is s:
            del self._by_fd[s.fd]
            if self._epoll is not None:
                self._epoll.unregister(s.fd)
        s.sock.close()
        if self._sessions.get(s.client) is s:
            del self._sessions[s.client]
        ip = s.client[0]
        left = self._per_client.get(ip, 1) - 1
        if left > 0:
            self._per_client[ip] = left
        else:
            self._per_client.pop(ip, None)
        now = self._loop.time() if self._loop is not None else s.started
        seconds = now - s.started
        sent = s.size if status == "ok" else min(s.size, max(0, s.sent_upto) * s.blksize)
        m = self.metrics
        m.inc("tftp_sessions_total", status=status)
        m.inc("tftp_bytes_total", sent)
        if s.retransmits:
            m.inc("tftp_retransmits_total", s.retransmits)
        if status == "ok":
            m.observe("tftp_transfer_seconds", seconds)
        if self.on_transfer is not None:
            record = {"client": ip, "port": s.client[1], "file": s.name, "bytes": sent,
                      "size": s.size, "seconds": round(seconds, 6), "status": status,
                      "blksize": s.blksize, "windowsize": s.windowsize,
                      "retransmits": s.retransmits, "virtual": s.virtual}
            try:
                self.on_transfer(record)
            except Exception:
                log.exception("tftp: on_transfer callback failed")
        s.data = b""
        _release(s)

def _release(s: _Session) -> None:
    try:
        s.mv.release()
    except BufferError:   # a slice still queued somewhere; the GC frees it
        pass


def _pktinfo_dst(ancdata: list[tuple[int, int, bytes]]) -> str | None:
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= 12:
            # struct in_pktinfo { int ifindex; in_addr spec_dst; in_addr addr; }
            return str(ipaddress.IPv4Address(data[8:12]))
    return None


# --- the node's service ------------------------------------------------------

BOOT_SCRIPT = "boot.ipxe"


def render_chain_script(advertise_url: str) -> bytes:
    """The constant iPXE script served as ``boot.ipxe`` over TFTP: it chains
    to the node's HTTP ``/boot.ipxe`` and retries with a pause if that fails."""
    url = f"{advertise_url.rstrip('/')}/boot.ipxe"
    return (
        "#!ipxe\n"
        ":retry\n"
        f"chain --autofree --replace {url} || goto failed\n"
        ":failed\n"
        f"echo LPMOS: cannot fetch {url}; retrying in 5 seconds\n"
        "sleep 5\n"
        "goto retry\n"
    ).encode("ascii")


class TftpService:
    """The regional node's TFTP service: a :class:`TftpServer` configured
    from the node's settings, counting into the node's registry and recording
    each transfer in the node's timeline (under ``ip:<addr>``: TFTP knows no
    MAC)."""

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        cfg = ctx.config
        root = cfg.get("tftp.root")
        self.root = Path(root) if root else Path(cfg["state_dir"]) / "tftp"
        self.prepare = not root
        self._script = render_chain_script(ctx.advertise_url) if ctx.advertise_url else None
        self.server = TftpServer(
            self.root, host=cfg.get("regional.listen", "0.0.0.0"),
            port=int(cfg.get("tftp.port", 69)), metrics=ctx.metrics,
            virtual=self._virtual, on_transfer=self._on_transfer,
            max_blksize=int(cfg.get("tftp.max_blksize", 1468)),
            max_windowsize=int(cfg.get("tftp.max_windowsize", 64)),
            max_sessions=int(cfg.get("tftp.max_sessions", 1000)),
            max_sessions_per_client=int(cfg.get("tftp.max_sessions_per_client", 8)),
            timeout=float(cfg.get("tftp.timeout", 1.0)),
            retries=int(cfg.get("tftp.retries", 5)),
            cache_bytes=int(cfg.get("tftp.cache_mb", 256)) * 1024 * 1024,
            virtual_pattern=r"boot\.ipxe",
            spin=int(cfg.get("tftp.spin_us", 50)) / 1e6,
        )
        self.server.threads_busy = ctx.threads_busy

    @property
    def port(self) -> int:
        return self.server.port

    async def start(self) -> None:
        if self.prepare:
            placed = prepare_tftp_root(self.root)
            log.info("tftp: root %s prepared with %s", self.root, ", ".join(placed) or "nothing")
        elif not self.root.is_dir():
            log.warning("tftp: root %s is not a directory; every request will fail", self.root)
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    def _virtual(self, name: str, client: tuple[str, int]) -> bytes | None:
        if name == BOOT_SCRIPT:
            return self._script
        return None

    def _on_transfer(self, record: dict[str, Any]) -> None:
        detail = {"file": record["file"], "bytes": record["bytes"],
                  "seconds": record["seconds"], "status": record["status"]}
        try:
            self.ctx.timeline.record(f"ip:{record['client']}", "tftp", detail)
        except Exception:
            log.exception("tftp: timeline record failed")


class ThreadedTftpServer:
    """A :class:`TftpServer` on its own event loop in a daemon thread, for
    tests and benches that drive it from blocking code::

        with ThreadedTftpServer(root, host="127.0.0.1", port=0) as server:
            fetch(server.port)
    """

    def __init__(self, root: Path, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._root = root
        self._loop: ThreadedLoop | None = None
        self.server: TftpServer | None = None

    def __enter__(self) -> TftpServer:
        self._loop = ThreadedLoop("tftp-server")

        async def start() -> TftpServer:
            server = TftpServer(self._root, **self._kwargs)
            await server.start()
            return server

        self.server = self._loop.call(start(), 10)
        return self.server

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result (thread-safe
        access to the server's state)."""
        async def run() -> Any:
            return fn()
        assert self._loop is not None
        return self._loop.call(run(), 10)

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        if self.server is not None:
            self._loop.call(self.server.stop(), 10)
        self._loop.close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bootsvc.tftp.server ROOT``: the server alone (benchmarks)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m bootsvc.tftp.server",
                                     description="serve ROOT over TFTP, nothing else")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6969)
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--retries", type=int, default=5)
    parser.add_argument("--max-sessions", type=int, default=1000)
    parser.add_argument("--max-sessions-per-client", type=int, default=8)
    parser.add_argument("--max-windowsize", type=int, default=64)
    parser.add_argument("--max-blksize", type=int, default=1468)
    parser.add_argument("--no-gso", action="store_true", help="one send per block")
    parser.add_argument("--spin", type=int, default=50, metavar="USEC",
                        help="microseconds the server busy-polls for the next ACK before it "
                             "sleeps (0: never)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def serve() -> None:
        server = TftpServer(args.root, host=args.host, port=args.port, timeout=args.timeout,
                            retries=args.retries, max_sessions=args.max_sessions,
                            max_sessions_per_client=args.max_sessions_per_client,
                            max_windowsize=args.max_windowsize, max_blksize=args.max_blksize,
                            use_gso=not args.no_gso, spin=args.spin / 1e6)
        await server.start()
        print(f"listening {args.host}:{server.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


__all__ = [
    "SETTINGS",
    "TftpServer",
    "TftpService",
    "ThreadedTftpServer",
    "render_chain_script",
]

if __name__ == "__main__":
    raise SystemExit(main())

