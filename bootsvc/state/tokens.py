"""Per-machine tokens, as Ironic's agent token does it (agent_api.md).

* A token is 32 random bytes (``secrets.token_urlsafe``), shown once: in the
  answer to the first registration, or inside an installer-mode install
  script and the configs it fetches.
* etcd keeps only its SHA-256, at ``/os/{idc}/machines/{sn}/token``, as
  JSON ``{"sha256": hex, "issued_at": t, "node": name, "why": ...}``.
* Checks compare digests with :func:`hmac.compare_digest` (constant time)
  against the node's watch cache (no etcd request), with a rate-limited
  fresh read when the cache does not know the token yet (another node may
  have issued it a moment ago).
* No token → 401; a token that is some other machine's → 403.
* Replaced whenever the node serves the machine a new boot script (a new
  boot means a new agent): the old hash is deleted *asynchronously* by a
  worker with a compare on the revision the cache showed, so the boot
  script path itself makes no etcd request and a token issued after that
  boot is never deleted.
* Revoked when the task reaches succeeded / failed / cancelled / rejected
  (seen on the watch cache, whichever node or control plane made it),
  after a short grace (``revoke_grace``, 60 s) so that a retried final
  callback or event batch — whose answer was lost — still gets its
  idempotent 200 instead of a 401.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass

from lpmos.metrics import Registry
from lpmos.models import Task, ValidationError
from lpmos.states import FINAL
from lpmos.store import Compare, Conflict, Delete, KeyValue, Put, Store, StoreError
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)

TOKEN_BYTES = 32
TOKEN_MAX_LEN = 128


class TokenError(Exception):
    """A request's token was refused; ``status_code`` is 401 or 403."""

    status_code = 401
    reason = "missing"

    def __init__(self, message: str, *, status_code: int = 401, reason: str = "missing") -> None:
        super().__init__(message)
        self.status_code = status_code
        self.reason = reason


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()


def token_record(token: str, *, node: str, why: str, boot_id: str = "") -> bytes:
    """The stored form of a machine token: its SHA-256, never the token.

    ``boot_id`` (the kernel's per-boot id the agent sent when it registered)
    is kept hashed too, so a registration retried by the same boot after its
    answer was lost can be re-issued a token (see
    :meth:`bootsvc.state.registration.Registrar.register`)."""
    record = {"sha256": token_digest(token), "issued_at": time.time(), "node": node,
              "why": why}
    if boot_id:
        record["boot_sha256"] = token_digest(boot_id)
    return json.dumps(record, sort_keys=True).encode()


def _parse_record(raw: bytes) -> str | None:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return None
    digest = data.get("sha256") if isinstance(data, dict) else None
    return digest if isinstance(digest, str) and len(digest) == 64 else None


@dataclass(frozen=True, slots=True)
class _Stored:
    digest: str
    revision: int


class MachineTokens:
    """The tokens of one IDC as this node knows them, and their lifecycle."""

    def __init__(self, store: Store, keys: Keys, idc: str, cache: WatchCache,
                 metrics: Registry, *, node: str, fresh_reads_per_s: float = 20.0) -> None:
        self.store = store
        self.keys = keys
        self.idc = idc
        self.cache = cache
        self.metrics = metrics
        self.node = node
        metrics.describe("http_token_refused_total", "machine tokens refused, by reason")
        metrics.describe("http_token_fresh_reads_total",
                         "etcd reads of a token the cache did not know")
        metrics.describe("http_token_dropped_total", "machine tokens dropped, by why")
        metrics.describe("http_token_drop_failed_total",
                         "machine tokens that could not be dropped (etcd unavailable)")
        metrics.describe("http_token_drop_queue_full_total",
                         "token drops not queued because the queue was full")
        self._lock = threading.Lock()
        self._by_sn: dict[str, _Stored] = {}
        self._by_digest: dict[str, str] = {}
        self._queue: list[tuple[float, str, str, int]] = []     # heap of (due, sn, why, rev)
        self._queue_cond = threading.Condition()
        self.revoke_grace = 60.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._bucket = fresh_reads_per_s
        self._bucket_rate = fresh_reads_per_s
        self._bucket_at = time.monotonic()
        cache.add_listener(self._on_change, on_reset=self.rebuild)
        self.rebuild()

    # -- following the cache ---------------------------------------------------------

    def rebuild(self) -> None:
        by_sn: dict[str, _Stored] = {}
        for kv in self.cache.items(self.keys.idc(self.idc)):
            parsed = self.keys.parse(kv.key)
            if parsed is not None and parsed.kind == "token" and parsed.idc == self.idc:
                digest = _parse_record(kv.value)
                if digest:
                    by_sn[parsed.name] = _Stored(digest, kv.mod_revision)
        with self._lock:
            self._by_sn = by_sn
            self._by_digest = {s.digest: sn for sn, s in by_sn.items()}

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.keys.parse(key)
        if parsed is None or parsed.idc != self.idc:
            return
        if parsed.kind == "token":
            self._remember(parsed.name, new)
        elif parsed.kind == "task" and new is not None:
            self._maybe_revoke(parsed.name, old, new)

    def _remember(self, sn: str, kv: KeyValue | None) -> None:
        with self._lock:
            previous = self._by_sn.pop(sn, None)
            if previous is not None and self._by_digest.get(previous.digest) == sn:
                del self._by_digest[previous.digest]
            digest = _parse_record(kv.value) if kv is not None else None
            if kv is not None and digest:
                self._by_sn[sn] = _Stored(digest, kv.mod_revision)
                self._by_digest[digest] = sn

    def _maybe_revoke(self, sn: str, old: KeyValue | None, new: KeyValue) -> None:
        try:
            task = Task.from_json(new.value)
            was = Task.from_json(old.value).state if old is not None else None
        except ValidationError:
            return
        if task.state in FINAL and was not in FINAL:
            self.drop_async(sn, why="task " + task.status, delay=self.revoke_grace)

    # -- checks (any thread, no etcd request on success) ----------------------------

    def stored(self, sn: str) -> tuple[str, int] | None:
        """``(digest, mod_revision)`` of the machine's token, or ``None``."""
        with self._lock:
            s = self._by_sn.get(sn)
        return (s.digest, s.revision) if s else None

    def owner(self, token: str) -> str | None:
        """The SN whose token this is (cache only), or ``None``."""
        if not token or len(token) > TOKEN_MAX_LEN:
            return None
        with self._lock:
            return self._by_digest.get(token_digest(token))

    def authenticate(self, token: str | None) -> str:
        """The SN ``token`` belongs to (cache only); :class:`TokenError` 401
        when it is missing or no machine's.  For requests that name no
        machine yet (or name it in a part not validated yet), and for the
        files any machine may fetch."""
        if not token:
            self.metrics.inc("http_token_refused_total", reason="missing")
            raise TokenError("a machine token is required (Authorization: Bearer TOKEN)")
        owner = self.owner(token)
        if owner is None:
            self.metrics.inc("http_token_refused_total", reason="invalid")
            raise TokenError("invalid or revoked machine token", reason="invalid")
        return owner

    def check(self, sn: str, token: str | None) -> None:
        """Return if ``token`` is ``sn``'s; raise :class:`TokenError` (401:
        missing or unknown, 403: another machine's) otherwise."""
        if not token:
            self.metrics.inc("http_token_refused_total", reason="missing")
            raise TokenError("a machine token is required (Authorization: Bearer TOKEN)")
        if len(token) > TOKEN_MAX_LEN:
            self.metrics.inc("http_token_refused_total", reason="malformed")
            raise TokenError("malformed token", reason="malformed")
        digest = token_digest(token)
        stored = self.stored(sn)
        if stored is not None and hmac.compare_digest(digest, stored[0]):
            return
        if stored is None and self._fresh_read_allowed():
            # the cache may be a moment behind a token another node issued
            fresh = self._fresh(sn)
            if fresh is not None and hmac.compare_digest(digest, fresh):
                return
        with self._lock:
            other = self._by_digest.get(digest)
        if other is not None and other != sn:
            self.metrics.inc("http_token_refused_total", reason="other_machine")
            raise TokenError("this token belongs to another machine", status_code=403,
                             reason="other_machine")
        self.metrics.inc("http_token_refused_total", reason="invalid")
        raise TokenError("invalid or revoked machine token", reason="invalid")

    def _fresh(self, sn: str) -> str | None:
        self.metrics.inc("http_token_fresh_reads_total")
        try:
            kv = self.store.get(self.keys.machine_token(self.idc, sn))
        except StoreError:
            return None
        if kv is None:
            return None
        self._remember(sn, kv)
        return _parse_record(kv.value)

    def _fresh_read_allowed(self) -> bool:
        with self._lock:
            now = time.monotonic()
            self._bucket = min(self._bucket_rate,
                               self._bucket + (now - self._bucket_at) * self._bucket_rate)
            self._bucket_at = now
            if self._bucket >= 1:
                self._bucket -= 1
                return True
            return False

    # -- issuing (caller commits the op) -----------------------------------------------

    def issue(self, sn: str, *, why: str, boot_id: str = "") -> tuple[str, Put]:
        """A new token and the Put that stores its hash (commit it in the
        caller's transaction), then :meth:`learn` the result."""
        token = new_token()
        return token, Put(self.keys.machine_token(self.idc, sn),
                          token_record(token, node=self.node, why=why, boot_id=boot_id))

    def learn(self, sn: str, token: str, revision: int) -> None:
        """Record a token this node just stored at ``revision`` (so checks
        succeed before the watch delivers it)."""
        kv = KeyValue(self.keys.machine_token(self.idc, sn),
                      token_record(token, node=self.node, why="learned"), revision)
        self._remember(sn, kv)

    def forget(self, sn: str) -> None:
        self._remember(sn, None)

    def delete_op(self, sn: str) -> Delete:
        return Delete(self.keys.machine_token(self.idc, sn))

    # -- asynchronous reset / revoke ------------------------------------------------

    def drop_async(self, sn: str, *, why: str, delay: float = 0.0) -> None:
        """Delete ``sn``'s token in ``delay`` seconds, if it is still the one
        the cache shows now.  Never blocks; never touches etcd on the
        caller's thread."""
        stored = self.stored(sn)
        if stored is None:
            return
        with self._queue_cond:
            if len(self._queue) >= 10000:
                self.metrics.inc("http_token_drop_queue_full_total")
                return
            heapq.heappush(self._queue, (time.monotonic() + delay, sn, why, stored[1]))
            self._queue_cond.notify()

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="token-drops", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._queue_cond:
                now = time.monotonic()
                if not self._queue or self._queue[0][0] > now:
                    wait = min(0.2, self._queue[0][0] - now) if self._queue else 0.2
                    self._queue_cond.wait(max(0.001, wait))
                    continue
                _due, sn, why, revision = heapq.heappop(self._queue)
            self.drop_now(sn, revision, why=why)

    def drop_now(self, sn: str, revision: int, *, why: str) -> bool:
        """Delete the token stored at ``revision`` (CAS); ``False`` if it
        changed meanwhile or etcd failed (a later boot tries again)."""
        key = self.keys.machine_token(self.idc, sn)
        try:
            self.store.commit([Compare(key, revision)], [Delete(key)])
        except Conflict:
            return False
        except StoreError as exc:
            self.metrics.inc("http_token_drop_failed_total")
            log.warning("could not drop the token of %s (%s): %s", sn, why, exc)
            return False
        with self._lock:
            current = self._by_sn.get(sn)
        if current is not None and current.revision == revision:
            self.forget(sn)
        self.metrics.inc("http_token_dropped_total", why=why.split()[0])
        return True
