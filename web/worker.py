"""A gunicorn ``gthread`` worker that reads request headers in its event loop.

Why: gunicorn's :class:`~gunicorn.workers.gthread.ThreadWorker` hands every
accepted (or kept-alive, readable) connection to a pool thread, which parses
the request with *blocking* reads.  A client that sends its headers one byte
at a time ("slowloris") therefore holds a thread for as long as it likes;
a few dozen of them hold the whole pool and every normal request waits.

:class:`BufferedThreadWorker` keeps the pool for what needs a thread
(running the app, reading bodies, WebSockets) and moves the header phase
into the worker's poller:

* accepted sockets stay non-blocking in the poller; each readable event
  appends at most :data:`RECV_CHUNK` bytes to the connection's own buffer;
* the connection goes to a pool thread only once its complete header block
  (``b"\\r\\n\\r\\n"``) is buffered; the buffer is then replayed to gunicorn's
  request parser (pushed back into its unreader) so parsing, limits and
  errors are gunicorn's own, and ``environ["gunicorn.socket"]`` stays the real
  socket (flask-sock's WebSocket upgrade reads and writes it directly);
* a header block larger than ``max_head`` bytes is answered ``431`` and the
  connection closed; one not complete ``header_timeout`` seconds after
  ``accept`` (or after the first byte of a kept-alive connection's next
  request) is answered ``408`` and closed;
* at most ``max_waiting`` connections wait for their headers; a new one
  beyond that evicts the oldest waiting one (a real client sends its headers
  in one segment, so the oldest is almost always a slow one);
* kept-alive connections come back through the same buffering for their
  next request, including bytes the parser had already read ahead.

Every refusal is counted as ``web_refused_total{reason=...}`` (reasons
``header_timeout``, ``header_too_large``, ``header_backlog``,
``accept_no_fds``) in the app's :class:`lpmos.metrics.Registry` when the
WSGI app is the LPMOS Flask app, and logged at debug level either way;
``web_header_waiting`` is the number of connections waiting for headers.

Not covered: request *bodies* are still read by the pool thread with
blocking reads (bounded by the app's 413 limit, not by a deadline).  TLS,
HTTP/2 and the uwsgi protocol are refused by :meth:`check_config`: the
control plane serves plain HTTP/1.1 (TLS terminates at the load balancer).

Configure with :func:`buffered_worker`, which returns a subclass carrying
the limits, as gunicorn's ``worker_class`` (a class is accepted there).
"""

from __future__ import annotations

import enum
import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable
from functools import partial
from typing import Any

from gunicorn.workers.gthread import TConn, ThreadWorker

from lpmos.httpwire import build_refusal

log = logging.getLogger("lpmos.web.worker")

#: default seconds from accept to a complete header block
HEADER_TIMEOUT = 5.0
#: default largest header block (request line + fields + the blank line)
MAX_HEAD = 64 * 1024
#: default most connections waiting for their headers at once
MAX_WAITING = 1024
#: bytes read per readable event (fairness between waiting connections)
RECV_CHUNK = 16 * 1024
#: seconds a refused connection is drained after its answer, so that closing
#: with unread bytes does not reset the connection before the client read it
LINGER = 2.0
#: most bytes drained from a refused connection
LINGER_MAX_BYTES = 256 * 1024
#: most refused connections lingering at once; more are closed at once
MAX_LINGERING = 256

_END = b"\r\n\r\n"


class Head(enum.Enum):
    """Where a buffered header block stands."""

    PARTIAL = "partial"
    COMPLETE = "complete"
    TOO_LARGE = "too_large"


def scan_head(buf: bytes | bytearray, limit: int, resume: int = 0) -> tuple[Head, int]:
    """Decide whether ``buf`` holds a complete header block of at most ``limit`` bytes.

    Pure.  Returns ``(state, resume)``: pass ``resume`` back with the grown
    buffer to avoid rescanning what was already searched.  Empty lines before
    the request line (RFC 9112 section 2.2) do not end the block.  The block
    counts from the first byte of ``buf`` to the end of its blank line;
    ``TOO_LARGE`` when that exceeds ``limit`` or when more than ``limit``
    bytes are buffered without one.  Bytes after the block (a body, a
    pipelined request) are not looked at.
    """
    lead = 0
    while buf.startswith(b"\r\n", lead):
        lead += 2
    start = max(lead, resume - 3)
    end = buf.find(_END, start, limit)
    if end >= 0:
        return Head.COMPLETE, end + len(_END)
    if len(buf) > limit:
        return Head.TOO_LARGE, len(buf)
    return Head.PARTIAL, len(buf)


class BufferedConn(TConn):  # type: ignore[misc]
    """A gthread connection that carries its buffered header bytes.

    ``head`` is the buffer while the connection waits in the poller;
    ``replay`` holds it from hand-off until :meth:`init` (on the pool thread)
    pushes it into the parser's unreader, ahead of anything still on the
    socket.
    """

    def __init__(self, cfg: Any, sock: socket.socket, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.head = bytearray()
        self.scanned = 0
        self.deadline = 0.0
        self.replay = b""
        self.drained = 0

    def init(self) -> None:
        super().init()
        if self.replay:
            self.parser.unreader.unread(self.replay)
            self.replay = b""


class BufferedThreadWorker(ThreadWorker):  # type: ignore[misc]
    """gthread with the header phase in the event loop (see the module doc).

    All the state below is touched only on the worker's main thread (poller
    callbacks, ``finish_request`` via the method queue, the timers), so it
    needs no lock.  ``nr_conns`` keeps gunicorn's meaning for connections on
    a thread or idle in keep-alive; connections waiting for headers are
    counted apart (``_heads``, bounded by ``max_waiting``) so that a flood of
    slow clients never stops the worker from accepting.
    """

    header_timeout: float = HEADER_TIMEOUT
    max_head: int = MAX_HEAD
    max_waiting: int = MAX_WAITING

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # insertion order == deadline order (every deadline is now + header_timeout)
        self._heads: dict[BufferedConn, float] = {}
        self._lingering: dict[BufferedConn, float] = {}
        self._count: Callable[[str], None] | None = None

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        if cfg.is_ssl or "h2" in cfg.http_protocols or getattr(cfg, "protocol", "http") != "http":
            raise RuntimeError("BufferedThreadWorker serves plain HTTP/1.x only "
                               "(no TLS, no HTTP/2, no uwsgi)")
        super().check_config(cfg, log)

    # -- metrics ------------------------------------------------------------------------

    def _refused(self, reason: str, conn: BufferedConn) -> None:
        log.debug("closing %s before its request: %s", conn.client, reason)
        if self._count is None:
            self._count = self._find_counter()
        self._count(reason)

    def _find_counter(self) -> Callable[[str], None]:
        """``web_refused_total`` of the app's registry, or a no-op when the
        WSGI app is not the LPMOS app (the debug log line still says it)."""
        context = getattr(self.wsgi, "extensions", {}).get("lpmos")
        metrics = getattr(context, "metrics", None)
        if metrics is None:
            return lambda _reason: None
        metrics.gauge("web_header_waiting", lambda: float(len(self._heads)),
                      "connections waiting for their request headers")
        return lambda reason: metrics.inc("web_refused_total", reason=reason)

    def run(self) -> None:
        self._count = self._find_counter()
        super().run()

    # -- the header phase ---------------------------------------------------------------

    def accept(self, listener: socket.socket) -> None:
        """Accept one connection and start waiting for its headers."""
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                return
            if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                # out of descriptors: free the oldest waiting one rather than
                # crash the worker (gthread re-raises); the backlog holds the rest
                log.warning("accept failed (%s); %d connections waiting for headers",
                            e, len(self._heads))
                if self._heads:
                    oldest = next(iter(self._heads))
                    self._drop_head(oldest)
                    self._refused("accept_no_fds", oldest)
                    oldest.close()
                else:
                    time.sleep(0.01)   # do not spin on a readable listener
                return
            raise
        conn = BufferedConn(self.cfg, client_sock, client_addr, listener.getsockname())
        self._wait_head(conn, b"")

    def on_client_socket_readable(self, conn: BufferedConn, client: socket.socket) -> None:
        """A kept-alive connection starts its next request: buffer its headers too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self.nr_conns -= 1
        self._wait_head(conn, b"", read_now=True)

    def _wait_head(self, conn: BufferedConn, data: bytes, read_now: bool = False) -> None:
        conn.sock.setblocking(False)
        conn.head = bytearray(data)
        conn.scanned = 0
        conn.deadline = time.monotonic() + self.header_timeout
        if data and self._scan(conn):
            return
        while len(self._heads) >= self.max_waiting:
            oldest = next(iter(self._heads))
            self._drop_head(oldest)
            self._refused("header_backlog", oldest)
            self._refuse(oldest, 503, "busy", "too many connections waiting for headers")
        self._heads[conn] = conn.deadline
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self._on_head_readable, conn))
        if read_now:
            self._on_head_readable(conn, conn.sock)

    def _drop_head(self, conn: BufferedConn) -> None:
        self._heads.pop(conn, None)
        self._unwatch(conn)

    def _unwatch(self, conn: BufferedConn) -> None:
        """Take ``conn`` out of the poller, whether or not it is still in it."""
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _on_head_readable(self, conn: BufferedConn, _sock: socket.socket) -> None:
        try:
            data = conn.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            log.debug("connection %s failed before its request: %s", conn.client, e)
            data = b""
        if not data:           # the client went away (or a kept-alive one closed)
            self._drop_head(conn)
            conn.close()
            return
        conn.head += data
        self._scan(conn)

    def _scan(self, conn: BufferedConn) -> bool:
        """Hand off or refuse when the buffer decides it; True when it did."""
        state, conn.scanned = scan_head(conn.head, self.max_head, conn.scanned)
        if state is Head.PARTIAL:
            return False
        if state is Head.TOO_LARGE:
            self._drop_head(conn)
            self._refused("header_too_large", conn)
            self._refuse(conn, 431, "header_too_large",
                         f"the request headers exceed {self.max_head} bytes")
            return True
        conn.replay = bytes(conn.head)
        conn.head = bytearray()
        conn.data_ready = True            # gthread must not wait for data again
        self._drop_head(conn)
        self.nr_conns += 1
        self.enqueue_req(conn)
        return True

    def _refuse(self, conn: BufferedConn, status: int, reason: str, detail: str) -> None:
        """Answer ``status`` (best effort, never blocking), half-close, and
        drain for at most :data:`LINGER` seconds before closing."""
        try:
            conn.sock.send(build_refusal(status, reason, detail))
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            conn.close()
            return
        if len(self._lingering) >= MAX_LINGERING:
            conn.close()
            return
        conn.drained = 0
        self._lingering[conn] = time.monotonic() + LINGER
        self.poller.register(conn.sock, selectors.EVENT_READ,
                             partial(self._on_linger_readable, conn))

    def _on_linger_readable(self, conn: BufferedConn, _sock: socket.socket) -> None:
        try:
            data = conn.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.drained += len(data)
        if not data or conn.drained > LINGER_MAX_BYTES:
            self._end_linger(conn)

    def _end_linger(self, conn: BufferedConn) -> None:
        self._lingering.pop(conn, None)
        self._unwatch(conn)
        conn.close()

    # -- timers -------------------------------------------------------------------------

    def _expire(self, force: bool = False) -> None:
        now = time.monotonic()
        for conn, deadline in list(self._heads.items()):
            if deadline > now and not force:
                break                                   # deadline order
            self._drop_head(conn)
            if force:
                conn.close()
                continue
            self._refused("header_timeout", conn)
            self._refuse(conn, 408, "header_timeout",
                         f"the request headers did not arrive within {self.header_timeout:g} s")
        for conn, deadline in list(self._lingering.items()):
            if deadline <= now or force:
                self._end_linger(conn)

    def murder_pending(self) -> None:
        super().murder_pending()
        self._expire()

    def murder_keepalived(self, force: bool = False) -> None:
        super().murder_keepalived(force)
        if force:                     # the worker is stopping: nothing is served after this
            self._expire(force=True)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """Wake up for the next header deadline, not only once a second."""
        if self._heads:
            first = next(iter(self._heads.values()))
            timeout = min(timeout, max(0.0, first - time.monotonic()) + 0.01)
        super().wait_for_and_dispatch_events(timeout)

    # -- back from the pool -------------------------------------------------------------

    def finish_request(self, conn: BufferedConn, fs: Any) -> None:
        """Like gthread's, except that bytes the parser read ahead (the start
        of a pipelined next request) go back through the header buffering
        instead of straight to a thread that would block on the rest."""
        try:
            keepalive = not fs.cancelled() and fs.result() is True
        except Exception:
            keepalive = False
        if keepalive and hasattr(getattr(conn, "parser", None), "unreader"):
            ahead = conn.parser.unreader.take_buffered()
            if ahead:
                self.nr_conns -= 1
                self._wait_head(conn, ahead)
                return
        super().finish_request(conn, fs)


def buffered_worker(*, header_timeout: float = HEADER_TIMEOUT, max_head: int = MAX_HEAD,
                    max_waiting: int = MAX_WAITING) -> type[BufferedThreadWorker]:
    """A :class:`BufferedThreadWorker` subclass with these limits, for
    gunicorn's ``worker_class`` setting.  Raises ``ValueError`` on limits
    that are not positive."""
    if header_timeout <= 0 or max_head < 1024 or max_waiting < 1:
        raise ValueError("header_timeout > 0, max_head >= 1024 and max_waiting >= 1 required")
    return type("BufferedThreadWorker", (BufferedThreadWorker,),
                {"header_timeout": float(header_timeout), "max_head": int(max_head),
                 "max_waiting": int(max_waiting), "__module__": __name__})
