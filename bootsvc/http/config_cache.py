"""Rendered install configs kept in memory, and the inline path that serves them.

An installer fetches its kickstart / autoinstall / preseed / cloud-init
seed from ``GET /config/<sn>/<name>`` (token in a header or ``?token=``) or
``GET /config/<sn>/t/<token>/<name>``.  The ``config`` blueprint
(:mod:`bootsvc.http.routes_config`) checks the token, decides whether the
machine may have it and renders it in the sandbox, on the app's thread
pool.  This module lets the node render each config once per state of
what it is rendered from and answer repeats from memory, on the event
loop, with the same token check:

* :class:`ConfigCache` holds one :class:`ConfigEntry` per ``(sn, name)``,
  bounded in count, in bytes and per entry, least recently used out first;
* an entry is valid only while it still *is* the current render: the
  task at the same mod revision and the very same task, server, image,
  live-image and renderer objects (the machine index makes new objects on
  every change of a record, a changed catalog makes new images), the same
  advertised node URL and the same machine token (compared by SHA-256, in
  constant time).  An edit, an approval, a redeploy (a new attempt is a new
  task revision), a new catalog or renderer, a new token: the next GET
  misses and renders again.  A stale entry is never served; it is replaced
  by the next render of its slot or falls out of the LRU;
* :class:`ConfigFastPath` answers a GET from an entry, or returns ``None``
  and the request goes to the Flask route as before.  The inline path only
  *accepts*: every refusal (no token, another machine's token, a revoked
  one, a bad SN or name, no install in progress, a render error) is the
  route's, so those answers, their metrics and their reasons are exactly
  what they were.  Only a successful render is remembered.

A hit records what the route records for a served config: the
``config fetched`` timeline stage, ``http_configs_total{config}`` and
``http_requests_total``; and ``http_config_cache_total{result="hit"}``
(the route counts ``result="miss"`` for every render).

The rendered body holds the machine's token in clear (the installer
needs it for its callbacks); the cache is memory only, like the token on
its way out in the answer; etcd keeps only hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bootsvc.http.backend import BootBackend

#: the WSGI environ key under which :class:`~bootsvc.http.fastpath.BootFastPath`
#: hands the Flask route the cache it fills
ENVIRON_KEY = "lpmos.config_cache"

MAX_ENTRIES = 10_000            # (sn, name) slots kept
MAX_BYTES = 64 << 20            # bodies kept, all entries together
MAX_ENTRY_BYTES = 1 << 20       # a larger config is rendered every time

TEXT_TYPE = "text/plain; charset=utf-8"     # what the route's text_response sends

# what the inline path serves (anything else goes to the route, which refuses it
# as it always did): SNs and tokens as validate_sn / token_urlsafe make them
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]{1,128}\Z")
_NAME_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}\Z")
_QUERY_TOKEN_RE = re.compile(r"token=([A-Za-z0-9_-]{1,128})\Z")


@dataclass(frozen=True, slots=True)
class ConfigRequest:
    """A config GET the inline path may answer: the path's SN and config
    name and the request's token (not yet checked)."""

    sn: str
    name: str
    token: str


def parse_config_request(path: str, query: str, authorization: str | None
                         ) -> ConfigRequest | None:
    """The config request in ``path`` (as sent, not percent-decoded),
    ``query`` and the ``Authorization`` header value, or ``None`` when it
    is not one the inline path answers (the route then answers it).  Pure.

    The token is the route's: the path's for ``/config/<sn>/t/<token>/<name>``
    (headers and query ignored); otherwise ``Authorization: Bearer``, else
    a query that is exactly ``token=<token>``.  Anything unusual (percent
    escapes, other query fields, a missing token) is left to the route."""
    if not path.startswith("/config/") or "%" in path:
        return None
    parts = path.split("/")
    if len(parts) == 6 and parts[3] == "t":
        sn, token, name = parts[2], parts[4], parts[5]
    elif len(parts) == 4:
        sn, name = parts[2], parts[3]
        if authorization is not None and authorization[:7].lower() == "bearer ":
            token = authorization[7:].strip()   # an empty one is the route's 401
        else:
            m = _QUERY_TOKEN_RE.match(query)
            if m is None:
                return None
            token = m.group(1)
    else:
        return None
    if not (_SEGMENT_RE.match(sn) and _SEGMENT_RE.match(token) and _NAME_RE.match(name)):
        return None
    return ConfigRequest(sn, name, token)


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


class _Same:
    """Identity of an object without keeping it alive: a weak reference
    (``None`` for ``None``).  A record that was replaced and freed is never
    "the same" again, even when a new object reuses its address."""

    __slots__ = ("_ref",)

    def __init__(self, obj: Any) -> None:
        self._ref = None if obj is None else weakref.ref(obj)

    def matches(self, obj: Any) -> bool:
        if self._ref is None:
            return obj is None
        return obj is not None and self._ref() is obj


class ConfigEntry:
    """One rendered config and everything it was rendered from.

    ``task``, ``server``, ``image``, ``live`` and ``renderer`` are held by
    identity, weakly (see :meth:`current`): an entry made stale by a change
    does not keep the old records in memory, only its body counts;
    ``token_sha256`` is the digest of the token the body embeds."""

    __slots__ = ("_image", "_live", "_renderer", "_server", "_task", "body", "name",
                 "node_url", "sn", "task_revision", "token_sha256")

    def __init__(self, *, sn: str, name: str, task_revision: int, task: Any, server: Any,
                 image: Any, live: Any, renderer: Any, node_url: str, token_sha256: str,
                 body: bytes) -> None:
        self.sn, self.name, self.body = sn, name, body
        self.task_revision = task_revision
        self.node_url = node_url
        self.token_sha256 = token_sha256
        self._task, self._server, self._image = _Same(task), _Same(server), _Same(image)
        self._live, self._renderer = _Same(live), _Same(renderer)

    def current(self, *, task_revision: int, task: Any, server: Any, image: Any, live: Any,
                renderer: Any, node_url: str, token_sha256: str) -> bool:
        """Whether this entry is what a render from these inputs would give:
        the task at the same revision, the very same objects, the same node
        URL and token."""
        return (task_revision == self.task_revision and self._task.matches(task)
                and self._server.matches(server) and self._image.matches(image)
                and self._live.matches(live) and self._renderer.matches(renderer)
                and node_url == self.node_url
                and hmac.compare_digest(token_sha256, self.token_sha256))


class ConfigCache:
    """Bounded LRU of :class:`ConfigEntry`, one per ``(sn, name)``;
    thread-safe (the event loop reads, the app's threads write)."""

    def __init__(self, *, max_entries: int = MAX_ENTRIES, max_bytes: int = MAX_BYTES,
                 max_entry_bytes: int = MAX_ENTRY_BYTES) -> None:
        self.max_entries = max(1, max_entries)
        self.max_bytes = max(1, max_bytes)
        self.max_entry_bytes = max(0, min(max_entry_bytes, self.max_bytes))
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], ConfigEntry] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes(self) -> int:
        """Bytes of the bodies held."""
        return self._bytes

    def get(self, sn: str, name: str) -> ConfigEntry | None:
        key = (sn, name)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
            return entry

    def put(self, entry: ConfigEntry) -> bool:
        """Keep ``entry`` in its slot (replacing what was there); ``False``
        when its body is over the per-entry limit (then the slot is emptied:
        what it held is older than this render)."""
        key = (entry.sn, entry.name)
        size = len(entry.body)
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._bytes -= len(old.body)
            if size > self.max_entry_bytes:
                return False
            self._entries[key] = entry
            self._bytes += size
            while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
                _, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped.body)
            return True

    def discard(self, sn: str, name: str) -> None:
        with self._lock:
            old = self._entries.pop((sn, name), None)
            if old is not None:
                self._bytes -= len(old.body)


class ConfigFastPath:
    """Serves rendered configs from a :class:`ConfigCache` for one
    :class:`~bootsvc.http.backend.BootBackend`, and remembers what the
    route renders.  :meth:`answer` is cheap enough for the event loop: a
    SHA-256, three dictionary lookups under their locks, identity checks,
    the timeline record and the counters."""

    def __init__(self, boot: BootBackend, cache: ConfigCache | None = None) -> None:
        self.boot = boot
        self.cache = cache if cache is not None else ConfigCache()
        m = boot.metrics
        m.describe("http_config_cache_total",
                   "install configs served from the render cache (result=hit) or rendered "
                   "(result=miss)")
        m.gauge("http_config_cache_entries", lambda: float(len(self.cache)),
                "rendered install configs held in memory")
        m.gauge("http_config_cache_bytes", lambda: float(self.cache.bytes),
                "bytes of the rendered install configs held in memory")

    def answer(self, path: str, query: str, authorization: str | None,
               remote_addr: str) -> tuple[int, str, bytes] | None:
        """``(200, content type, body)`` for a config GET whose render is
        cached and current and whose token is the machine's; ``None`` for
        everything else (the route answers it)."""
        req = parse_config_request(path, query, authorization)
        if req is None:
            return None
        entry = self.cache.get(req.sn, req.name)
        if entry is None:
            return None
        boot = self.boot
        # the token check of MachineTokens.check, success only: the stored digest
        # from the watch cache, constant-time compare; any refusal is the route's
        stored = boot.tokens.stored(req.sn)
        if stored is None:
            return None
        digest = _digest(req.token)
        if not hmac.compare_digest(digest, stored[0]):
            return None
        view = boot.ctx.machines.view(req.sn)
        if view.task is None:
            return None
        if not entry.current(task_revision=view.task_revision, task=view.task,
                             server=view.server, image=boot.image_for(view), live=boot.live,
                             renderer=boot.renderer, node_url=boot.node_url(remote_addr),
                             token_sha256=digest):
            return None
        boot.ctx.timeline.record(f"sn:{req.sn}", "config fetched",
                                 {"name": req.name, "ip": remote_addr})
        metrics = boot.metrics
        metrics.inc("http_config_cache_total", result="hit")
        metrics.inc("http_configs_total", config=req.name)
        metrics.inc("http_requests_total")
        return 200, TEXT_TYPE, entry.body

    def remember(self, *, sn: str, name: str, task_revision: int, task: Any, server: Any,
                 image: Any, live: Any, renderer: Any, node_url: str, token: str,
                 text: str) -> None:
        """Keep what the route just rendered (only a successful render),
        with what it was rendered from, read *before* the render (so a
        change during the render leaves an entry that never matches, never
        one that matches a body of older inputs); counts the miss."""
        self.boot.metrics.inc("http_config_cache_total", result="miss")
        self.cache.put(ConfigEntry(
            sn=sn, name=name, task_revision=task_revision, task=task, server=server,
            image=image, live=live, renderer=renderer, node_url=node_url,
            token_sha256=_digest(token), body=text.encode()))


__all__ = ["ENVIRON_KEY", "ConfigCache", "ConfigEntry", "ConfigFastPath", "ConfigRequest",
           "parse_config_request"]
