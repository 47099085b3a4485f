"""Boot HTTP's server: HTTP/1.1 on an asyncio loop, WSGI for the app.

Why not a stock WSGI server: in a boot storm the node serves a thousand
machines' boot scripts, agents and installers at once *in the process that
also answers ProxyDHCP and TFTP*.  A server with its own poll loop over
every open connection competes for the GIL that the DHCP/TFTP loop needs
(``bench/README.md`` has the numbers).  This server runs on the node's own
event loop instead:

* the request is parsed by ``httptools`` (llhttp, the parser of Node.js and
  uvicorn) in the loop, with our limits: header block size (431), body size
  (413 as soon as ``Content-Length`` says so, before any body is read),
  a deadline for the whole request from its first byte (408: slowloris),
  an idle keep-alive timeout, and a connection limit (503);
* the boot scripts that need no etcd request (everything but an install
  claim) are answered *inline* by a ``fast`` handler, without a thread hop
  or WSGI, in one ``write``; so are the install configs the app holds
  rendered (its ``answer_inline``: token checked, from the render cache);
* the catalog's files (kernel, initrd, disk images) are answered inline by
  a ``files`` handler whose body is sent with ``sendfile(2)`` calls on a
  few threads, one per core (:mod:`bootsvc.http.sendfile`): no byte read
  into memory, the loop only dispatches; a client that stops reading for the timeout is
  dropped, one that goes away frees its file at once;
* everything else runs the WSGI app on a bounded thread pool; small answers
  go back to the loop in one piece, large ones (images) are streamed with
  flow control (the app's thread waits while the socket's buffer is full);
* requests pipelined on one connection are answered in order.

Refusals are counted as ``http_requests_refused_total{reason=...}`` with
reasons ``bad_request``, ``header_too_large``, ``too_large``,
``request_timeout``, ``connection_limit``, ``upgrade`` and ``send_timeout`` (a
client that stopped reading a file body).
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

from bootsvc.http.sendfile import FileAnswer, send_span
from bootsvc.http.wsgi import ParsedRequest, build_environ, build_head
from bootsvc.netif import plain_address
from lpmos.httpwire import build_refusal, phrase

log = logging.getLogger(__name__)

#: an inline answer: status, content type, body
FastAnswer = tuple[int, str, bytes]
#: ``fast(path, query, remote_addr)`` for a GET: an answer, or ``None`` to run the app
FastHandler = Callable[[str, str, str], FastAnswer | None]
#: ``app.answer_inline(request, remote_addr)`` for a GET that ``fast`` did not
#: answer (it sees the headers: the cached install configs check a token)
InlineHandler = Callable[[ParsedRequest, str], FastAnswer | None]
#: ``files(method, path, query, headers, remote_addr)`` for a GET or HEAD, raw
#: bytes as sent: a file answer, or ``None`` to go on (fast handler, then the app)
FileHandler = Callable[[bytes, bytes, bytes, list[tuple[bytes, bytes]], str],
                       FileAnswer | None]

STREAM_BUFFER = 256 * 1024      # a WSGI body up to this size goes out in one write
MAX_PIPELINED = 8               # reading pauses while this many requests wait
SWEEP_INTERVAL = 0.5            # how often deadlines are checked
WRITE_HIGH_WATER = 512 * 1024   # the app's thread waits while more is buffered
LINGER = 2.0                    # seconds a refused connection is drained before closing

_monotonic = time.monotonic
_NO_BODY = (b"HEAD",)
_FILE_METHODS = (b"GET", b"HEAD")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Refuse(Exception):
    def __init__(self, status: int, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail = status, reason, detail


class _Conn(asyncio.Protocol):
    """One client connection: parses in the loop, answers in order."""

    def __init__(self, server: AsyncHttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.peer = ("", 0)
        self.req: ParsedRequest | None = None
        self.head_bytes = 0         # bytes of the current request's head so far
        self.body_bytes = 0
        self.in_head = False
        self.started = 0.0          # first byte of the request being received (0: none)
        self.last_active = _monotonic()
        self.queue: collections.deque[ParsedRequest] = collections.deque()
        self.busy = False           # the app is answering one of our requests
        self.closed = False
        self.read_paused = False
        self.write_paused = False
        self.lingering = False      # refused: reading and dropping until closed
        self.deferred: tuple[int, str, str] | None = None   # a refusal due after earlier answers
        self._drained: asyncio.Future[None] | None = None
        self.sending: asyncio.Task[None] | None = None     # a file body going out

    # -- asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer = (plain_address(str(peer[0])), int(peer[1]))
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER)
        server = self.server
        if len(server.conns) >= server.connection_limit:
            self.refuse(503, "connection_limit",
                        f"the node serves at most {server.connection_limit} connections")
            return
        server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.conns.discard(self)
        self.queue.clear()
        if self._drained is not None and not self._drained.done():
            self._drained.set_exception(ConnectionError("client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def data_received(self, data: bytes) -> None:
        if self.closed or self.lingering:
            return
        now = _monotonic()
        self.last_active = now
        if not self.started:
            self.started = now
            self.in_head = True
            self.head_bytes = 0
        if self.in_head:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refuse):
                self.refuse(cause.status, cause.reason, cause.detail)
            else:
                log.error("boot HTTP: request parsing failed: %r", cause)
                self.refuse(400, "bad_request", "the request could not be parsed")
            return
        except httptools.HttpParserUpgrade:
            self.refuse(400, "upgrade", "protocol upgrades are not served here")
            return
        except httptools.HttpParserError as exc:
            self.refuse(400, "bad_request", str(exc) or "malformed request")
            return
        limit = self.server.max_header
        if self.in_head and not self.closed and self.head_bytes > limit + 1024:
            # still no end of the head (llhttp buffers a long line itself)
            self.refuse(431, "header_too_large", f"request head over {limit} bytes")

    # -- httptools callbacks
    def on_message_begin(self) -> None:
        self.req = ParsedRequest()
        self.in_head = True
        self.body_bytes = 0
        if not self.started:
            self.started = _monotonic()

    def on_url(self, url: bytes) -> None:
        req = self.req
        assert req is not None
        req.url += url
        if len(req.url) > self.server.max_header:
            raise _Refuse(431, "header_too_large", "request target too long")

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        req.headers.append((name, value))
        if len(req.headers) > 100:
            raise _Refuse(431, "header_too_large", "more than 100 header fields")

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        parser = self.parser
        req.method = parser.get_method()
        req.version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive()
        if parser.should_upgrade():     # WebSocket, h2c, CONNECT: never handed to the app
            raise _Refuse(400, "upgrade", "protocol upgrades are not served here")
        self.in_head = False
        size = sum(len(n) + len(v) + 4 for n, v in req.headers) + len(req.url)
        server = self.server
        if size > server.max_header:
            raise _Refuse(431, "header_too_large", f"request head over {server.max_header} bytes")
        expect = False
        for name, value in req.headers:
            lname = name.lower()
            if lname == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _Refuse(400, "bad_request", "bad Content-Length") from None
                if length > server.max_body:
                    raise _Refuse(413, "too_large",
                                  f"request body over {server.max_body} bytes")
            elif lname == b"expect" and value.lower() == b"100-continue":
                expect = True
        if expect and req.version == "1.1" and self.transport is not None:
            self.transport.write(_CONTINUE)

    def on_body(self, body: bytes) -> None:
        req = self.req
        assert req is not None
        self.body_bytes += len(body)
        if self.body_bytes > self.server.max_body:
            raise _Refuse(413, "too_large", f"request body over {self.server.max_body} bytes")
        req.body.append(body)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        try:
            url = httptools.parse_url(req.url)
        except httptools.HttpParserInvalidURLError:
            raise _Refuse(400, "bad_request", "malformed request target") from None
        req.path, req.query = url.path or b"", url.query or b""
        self.req = None
        self.started = 0.0
        self.head_bytes = 0
        self.in_head = False
        self.queue.append(req)
        if len(self.queue) >= MAX_PIPELINED and self.transport is not None:
            self.transport.pause_reading()
            self.read_paused = True
        if not self.busy:
            self.next()

    # -- answering
    def next(self) -> None:
        """Answer queued requests in order until one needs the app."""
        fast, files = self.server.fast, self.server.files
        while self.queue and not self.closed:
            req = self.queue.popleft()
            if files is not None and req.method in _FILE_METHODS:
                file_answer = files(req.method, req.path, req.query, req.headers, self.peer[0])
                if file_answer is not None:
                    if self.start_file(req, file_answer):
                        continue
                    return
            if fast is not None and req.method == b"GET":
                path = req.path
                if b"%" in path:        # iPXE sends ${net0/mac} as 52%3A54%3A...
                    path = unquote_to_bytes(path)
                answer = fast(path.decode("latin-1"), req.query.decode("latin-1"), self.peer[0])
                if answer is not None:
                    self.write_answer(req, *answer)
                    continue
            inline = self.server.inline
            if inline is not None and req.method == b"GET":
                answer = inline(req, self.peer[0])
                if answer is not None:
                    self.write_answer(req, *answer)
                    continue
            self.busy = True
            fut = self.server.run_app(self, req)
            fut.add_done_callback(functools.partial(self.app_done, req))
            return
        if self.deferred is not None and not self.closed:
            status, reason, detail = self.deferred
            self.deferred = None
            self.lingering = False
            self.refuse(status, reason, detail)
            return
        if self.read_paused and not self.closed and self.transport is not None:
            self.read_paused = False
            self.transport.resume_reading()

    def write_answer(self, req: ParsedRequest, status: int, ctype: str, body: bytes) -> None:
        keep = req.keep_alive and not self.server.stopping
        close = "" if keep else "Connection: close\r\n"
        head = (f"HTTP/1.1 {status} {phrase(status)}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nCache-Control: no-store\r\n"
                f"{close}\r\n").encode()
        transport = self.transport
        assert transport is not None
        transport.write(head + body if req.method not in _NO_BODY else head)
        if not keep:
            self.close()

    def start_file(self, req: ParsedRequest, answer: FileAnswer) -> bool:
        """Write the head of ``answer``; start sending its body (then
        ``False``: the next request waits for it) or finish (``True``)."""
        keep = req.keep_alive and not self.server.stopping
        lines = [f"HTTP/1.1 {answer.status} {phrase(answer.status)}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in answer.headers]
        if not keep:
            lines.append("Connection: close\r\n")
        lines.append("\r\n")
        transport = self.transport
        assert transport is not None
        transport.write("".join(lines).encode("latin-1"))
        if answer.file is None or req.method in _NO_BODY:
            answer.finish(0, "complete")
            if not keep:
                self.close()
            return True
        self.busy = True
        self.last_active = _monotonic()
        self.sending = asyncio.ensure_future(self._send_file(answer, keep))
        return False

    async def _send_file(self, answer: FileAnswer, keep: bool) -> None:
        assert self.transport is not None and answer.file is not None
        sent = 0

        def progress(done: int) -> None:
            nonlocal sent
            sent = done
            self.last_active = _monotonic()

        outcome = "complete"
        try:
            await send_span(asyncio.get_running_loop(), self.transport, answer.file,
                            answer.start, answer.length, progress, self.server.send_pool)
        except asyncio.CancelledError:      # timed out (the sweep) or closed (stop)
            outcome = "timeout" if not self.server.stopping else "shutdown"
        except (ConnectionError, OSError) as exc:
            log.debug("boot HTTP: file transfer to %s cut off: %r", self.peer[0], exc)
            outcome = "disconnect"
        finally:
            self.sending = None
            answer.finish(sent, outcome)
        self.busy = False
        if outcome != "complete":
            if self.transport is not None:
                self.transport.abort()      # what was promised can no longer be sent
            self.close()
            return
        if not keep or self.closed:
            self.close()
            return
        self.last_active = _monotonic()
        self.next()

    def app_done(self, req: ParsedRequest, fut: asyncio.Future[tuple[bytes, bool]]) -> None:
        self.busy = False
        if self.closed:
            return
        if fut.cancelled():
            self.close()
            return
        exc = fut.exception()
        if exc is not None:
            if not isinstance(exc, ConnectionError):
                log.error("boot HTTP: %s %r failed: %r", req.method.decode("latin-1"),
                          req.url[:200], exc)
            self.close()
            return
        data, keep = fut.result()
        if data and self.transport is not None:
            self.transport.write(data)
        if not keep or self.server.stopping:
            self.close()
            return
        self.last_active = _monotonic()
        self.next()

    async def write_drain(self, data: bytes) -> None:
        """From the app's thread (through the loop): write, then wait while
        the socket's buffer is over the high-water mark."""
        if self.closed or self.transport is None:
            raise ConnectionError("client went away")
        self.transport.write(data)
        if self.write_paused:
            if self._drained is None:
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def refuse(self, status: int, reason: str, detail: str) -> None:
        """Answer ``status`` and close.  The close lingers: our side is shut
        for writing, whatever the client still sends is read and dropped for
        up to :data:`LINGER` seconds, so the refusal is not lost to a reset
        (closing a socket with unread input sends RST).  With answers to
        earlier (pipelined) requests still due, it waits for them: answers
        go out in the order of the requests."""
        if (self.busy or self.queue) and not self.closed:
            self.deferred = (status, reason, detail)
            self.lingering = True   # nothing more is read from this client
            return
        self.server.count_refused(reason)
        transport = self.transport
        if transport is None or self.closed or transport.is_closing():
            self.close()
            return
        transport.write(build_refusal(status, reason, detail))
        self.lingering = True
        self.server.conns.discard(self)
        if transport.can_write_eof():
            transport.write_eof()
        asyncio.get_running_loop().call_later(LINGER, self.close)

    def close(self) -> None:
        if self.sending is not None:    # its end closes the transport
            self.sending.cancel()
            self.closed = True
            self.server.conns.discard(self)
            return
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()
        self.closed = True
        self.server.conns.discard(self)


def dual_stack_socket(port: int) -> socket.socket:
    """A listening TCP socket on ``[::]:port`` that takes IPv4 clients too
    (``--listen ::``: boot HTTP on both families, as TFTP is)."""
    sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", port))
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock


class AsyncHttpServer:
    """Serve ``app`` (WSGI) and an optional inline ``fast`` handler on the
    running event loop.  ``start``/``stop`` are coroutines of that loop.

    The transport only: HTTP/1.1 framing, limits and the thread pool, with
    no knowledge of boot scripts or of Flask.  The boot HTTP of a node is
    :class:`bootsvc.http.service.HttpService`, which builds the app and
    hands this server the backend's ``fast_answer``."""

    def __init__(self, app: Callable[..., Iterable[bytes]], *, host: str, port: int,
                 threads: int = 32, connection_limit: int = 2000, timeout: float = 30.0,
                 max_body: int = 1 << 20, max_header: int = 16384,
                 fast: FastHandler | None = None,
                 files: FileHandler | None = None,
                 on_refused: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.host, self.port = host, port
        self.threads = threads
        self.connection_limit = connection_limit
        self.timeout = timeout
        self.max_body = max_body
        self.max_header = max_header
        self.fast = fast
        self.files = files
        self.on_refused = on_refused
        # an app that answers some GETs on the loop itself offers answer_inline
        # (bootsvc.http.fastpath.BootFastPath: install configs from its render cache)
        self.inline: InlineHandler | None = getattr(app, "answer_inline", None)
        self.conns: set[_Conn] = set()
        self.in_app = 0             # requests queued for or running on the pool
        self.stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._pool: ThreadPoolExecutor | None = None
        #: threads for the sendfile calls of file bodies (they release the GIL)
        self.send_pool: ThreadPoolExecutor | None = None
        self._sweeper: asyncio.TimerHandle | None = None

    async def start(self) -> None:
        loop = self._loop = asyncio.get_running_loop()
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="http-worker")
        self.send_pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                            thread_name_prefix="http-sendfile")
        if self.host == "::":       # both families: one IPv6 socket with IPV6_V6ONLY off
            self._server = await loop.create_server(lambda: _Conn(self),
                                                    sock=dual_stack_socket(self.port),
                                                    backlog=1024)
        else:
            self._server = await loop.create_server(lambda: _Conn(self), self.host, self.port,
                                                    backlog=1024, reuse_address=True)
        self.port = int(self._server.sockets[0].getsockname()[1])
        self._sweeper = loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def stop(self) -> None:
        self.stopping = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if not conn.busy:
                conn.close()
        # answers in progress get a moment to finish, then their connections go too
        deadline = _monotonic() + 2.0
        while any(c.busy for c in self.conns) and _monotonic() < deadline:
            await asyncio.sleep(0.05)
        sending = [c.sending for c in self.conns if c.sending is not None]
        for conn in list(self.conns):
            conn.close()
        if sending:     # cancelled by close(): let them close their files
            await asyncio.wait(sending, timeout=2.0)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
        if self.send_pool is not None:
            self.send_pool.shutdown(wait=False)

    def count_refused(self, reason: str) -> None:
        if self.on_refused is not None:
            self.on_refused(reason)

    def _sweep(self) -> None:
        """Close connections whose request is overdue (408) or that sat idle
        past the timeout.  O(connections) twice a second."""
        assert self._loop is not None
        now = _monotonic()
        timeout = self.timeout
        for conn in list(self.conns):
            if conn.busy:
                if conn.sending is not None and now - conn.last_active > timeout:
                    self.count_refused("send_timeout")
                    conn.sending.cancel()   # the client stopped reading
                continue
            if conn.started and now - conn.started > timeout:
                conn.refuse(408, "request_timeout",
                            f"the request did not arrive within {timeout:g} s")
            elif not conn.started and not conn.queue and now - conn.last_active > timeout:
                conn.close()
        self._sweeper = self._loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- the WSGI side
    def run_app(self, conn: _Conn, req: ParsedRequest) -> asyncio.Future[tuple[bytes, bool]]:
        assert self._loop is not None and self._pool is not None
        self.in_app += 1
        fut = self._loop.run_in_executor(self._pool, self._call_app, conn, req)
        fut.add_done_callback(self._app_finished)
        return fut

    def _app_finished(self, _fut: asyncio.Future[tuple[bytes, bool]]) -> None:
        self.in_app -= 1

    def _call_app(self, conn: _Conn, req: ParsedRequest) -> tuple[bytes, bool]:
        """Run the app on a pool thread.  Returns what is left to write and
        whether the connection stays open; streams large bodies itself.  An
        app that raises before its answer started gets a 500."""
        state: dict[str, Any] = {"head_sent": False}
        chunks: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info and state["head_sent"]:
                raise exc_info[1].with_traceback(exc_info[2])
            state["status"], state["headers"] = status, headers
            return chunks.append

        try:
            environ = build_environ(req, peer=conn.peer, server_name=self.host,
                                    server_port=self.port)
            result = self.app(environ, start_response)
            try:
                return self._answer(conn, req, state, chunks, result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except Exception as exc:
            if state["head_sent"] or isinstance(exc, ConnectionError):
                raise               # mid-answer: all that is left is to close
            log.exception("boot HTTP: %s %r failed", req.method.decode("latin-1"),
                          req.url[:200])
            self.count_refused("internal")
            return build_refusal(500, "internal", type(exc).__name__), False

    def _answer(self, conn: _Conn, req: ParsedRequest, state: dict[str, Any],
                chunks: list[bytes], result: Iterable[bytes]) -> tuple[bytes, bool]:
        size = 0
        for chunk in result:
            if not chunk:
                continue
            chunks.append(chunk)
            size += len(chunk)
            if size >= STREAM_BUFFER:
                data = b"".join(chunks) if req.method not in _NO_BODY else b""
                chunks.clear()
                size = 0
                if not state["head_sent"]:
                    head, _ = self._head(req, state, None)
                    data = head + data
                    state["head_sent"] = True
                if data:
                    self._write_from_thread(conn, data)
        body = b"".join(chunks) if req.method not in _NO_BODY else b""
        if state["head_sent"]:
            return body, state["keep"]
        head, keep = self._head(req, state, len(body))
        return head + body, keep

    def _head(self, req: ParsedRequest, state: dict[str, Any],
              length: int | None) -> tuple[bytes, bool]:
        head, keep = build_head(state.get("status"), state.get("headers"), length=length,
                                keep_alive=req.keep_alive and not self.stopping)
        state["keep"] = keep
        return head, keep

    def _write_from_thread(self, conn: _Conn, data: bytes) -> None:
        assert self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(conn.write_drain(data), self._loop)
        fut.result(timeout=max(self.timeout, 5.0) * 2)


__all__ = ["AsyncHttpServer", "FastAnswer", "FastHandler"]
