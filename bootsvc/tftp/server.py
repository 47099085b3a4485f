"""The TFTP transfer engine: a read-only server on the asyncio loop, one
connected socket per transfer.

Protocol decisions come from the codec (``bootsvc.wire.tftp``), the safe root
(``bootsvc.tftp.root``) and the session's decisions (``bootsvc.tftp.session``);
this module only moves datagrams and keeps sessions.  Every transfer runs on
the loop rather than on threads, because a thread waiting for the GIL behind
a busy loop gets it only every switch interval and its transfer stalls.  One
epoll set holds the transfer sockets and one loop callback serves all ready
ones, then polls for up to ``spin`` seconds, since waking a sleeping process
costs about a lock-step block's round trip.

How it stays up: sessions are bounded in total and per client address; a
request past a bound gets an ERROR and creates no session, unless a session
idle for a full timeout can be evicted to make room.  A session ends after
``retries`` timeouts without progress, on the client's ERROR, or on ICMP
unreachable.  Duplicate ACKs never trigger a retransmission in lock-step
(Sorcerer's Apprentice); in windowed mode the RFC 7440 gap signal resends the
window at most once per window.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import replace
from pathlib import Path
from typing import Any

from bootsvc.tftp.root import (
    DEFAULT_VIRTUAL_PATTERN,
    ContentPending,
    FileContent,
    FileNotFound,
    PathRejected,
    TftpRoot,
    VirtualSource,
)
from bootsvc.tftp.session import (
    STATE_DATA,
    STATE_OACK,
    AckAction,
    Repeat,
    Session,
    backoff_delay,
    decide_ack,
    decide_repeat,
    new_session,
    release,
    stalest,
)
from bootsvc.tftp.settings import SPIN_LOOP_SPAN, TftpSettings
from bootsvc.tftp.sockets import (
    HEADERS,
    Transmitter,
    error_status,
    open_request_socket,
    open_session_socket,
    pktinfo_dst,
    send_packet,
)
from bootsvc.tftp.stats import count_transfer, describe_metrics
from bootsvc.wire import tftp
from bootsvc.wire.tftp import ErrorCode, MalformedPacket, Opcode, OptionRefused, to_netascii
from lpmos.metrics import Registry

log = logging.getLogger("lpmos.tftp")

#: ready transfer sockets handled per wake-up (the rest on the next one)
SESSION_BATCH = 512
#: datagrams taken from the request socket per wake-up
REQUEST_BATCH = 64

_monotonic = time.monotonic   # the clock asyncio's loop.time() reads
_sched_yield = os.sched_yield


class TftpServer:
    """A read-only TFTP server on ``host:settings.port`` serving ``root``.

    Usable without a node (benches, tests): ``await start()``, read
    :attr:`port` (the bound port, so port 0 works), ``await stop()``.
    Keyword ``overrides`` replace fields of ``settings`` (``timeout=0.5``).
    ``virtual(name, (ip, port))`` generates files whose normalised name fully
    matches ``virtual_pattern``; ``on_transfer(record)`` receives a dict per
    finished transfer (client, file, bytes, seconds, status, ...); it must not
    block.  ``use_gso=False`` sends each block alone.
    """

    def __init__(self, root: Path, settings: TftpSettings | None = None, *,
                 host: str = "0.0.0.0", metrics: Registry | None = None,
                 virtual: VirtualSource | None = None,
                 on_transfer: Callable[[dict[str, Any]], None] | None = None,
                 virtual_pattern: str = DEFAULT_VIRTUAL_PATTERN,
                 use_gso: bool = True, **overrides: Any) -> None:
        self.settings = replace(settings or TftpSettings(), **overrides)
        self.root = TftpRoot(root, cache_bytes=self.settings.cache_bytes, virtual=virtual,
                             virtual_pattern=virtual_pattern)
        self.host = host
        self.metrics = metrics if metrics is not None else Registry()
        self.on_transfer = on_transfer
        self.limits = self.settings.limits
        self.max_sessions = self.settings.max_sessions
        self.max_sessions_per_client = self.settings.max_sessions_per_client
        self.retries = self.settings.retries
        self.spin = self.settings.spin
        self._tx = Transmitter(use_gso)
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sessions: dict[tuple[str, int], Session] = {}
        #: requests whose virtual file is being made on a thread (ContentPending)
        self._deferred: set[tuple[str, int]] = set()
        self._per_client: dict[str, int] = {}
        self._pktinfo = False
        self._epoll: select.epoll | None = None
        self._by_fd: dict[int, Session] = {}
        #: true while other threads of the process have work (boot HTTP's
        #: WSGI pool): the loop then does not busy-poll for ACKs, see
        #: :meth:`bootsvc.context.NodeContext.threads_busy`
        self.threads_busy: Callable[[], bool] | None = None
        describe_metrics(self.metrics, lambda: float(len(self._sessions)),
                         lambda: float(self.root.cached_bytes))

    # --- lifecycle -----------------------------------------------------------

    @property
    def port(self) -> int:
        if self._sock is None:
            return self.settings.port
        return int(self._sock.getsockname()[1])

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock, self._pktinfo = open_request_socket(self.host, self.settings.port)
        self._loop.add_reader(self._sock.fileno(), self._on_request)
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

    # --- requests ------------------------------------------------------------

    def _on_request(self) -> None:
        sock = self._sock
        if sock is None:
            return
        for _ in range(REQUEST_BATCH):
            try:
                if self._pktinfo:
                    datagram, anc, _flags, addr = sock.recvmsg(2048, 64)
                    local = pktinfo_dst(anc)
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
        request = self._read_request(datagram, addr)
        if request is None:
            return
        existing = self._sessions.get(addr)
        if existing is not None and self._answered_by(existing, datagram):
            return
        if addr in self._deferred:
            self.metrics.inc("tftp_dropped_total", reason="duplicate_request")
            return
        if not self._make_room(addr):
            return
        netascii = request.mode == "netascii"
        try:
            content = self.root.open(request.filename, addr, netascii=netascii)
        except PathRejected as exc:
            self._refuse(addr, exc.code, str(exc), exc.reason)
            return
        except ContentPending as pending:
            self._defer(pending, request, datagram, addr, local, netascii)
            return
        self._start_transfer(request, datagram, addr, local, content)

    def _defer(self, pending: ContentPending, request: tftp.Request, datagram: bytes,
               addr: tuple[str, int], local: str | None, netascii: bool) -> None:
        """Answer ``request`` once its virtual file is made on another thread
        (repeats of it meanwhile are dropped as duplicates)."""
        loop = self._loop
        assert loop is not None
        self._deferred.add(addr)

        def done(future: Future[bytes | None]) -> None:
            with contextlib.suppress(RuntimeError):        # the loop has closed
                loop.call_soon_threadsafe(self._finish_deferred, pending.name, future,
                                          request, datagram, addr, local, netascii)
        pending.future.add_done_callback(done)

    def _finish_deferred(self, name: str, future: Future[bytes | None], request: tftp.Request,
                         datagram: bytes, addr: tuple[str, int], local: str | None,
                         netascii: bool) -> None:
        if addr not in self._deferred or self._sock is None:
            return
        self._deferred.discard(addr)
        try:
            data = future.result()
        except Exception:
            log.exception("tftp: generating %s for %s failed", name, addr[0])
            self._refuse(addr, ErrorCode.NOT_DEFINED, "server error", "virtual_failed")
            return
        if data is None:
            missing = FileNotFound()
            self._refuse(addr, missing.code, str(missing), missing.reason)
            return
        if not self._make_room(addr):
            return
        content = FileContent(name, to_netascii(data) if netascii else data, True)
        self._start_transfer(request, datagram, addr, local, content)

    def _start_transfer(self, request: tftp.Request, datagram: bytes, addr: tuple[str, int],
                        local: str | None, content: FileContent) -> None:
        try:
            negotiated = tftp.decide_options(request.options, len(content.data), self.limits)
        except OptionRefused as exc:
            self._refuse(addr, ErrorCode.OPTION_REFUSED, str(exc), exc.reason)
            return
        try:
            sock = open_session_socket(self.host, addr, local)
        except OSError as exc:
            self._refuse(addr, ErrorCode.NOT_DEFINED, "server cannot open a socket",
                         f"socket_{errno.errorcode.get(exc.errno or 0, 'error').lower()}")
            return
        self._open_session(sock, addr, datagram, content, negotiated)

    def _read_request(self, datagram: bytes, addr: tuple[str, int]) -> tftp.Request | None:
        """The read request in ``datagram``, or None when it was refused or
        dropped (and counted)."""
        try:
            request = tftp.parse_request(datagram)
        except MalformedPacket as exc:
            if len(datagram) >= 2 and datagram[1] == Opcode.ERROR and datagram[0] == 0:
                # never answer an ERROR (two servers could ping-pong forever)
                self.metrics.inc("tftp_dropped_total", reason="error_on_server_port")
                return None
            message = ("only read requests are served here"
                       if exc.reason == "not_a_request" else f"malformed request: {exc.reason}")
            self._refuse(addr, ErrorCode.ILLEGAL_OPERATION, message, exc.reason)
            return None
        if request.opcode == Opcode.WRQ:
            self._refuse(addr, ErrorCode.ILLEGAL_OPERATION,
                         "write requests are refused (read-only server)", "wrq")
            return None
        return request

    def _answered_by(self, existing: Session, datagram: bytes) -> bool:
        """Whether a request from the address of session ``existing`` is
        dealt with by that session (a repeat of its request); otherwise the
        old session is closed and the request starts a new one."""
        # a pending ERROR on the old session (a tsize probe being aborted,
        # or a transfer the client gives up and asks for again) must be
        # seen before deciding the new request is a duplicate
        self._on_readable(existing)
        if existing.closed:
            return False
        repeat = decide_repeat(existing.request == datagram,
                               oack_pending=existing.state == STATE_OACK, base=existing.base)
        if repeat is Repeat.SUPERSEDE:
            self._close(existing, "superseded")
            return False
        self.metrics.inc("tftp_dropped_total", reason="duplicate_request")
        if repeat is Repeat.RESEND:
            existing.retransmits += 1
            self._send_current(existing)
        return True

    def _make_room(self, addr: tuple[str, int]) -> bool:
        """Apply the session bounds; evict stalled sessions rather than refuse.

        False means the request was refused with ERROR 0 and counted."""
        assert self._loop is not None
        now = self._loop.time()
        ip = addr[0]
        if self._per_client.get(ip, 0) >= self.max_sessions_per_client:
            victim = stalest(self._sessions.values(), now, ip)
            if victim is None:
                self._refuse(addr, ErrorCode.NOT_DEFINED,
                             "too many transfers from your address", "per_client_limit")
                return False
            self._close(victim, "evicted")
        if len(self._sessions) >= self.max_sessions:
            victim = stalest(self._sessions.values(), now, None)
            if victim is None:
                self._refuse(addr, ErrorCode.NOT_DEFINED, "server busy", "session_limit")
                return False
            self._close(victim, "evicted")
        return True

    def _open_session(self, sock: socket.socket, addr: tuple[str, int], datagram: bytes,
                      content: FileContent, negotiated: tftp.Negotiated) -> None:
        assert self._loop is not None
        s = new_session(sock, addr, datagram, content.name, content.data, content.virtual,
                        negotiated,
                        now=self._loop.time(), retries=self.retries,
                        default_timeout=self.limits.default_timeout,
                        gso=self._tx.wants_gso(negotiated.blksize, negotiated.windowsize))
        self._sessions[addr] = s
        self._per_client[addr[0]] = self._per_client.get(addr[0], 0) + 1
        assert self._epoll is not None
        self._by_fd[s.fd] = s
        self._epoll.register(s.fd, select.EPOLLIN)
        self._send_current(s)

    # --- transfers -----------------------------------------------------------

    def _send_current(self, s: Session) -> None:
        """(Re)send what the session is waiting an ACK for: OACK or the window."""
        if s.state == STATE_OACK:
            self._send(s, s.oack)
        else:
            self._send_window(s)
        self._arm(s)

    def _send(self, s: Session, packet: bytes | memoryview) -> bool:
        """Send one datagram; False when that closed the session."""
        status = send_packet(s, packet)
        if status is not None:
            self._close(s, status)
            return False
        return True

    def _send_window(self, s: Session) -> None:
        status = self._tx.send_window(s)
        if status is not None:
            self._close(s, status)

    def _arm(self, s: Session) -> None:
        if s.closed:
            return
        assert self._loop is not None
        s.deadline = self._loop.time() + s.timeout
        if s.timer is None:
            s.timer = self._loop.call_at(s.deadline, self._on_timer, s)

    def _on_timer(self, s: Session) -> None:
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
        if s.state == STATE_OACK:
            s.retransmits += 1
        s.acked_dup = False
        self._send_current(s)
        s.deadline = now + backoff_delay(s.timeout, self.retries - s.retries_left)

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

    def _on_readable(self, s: Session) -> None:
        if s.closed:
            return
        try:
            datagram = s.sock.recv(2048)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._close(s, error_status(exc, "recv_error"))
            return
        if len(datagram) == 4 and datagram[1] == 4 and datagram[0] == 0:
            ack = (datagram[2] << 8) | datagram[3]
        else:
            self._on_other_packet(s, datagram)
            return
        if s.windowsize == 1 and s.state == STATE_DATA:
            # lock-step fast path, the hot loop of most firmware's transfers:
            # decide_ack's answer for one block in flight, written out inline
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
                s.sock.send(HEADERS[block & 0xFFFF] + s.mv[off:off + s.blksize])
            except (BlockingIOError, InterruptedError):
                pass
            except OSError as exc:
                self._close(s, error_status(exc, "send_error"))
                return
            if s.timer is None:
                s.timer = self._loop.call_at(s.deadline, self._on_timer, s)  # type: ignore[union-attr]
            return
        self._on_ack(s, ack)

    def _on_ack(self, s: Session, ack: int) -> None:
        """An ACK outside the lock-step fast path: of the OACK, or in a window."""
        action, block = decide_ack(ack, oack_pending=s.state == STATE_OACK, base=s.base,
                                   sent_upto=s.sent_upto, nblocks=s.nblocks,
                                   windowsize=s.windowsize, gap_answered=s.acked_dup)
        if action is AckAction.IGNORE:
            return
        if action is AckAction.DONE:
            s.base = s.nblocks + 1
            self._close(s, "ok")
            return
        if action is AckAction.START:
            s.state = STATE_DATA
            self._progress(s)
        elif action is AckAction.ADVANCE:
            s.base = block + 1
            s.acked_dup = False
            self._progress(s)
        else:               # AckAction.GAP
            s.acked_dup = True
        self._send_window(s)
        self._arm(s)

    def _progress(self, s: Session) -> None:
        assert self._loop is not None
        s.last_progress = self._loop.time()
        s.retries_left = self.retries

    def _on_other_packet(self, s: Session, datagram: bytes) -> None:
        """Anything but an ACK on a session's port: dropped (malformed), or
        the end of the session (the client's ERROR, an illegal packet)."""
        try:
            packet = tftp.parse_packet(datagram)
        except MalformedPacket as exc:
            self.metrics.inc("tftp_dropped_total", reason=f"session_{exc.reason}")
            return
        if isinstance(packet, tftp.Error):
            self.metrics.inc("tftp_client_errors_total", code=packet.code)
            self._close(s, "aborted" if s.state == STATE_OACK else "client_error")
            return
        # DATA, RRQ, OACK on a read transfer's port: illegal (RFC 1350)
        self.metrics.inc("tftp_errors_sent_total", code=ErrorCode.ILLEGAL_OPERATION)
        if self._send(s, tftp.build_error(ErrorCode.ILLEGAL_OPERATION, "unexpected packet")):
            self._close(s, "illegal_packet")

    def _close(self, s: Session, status: str) -> None:
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
        count_transfer(self.metrics, s, status, now - s.started, self.on_transfer)
        release(s)


__all__ = ["REQUEST_BATCH", "SESSION_BATCH", "TftpServer"]
