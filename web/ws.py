"""``/ws``: live updates for every open console, from ONE watch per process.

The process's :class:`web.index.ConsoleIndex` (fed by its single
:class:`lpmos.store.cache.WatchCache`) calls :meth:`Hub.publish` once per
change; the hub encodes the delta once and offers it to every client's
bounded queue.  A client whose queue is full is dropped at once (its socket
is shut down); it reconnects and resyncs, and memory never grows with a slow
browser.

Messages (JSON text frames, server → client):

* ``{"t": "hello", "rev": R, "replayed": n}`` — first; ``R`` is the revision
  the client is current to once the replayed deltas (if any) follow;
* ``{"t": "task", "op": "put"|"del", "idc", "sn", "task": {...}, "rev"}`` —
  ``task`` holds only the summary fields that changed (all of them for a new
  task), always with ``idc``, ``sn`` and ``revision``;
* ``{"t": "server"|"online"|"node"|"template"|"timeline", ..., "rev"}``;
* ``{"t": "resync", "rev": R}`` — the client must reload its lists over REST
  (first connection without ``since``, a ``since`` older than the hub's
  memory, or a cache reload after etcd compaction);
* ``{"t": "hb", "rev": R}`` — every 15 s when idle: current up to ``R``.

A client reconnects with ``/ws?since=R`` (the last ``rev`` it saw) and gets
every delta after ``R`` from the hub's bounded history, or ``resync``.

Client → server: ``{"t": "ping"}`` is answered with ``{"t": "pong"}``;
anything else is ignored.  Frames over 4 KiB close the socket (1009);
more than 20 messages per second close it (1008).

Before the handshake is accepted the request must be authenticated (session
cookie or Bearer token), come from an allowed Origin (browsers always send
one; a cross-site page cannot ride the session cookie) and find room under
``web.ws_max_clients``; otherwise it gets a plain 401/403/503.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from flask import Blueprint, g, request
from flask_sock import Sock

from lpmos.metrics import Registry
from lpmos.store.cache import WatchCache
from web.auth import current_principal, origin_allowed
from web.context import ctx
from web.http import ApiError
from web.index import ConsoleIndex

log = logging.getLogger(__name__)

HEARTBEAT = 15.0
CLIENT_MAX_MESSAGE = 4096
CLIENT_MAX_RATE = 20          # messages per second from a client
HISTORY = 8192                # deltas kept for reconnecting clients


class Client:
    """One connected browser: a bounded queue and a way to cut it off."""

    def __init__(self, maxsize: int) -> None:
        self.queue: queue.Queue[str] = queue.Queue(maxsize)
        self.dropped = threading.Event()
        self.last_rev = 0              # rev of the newest message queued
        self.kill: Callable[[], None] = lambda: None


class Hub:
    """Fan-out of index changes to WebSocket clients."""

    def __init__(self, index: ConsoleIndex, cache: WatchCache, metrics: Registry, *,
                 max_clients: int = 100, queue_size: int = 512,
                 history: int = HISTORY) -> None:
        self.cache = cache
        self.metrics = metrics
        self.max_clients = max_clients
        self.queue_size = queue_size
        self._lock = threading.Lock()
        self._clients: set[Client] = set()
        self._reserved = 0          # places held for handshakes in progress
        self._history: deque[tuple[int, str]] = deque(maxlen=history)
        self._floor = cache.revision   # deltas after this revision are all in history
        self._rev = cache.revision
        self._closed = False
        metrics.gauge("web_ws_clients", lambda: float(len(self._clients)),
                      "open WebSocket clients")
        metrics.describe("web_ws_connections_total", "WebSocket connections accepted")
        metrics.describe("web_ws_messages_total",
                         "WebSocket messages published to clients, by kind")
        metrics.describe("web_ws_dropped_total", "WebSocket clients dropped, by reason")
        index.subscribe(self.publish)

    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def reserve(self) -> bool:
        """Hold a place for a client whose handshake is about to run, so
        that capacity is decided before the handshake (a clean 503) even when
        many arrive at once; :meth:`register` consumes the place and
        :meth:`release` gives back one that was not used."""
        with self._lock:
            if self._closed or len(self._clients) + self._reserved >= self.max_clients:
                return False
            self._reserved += 1
            return True

    def release(self) -> None:
        with self._lock:
            self._reserved = max(0, self._reserved - 1)

    def publish(self, kind: str, message: dict[str, Any]) -> None:
        """Called by the index on the cache thread; never blocks."""
        if kind == "reset":
            rev = int(message.get("revision", self.cache.revision))
            text = json.dumps({"t": "resync", "rev": rev})
            with self._lock:
                self._history.clear()
                self._floor = self._rev = rev
                doomed = self._offer(text, rev)
        else:
            rev = int(message.get("rev", 0))
            text = json.dumps({"t": kind, **message}, separators=(",", ":"), default=str)
            with self._lock:
                if len(self._history) == self._history.maxlen:
                    self._floor = self._history[0][0]
                self._history.append((rev, text))
                self._rev = max(self._rev, rev)
                doomed = self._offer(text, rev)
        self.metrics.inc("web_ws_messages_total", kind=kind)
        for client in doomed:
            self._drop(client, "slow")

    def _offer(self, text: str, rev: int) -> list[Client]:
        doomed = []
        for client in self._clients:
            try:
                client.queue.put_nowait(text)
                client.last_rev = max(client.last_rev, rev)
            except queue.Full:
                doomed.append(client)
        for client in doomed:
            self._clients.discard(client)
        return doomed

    def _drop(self, client: Client, reason: str) -> None:
        self.metrics.inc("web_ws_dropped_total", reason=reason)
        client.dropped.set()
        with contextlib.suppress(Exception):
            client.kill()

    def register(self, since: int | None, *, reserved: bool = False
                 ) -> tuple[Client, dict[str, Any], list[str]] | None:
        """A new client, its hello message and the deltas to replay, or
        ``None`` when full.  Atomic with respect to :meth:`publish`: nothing
        is lost or repeated between the replay and the live queue.
        ``reserved``: the client holds a place from :meth:`reserve`."""
        with self._lock:
            if reserved:
                self._reserved = max(0, self._reserved - 1)
            if self._closed or len(self._clients) + self._reserved >= self.max_clients:
                return None
            client = Client(self.queue_size)
            replay: list[str] = []
            resync = True
            if since is not None and self._floor <= since <= self._rev:
                replay = [text for rev, text in self._history if rev > since]
                resync = False
            client.last_rev = self._rev
            self._clients.add(client)
            hello = {"t": "hello", "rev": self._rev, "replayed": len(replay), "resync": resync}
            return client, hello, replay

    def unregister(self, client: Client) -> None:
        with self._lock:
            self._clients.discard(client)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            clients = list(self._clients)
            self._clients.clear()
        for client in clients:
            self._drop(client, "shutdown")


bp = Blueprint("ws", __name__)
sock = Sock()


@bp.before_request
def _gate() -> None:
    """Authentication, Origin and room are checked before the handshake."""
    if not origin_allowed(request.headers.get("Origin")):
        raise ApiError(403, "forbidden", "WebSocket from a foreign Origin refused",
                       reason="ws_origin")
    if current_principal() is None:
        raise ApiError(401, "unauthorized", "log in (session) or send a Bearer token",
                       reason="ws_unauthenticated")
    if request.headers.get("Upgrade", "").lower() != "websocket":
        raise ApiError(400, "bad_request", "this URL speaks WebSocket only")
    if not _hub().reserve():
        raise ApiError(503, "unavailable", "too many live consoles; retry later", reason="ws_full")
    g.ws_reserved = True


@bp.teardown_request
def _release(_exc: BaseException | None) -> None:
    """Give back a place reserved for a handshake that never registered."""
    if g.pop("ws_reserved", False):
        _hub().release()


def _hub() -> Hub:
    hub = ctx().hub
    assert isinstance(hub, Hub), "the app's hub is a web.ws.Hub"
    return hub


def _since() -> int | None:
    raw = request.args.get("since")
    if raw is None or raw == "":
        return None
    try:
        value = int(raw)
    except ValueError:
        return None
    return value if value >= 0 else None


def _socket_of(ws: Any) -> socket.socket | None:
    return getattr(ws, "sock", None)


@sock.route("/ws", bp=bp)  # type: ignore[untyped-decorator]
def live(ws: Any) -> None:
    c = ctx()
    hub = _hub()
    got = hub.register(_since(), reserved=bool(g.pop("ws_reserved", False)))
    if got is None:
        ws.close(1013, "too many clients")
        return
    client, hello, replay = got
    raw_sock = _socket_of(ws)

    def kill() -> None:
        if raw_sock is not None:
            with contextlib.suppress(OSError):
                raw_sock.shutdown(socket.SHUT_RDWR)

    client.kill = kill
    c.metrics.inc("web_ws_connections_total")
    last_beat = time.monotonic()
    window_start, window_count = time.monotonic(), 0
    try:
        ws.send(json.dumps(hello))
        for text in replay:
            ws.send(text)
        while ws.connected and not client.dropped.is_set():
            # drain what the client sent (bounded by max_message_size and rate)
            while True:
                incoming = ws.receive(timeout=0)
                if incoming is None:
                    break
                now = time.monotonic()
                if now - window_start >= 1.0:
                    window_start, window_count = now, 0
                window_count += 1
                if window_count > CLIENT_MAX_RATE:
                    c.metrics.inc("web_ws_dropped_total", reason="flood")
                    ws.close(1008, "too many messages")
                    return
                if _is_ping(incoming):
                    ws.send(json.dumps({"t": "pong", "rev": client.last_rev}))
            rev_before = client.last_rev
            try:
                text = client.queue.get(timeout=1.0)
            except queue.Empty:
                if time.monotonic() - last_beat >= HEARTBEAT:
                    ws.send(json.dumps({"t": "hb", "rev": rev_before}))
                    last_beat = time.monotonic()
                continue
            batch = [text]
            while len(batch) < 256:
                try:
                    batch.append(client.queue.get_nowait())
                except queue.Empty:
                    break
            for item in batch:
                ws.send(item)
            last_beat = time.monotonic()
    except (OSError, ConnectionError) as exc:
        log.debug("websocket ended: %s", exc)
    except Exception as exc:   # simple_websocket.ConnectionClosed and friends
        if type(exc).__name__ != "ConnectionClosed":
            log.exception("websocket handler failed")
    finally:
        hub.unregister(client)


def _is_ping(incoming: Any) -> bool:
    if not isinstance(incoming, str) or len(incoming) > CLIENT_MAX_MESSAGE:
        return False
    try:
        data = json.loads(incoming)
    except ValueError:
        return False
    return isinstance(data, dict) and data.get("t") == "ping"


def configure(app_config: dict[str, Any], ping_interval: float) -> None:
    """flask-sock options: server pings, and the incoming message size cap."""
    app_config["SOCK_SERVER_OPTIONS"] = {"ping_interval": ping_interval,
                                         "max_message_size": CLIENT_MAX_MESSAGE}

