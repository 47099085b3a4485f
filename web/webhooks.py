"""Outbound webhooks: signed JSON notifications of task state changes and of
regional nodes appearing and disappearing.

Records live at ``{p}/_webhooks/{id}`` (:meth:`lpmos.store.keys.Keys.webhook`)
and are managed by admins through :mod:`web.api_webhooks`.  Delivery follows
the process's single watch (:class:`web.console_cache.ConsoleCache`): a
cache listener turns each change into zero or more deliveries and puts them
in a bounded in-memory queue; a few worker threads POST them.  Nothing here
runs on a request thread, and the listener never blocks the cache thread
(it only appends to the queue).

Contract of a delivery:

* body: JSON, ``{"event": "task.state", "at", "idc", "sn", "from", "to",
  "revision", "task": {...}}`` (``from`` is ``null`` for a new task; a
  deleted task sends nothing) or ``{"event": "node.liveness", "at", "idc",
  "node", "from", "to", "revision", "registration": {...}}`` (``up`` /
  ``down``: the node key lives under its lease, so its presence is its
  liveness);
* headers: ``X-LPMOS-Event``, ``X-LPMOS-Delivery`` and ``X-LPMOS-Signature:
  sha256=<hex HMAC-SHA256 of the body with the webhook's secret>``.  The
  delivery id is derived from the webhook, the key and the etcd revision,
  so a retry, and the same change delivered by another replica, carry the
  same id: receivers deduplicate on it;
* retries: a connection error, a timeout, 408, 429 or 5xx is retried after a
  jittered exponential back-off (``uniform(d/2, d)``, ``d = base * 2**n``
  capped) until the delivery's deadline; other answers are final.  Redirects
  are not followed;
* bounds: at most ``queue`` deliveries wait (new and retrying); a new one
  beyond that drops the oldest, counted as
  ``webhook_dropped_total{reason="queue_full"}``; each webhook keeps its
  last ``log_size`` attempts (:meth:`WebhookDispatcher.deliveries`).

Known gaps: the queue is in memory (a restart loses what waits in it);
changes hidden by a cache reload after compaction send nothing; order is
not guaranteed across workers; and every control-plane replica delivers
(the code base has no leader election), so receivers must deduplicate on
``X-LPMOS-Delivery``.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import http.client
import itertools
import json
import logging
import random
import re
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from lpmos.metrics import Registry
from lpmos.models import ValidationError, validate_text
from lpmos.store import KeyValue
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys
from web.settings import DEFAULTS

log = logging.getLogger(__name__)

EVENTS = ("task.state", "node.liveness")
ID_RE = re.compile(r"[0-9a-f]{16}")
URL_MAX = 2048
SECRET_MIN, SECRET_MAX = 16, 256
MAX_WEBHOOKS = 100
#: bytes of a receiver's answer that are read (and thrown away)
ANSWER_MAX = 4096
RETRY_STATUSES = frozenset({408, 429})
USER_AGENT = "lpmos-webhook/1"


# -- records (pure) -------------------------------------------------------------------


def new_id() -> str:
    return secrets.token_hex(8)


def new_secret() -> str:
    return secrets.token_urlsafe(32)


def parse_url(value: Any) -> str:
    """An ``http``/``https`` URL with a host, no credentials, no fragment and
    no whitespace or control characters; :class:`ValidationError` else."""
    if not isinstance(value, str) or not value:
        raise ValidationError("url", "an http:// or https:// URL")
    if len(value) > URL_MAX:
        raise ValidationError("url", f"at most {URL_MAX} characters")
    if any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in value):
        raise ValidationError("url", "no spaces or control characters")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError as exc:
        raise ValidationError("url", f"malformed: {exc}") from None
    if parts.scheme not in ("http", "https"):
        raise ValidationError("url", "the scheme must be http or https")
    if not parts.hostname:
        raise ValidationError("url", "a host is required")
    if parts.username is not None or parts.password is not None:
        raise ValidationError("url", "no user:password@ in the URL; the body is signed instead")
    if parts.fragment:
        raise ValidationError("url", "no #fragment")
    if port == 0:
        raise ValidationError("url", "port 0 is not a port")
    return value


def parse_events(value: Any) -> list[str]:
    if not isinstance(value, list) or not value:
        raise ValidationError("events", f"a non-empty list of {', '.join(EVENTS)}")
    out: list[str] = []
    for item in value:
        if item not in EVENTS:
            raise ValidationError("events", f"{item!r} is not one of {', '.join(EVENTS)}")
        if item not in out:
            out.append(item)
    return out


def parse_secret(value: Any) -> str:
    if (not isinstance(value, str) or not SECRET_MIN <= len(value) <= SECRET_MAX
            or not value.isprintable() or value != value.strip()):
        raise ValidationError("secret", f"{SECRET_MIN} to {SECRET_MAX} printable characters")
    return value


def parse_webhook(body: dict[str, Any], current: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """The webhook fields of a request body: all of them on create
    (``current`` is ``None``), those present on update (merged into
    ``current``).  ``secret`` is kept when given and is otherwise absent
    (the caller generates one on create).  Unknown fields are refused."""
    allowed = {"url", "events", "secret", "enabled", "description", "revision"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], "unknown field")
    out = dict(current or {})
    if current is None or "url" in body:
        out["url"] = parse_url(body.get("url"))
    if current is None or "events" in body:
        out["events"] = parse_events(body.get("events"))
    if "enabled" in body or current is None:
        enabled = body.get("enabled", True)
        if not isinstance(enabled, bool):
            raise ValidationError("enabled", "true or false")
        out["enabled"] = enabled
    if "description" in body or current is None:
        out["description"] = validate_text(body.get("description", ""), "description", 200)
    if body.get("secret") is not None:
        out["secret"] = parse_secret(body["secret"])
    return out


def webhook_view(ident: str, record: dict[str, Any], revision: int = 0) -> dict[str, Any]:
    """A webhook as the API and the audit log show it: never its secret."""
    view = {k: v for k, v in record.items() if k != "secret"}
    view["id"] = ident
    if revision:
        view["revision"] = revision
    return view


def sign(secret: str, body: bytes) -> str:
    """The ``X-LPMOS-Signature`` value of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def delivery_id(webhook: str, key: str, revision: int) -> str:
    """Stable over retries and over replicas (the module doc)."""
    return hashlib.sha256(f"{webhook}\0{key}\0{revision}".encode()).hexdigest()[:32]


# -- events (pure) --------------------------------------------------------------------

TASK_FIELDS = ("idc", "sn", "mac", "os_type", "os_version", "image", "status", "attempt",
               "reason", "claimed_by", "created_by", "approved_by", "template")
NODE_FIELDS = ("address", "http", "version", "started_at")


def _doc(kv: KeyValue | None) -> dict[str, Any] | None:
    if kv is None:
        return None
    try:
        doc = json.loads(kv.value)
    except (ValueError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def build_task_event(idc: str, sn: str, old: dict[str, Any] | None,
                     new: dict[str, Any] | None, revision: int, at: float
                     ) -> dict[str, Any] | None:
    """The ``task.state`` event of a task document change, or ``None`` when
    its status did not change (progress, logs) or the task was deleted."""
    if new is None:
        return None
    before = old.get("status") if old else None
    after = new.get("status")
    if not isinstance(after, str) or before == after:
        return None
    return {"event": "task.state", "at": at, "idc": idc, "sn": sn, "from": before,
            "to": after, "revision": revision,
            "task": {k: new[k] for k in TASK_FIELDS if k in new}}


def build_node_event(idc: str, node: str, old: dict[str, Any] | None,
                     new: dict[str, Any] | None, existed: bool, exists: bool,
                     revision: int, at: float) -> dict[str, Any] | None:
    """The ``node.liveness`` event of a node key's change, or ``None`` when
    the node was and still is registered (its periodic counter updates)."""
    if existed == exists:
        return None
    doc = new if exists else old
    return {"event": "node.liveness", "at": at, "idc": idc, "node": node,
            "from": "up" if existed else "down", "to": "up" if exists else "down",
            "revision": revision,
            "registration": {k: doc[k] for k in NODE_FIELDS if doc and k in doc}}


def backoff_delay(attempt: int, base: float, cap: float,
                  rng: Callable[[float, float], float] = random.uniform) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
    d = min(cap, base * 2 ** (attempt - 1))
    return rng(d / 2, d)


def should_retry(status: int | None) -> bool:
    """An error (``None``), 408, 429 and 5xx are retried; other answers are final."""
    return status is None or status in RETRY_STATUSES or status >= 500


# -- delivery -------------------------------------------------------------------------


@dataclass(frozen=True)
class WebhookSettings:
    """The ``web.webhook_*`` settings (their one home is :mod:`web.settings`,
    with their flags and help)."""

    timeout: float = DEFAULTS["web.webhook_timeout"]            # seconds per attempt, all of it
    deadline: float = DEFAULTS["web.webhook_deadline"]          # from the change to the last retry
    queue: int = DEFAULTS["web.webhook_queue"]                  # deliveries waiting
    log_size: int = DEFAULTS["web.webhook_log"]                 # attempts kept per webhook
    workers: int = DEFAULTS["web.webhook_workers"]
    backoff_base: float = DEFAULTS["web.webhook_backoff"]
    backoff_max: float = DEFAULTS["web.webhook_backoff_max"]

    @classmethod
    def from_values(cls, values: dict[str, Any]) -> WebhookSettings:
        """From resolved ``web.webhook_*`` values; missing ones take their default."""
        v = {**DEFAULTS, **values}
        return cls(timeout=float(v["web.webhook_timeout"]),
                   deadline=float(v["web.webhook_deadline"]),
                   queue=int(v["web.webhook_queue"]), log_size=int(v["web.webhook_log"]),
                   workers=int(v["web.webhook_workers"]),
                   backoff_base=float(v["web.webhook_backoff"]),
                   backoff_max=float(v["web.webhook_backoff_max"]))


@dataclass
class Delivery:
    webhook: str
    ident: str
    event: str
    body: bytes
    created: float                # monotonic
    seq: int
    attempt: int = 0


@dataclass(frozen=True)
class Answer:
    status: int | None
    error: str
    duration: float


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> Answer:
    """POST ``body`` to ``url``: the status, or ``None`` and the error.

    ``timeout`` bounds the whole attempt, not each read: a watchdog shuts
    the socket at the deadline, so a receiver that dribbles its answer a
    byte at a time cannot hold a worker (the name lookup before the connect
    is the resolver's and not covered).  At most :data:`ANSWER_MAX` bytes of
    the answer body are read."""
    parts = urlsplit(url)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    start = time.monotonic()
    conn = cls(parts.hostname or "", parts.port, timeout=timeout)
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        sock = conn.sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read(ANSWER_MAX)
        if expired.is_set():
            raise TimeoutError
        return Answer(resp.status, "", time.monotonic() - start)
    except (OSError, http.client.HTTPException) as exc:
        if expired.is_set() or isinstance(exc, TimeoutError):
            return Answer(None, f"timed out after {timeout:g} s", time.monotonic() - start)
        return Answer(None, f"{type(exc).__name__}: {exc}", time.monotonic() - start)
    finally:
        watchdog.cancel()
        conn.close()


@dataclass
class _Hooks:
    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    revisions: dict[str, int] = field(default_factory=dict)


class WebhookDispatcher:
    """Turns cache changes into signed POSTs (the module doc).

    ``start()`` attaches to the cache; the worker threads start with the
    first delivery, so a process without webhooks runs none.  ``stop()``
    ends them (waiting deliveries are dropped).  Readers
    (:meth:`webhooks`, :meth:`deliveries`) are thread-safe."""

    def __init__(self, cache: WatchCache, keys: Keys, metrics: Registry,
                 settings: WebhookSettings | None = None, *,
                 send: Callable[[str, bytes, dict[str, str], float], Answer] = post,
                 clock: Callable[[], float] = time.time) -> None:
        self.cache = cache
        self.keys = keys
        self.metrics = metrics
        self.settings = settings or WebhookSettings()
        self._send = send
        self._clock = clock
        self._prefix = keys.webhooks()
        self._lock = threading.Condition(threading.RLock())
        self._hooks = _Hooks()
        self._seen = 0
        self._heap: list[tuple[float, int, Delivery]] = []
        self._logs: dict[str, deque[dict[str, Any]]] = {}
        self._seq = itertools.count()
        self._threads: list[threading.Thread] = []
        self._stopping = False
        metrics.describe("webhook_deliveries_total", "webhook delivery attempts, by result")
        metrics.describe("webhook_dropped_total", "webhook deliveries given up, by reason")
        metrics.describe("webhook_delivery_seconds", "webhook delivery attempt durations",
                         kind="histogram")
        metrics.gauge("webhook_queue_length", self.queue_length,
                      "webhook deliveries waiting (new and retrying)")

    def start(self) -> WebhookDispatcher:
        self.cache.add_listener(self._on_change, on_reset=self._reload)
        self._reload()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._heap.clear()
            self._lock.notify_all()
            threads, self._threads = self._threads, []
        for t in threads:
            t.join(timeout=self.settings.timeout + 1)

    # -- reading ---------------------------------------------------------------------

    def webhooks(self) -> list[tuple[str, dict[str, Any], int]]:
        """``(id, record, revision)`` of every webhook, by id (secrets included)."""
        with self._lock:
            return [(i, dict(r), self._hooks.revisions[i])
                    for i, r in sorted(self._hooks.records.items())]

    def webhook(self, ident: str) -> tuple[dict[str, Any], int] | None:
        with self._lock:
            record = self._hooks.records.get(ident)
            return (dict(record), self._hooks.revisions[ident]) if record else None

    def deliveries(self, ident: str) -> list[dict[str, Any]]:
        """The webhook's last attempts, newest first."""
        with self._lock:
            return list(reversed(self._logs.get(ident, ())))

    def queue_length(self) -> float:
        with self._lock:
            return float(len(self._heap))

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Until the webhook records reflect ``revision`` (read-your-writes
        after an API change)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._seen < revision:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._lock.wait(remaining)
            return True

    # -- following the cache (cache thread) -----------------------------------------

    def _reload(self) -> None:
        hooks = _Hooks()
        for kv in self.cache.items(self._prefix):
            self._load(hooks, kv)
        with self._lock:
            self._hooks = hooks
            for gone in set(self._logs) - set(hooks.records):
                del self._logs[gone]
            self._seen = max(self._seen, self.cache.revision)
            self._lock.notify_all()

    def _load(self, hooks: _Hooks, kv: KeyValue) -> None:
        ident = kv.key[len(self._prefix):]
        record = _doc(kv)
        if record is None or not ID_RE.fullmatch(ident):
            log.warning("ignoring malformed webhook %s", kv.key)
            return
        hooks.records[ident] = record
        hooks.revisions[ident] = kv.mod_revision

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        if key.startswith(self._prefix):
            with self._lock:
                ident = key[len(self._prefix):]
                if new is None:
                    self._hooks.records.pop(ident, None)
                    self._hooks.revisions.pop(ident, None)
                    self._logs.pop(ident, None)
                else:
                    self._load(self._hooks, new)
                self._seen = max(self._seen, revision)
                self._lock.notify_all()
            return
        parsed = self.keys.parse(key)
        if parsed is None or parsed.kind not in ("task", "node"):
            return
        with self._lock:
            if not any(r.get("enabled") for r in self._hooks.records.values()):
                return     # the common case: decode nothing
        at = self._clock()
        if parsed.kind == "task":
            event = build_task_event(parsed.idc, parsed.name, _doc(old), _doc(new), revision, at)
        else:
            event = build_node_event(parsed.idc, parsed.name, _doc(old), _doc(new),
                                     old is not None, new is not None, revision, at)
        if event is not None:
            self.enqueue(key, revision, event)

    # -- the queue -------------------------------------------------------------------

    def enqueue(self, key: str, revision: int, event: dict[str, Any]) -> int:
        """Queue ``event`` for every enabled webhook subscribed to it; the
        number queued.  Never blocks: a full queue drops its oldest entry."""
        body = json.dumps(event, separators=(",", ":"), sort_keys=True).encode()
        now = time.monotonic()
        queued = 0
        with self._lock:
            if self._stopping:
                return 0
            for ident, record in sorted(self._hooks.records.items()):
                if not record.get("enabled") or event["event"] not in record.get("events", ()):
                    continue
                while len(self._heap) >= self.settings.queue:
                    self._drop_oldest()
                d = Delivery(ident, delivery_id(ident, key, revision), event["event"], body,
                             now, next(self._seq))
                heapq.heappush(self._heap, (now, d.seq, d))
                queued += 1
            if queued:
                self._ensure_workers()
                self._lock.notify_all()
        return queued

    def _drop_oldest(self) -> None:
        oldest = min(range(len(self._heap)), key=lambda i: self._heap[i][2].seq)
        dropped = self._heap.pop(oldest)[2]
        heapq.heapify(self._heap)
        self.metrics.inc("webhook_dropped_total", reason="queue_full")
        log.warning("webhook queue full: dropped delivery %s to %s", dropped.ident,
                    dropped.webhook)

    def _ensure_workers(self) -> None:
        self._threads = [t for t in self._threads if t.is_alive()]
        while len(self._threads) < self.settings.workers:
            t = threading.Thread(target=self._work, name=f"webhook-{len(self._threads)}",
                                 daemon=True)
            self._threads.append(t)
            t.start()

    def _next(self) -> Delivery | None:
        with self._lock:
            while not self._stopping:
                now = time.monotonic()
                if self._heap and self._heap[0][0] <= now:
                    return heapq.heappop(self._heap)[2]
                wait = self._heap[0][0] - now if self._heap else 1.0
                self._lock.wait(min(1.0, wait))
            return None

    def _work(self) -> None:
        while (d := self._next()) is not None:
            try:
                self._attempt(d)
            except Exception:   # never let a worker die
                log.exception("webhook delivery %s failed unexpectedly", d.ident)

    def _attempt(self, d: Delivery) -> None:
        with self._lock:
            record = self._hooks.records.get(d.webhook)
        if record is None or not record.get("enabled") or not record.get("secret"):
            self.metrics.inc("webhook_dropped_total", reason="webhook_gone")
            return
        d.attempt += 1
        headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT,
                   "X-LPMOS-Event": d.event, "X-LPMOS-Delivery": d.ident,
                   "X-LPMOS-Signature": sign(str(record["secret"]), d.body)}
        remaining = d.created + self.settings.deadline - time.monotonic()
        answer = self._send(str(record["url"]), d.body, headers,
                            max(0.1, min(self.settings.timeout, remaining)))
        ok = answer.status is not None and 200 <= answer.status < 300
        retry = not ok and should_retry(answer.status)
        delay = backoff_delay(d.attempt, self.settings.backoff_base, self.settings.backoff_max)
        give_up = retry and time.monotonic() + delay > d.created + self.settings.deadline
        result = "ok" if ok else "error" if answer.status is None else "http_error"
        self.metrics.inc("webhook_deliveries_total", result=result)
        self.metrics.observe("webhook_delivery_seconds", answer.duration)
        entry = {"at": self._clock(), "delivery": d.ident, "event": d.event,
                 "attempt": d.attempt, "status": answer.status, "error": answer.error,
                 "duration": round(answer.duration, 4),
                 "outcome": "delivered" if ok else "gave_up" if give_up
                 else "retrying" if retry else "refused"}
        with self._lock:
            if d.webhook in self._hooks.records:
                self._logs.setdefault(d.webhook, deque(maxlen=self.settings.log_size)) \
                    .append(entry)
            if give_up:
                self.metrics.inc("webhook_dropped_total", reason="deadline")
            elif retry and not self._stopping:
                while len(self._heap) >= self.settings.queue:
                    self._drop_oldest()
                heapq.heappush(self._heap, (time.monotonic() + delay, d.seq, d))
                self._lock.notify_all()
        if not ok:
            log.info("webhook %s delivery %s attempt %d: %s", d.webhook, d.ident, d.attempt,
                     answer.error or answer.status)
