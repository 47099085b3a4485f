"""How the control plane authenticates to a regional node (the node API).

The node API (``/node/v1/...`` on a node's boot HTTP, today the full install
logs) answers only the control plane.  Machines reach the same port and are
untrusted, so neither a machine token nor a bearer secret sent in clear on
the provisioning network will do.  Instead every request is signed:

    Authorization: LPMOS-HMAC t=<unix seconds>,sig=<hex HMAC-SHA256>

over ``METHOD \\n PATH?QUERY \\n t`` with a key shared through etcd at
``keys.node_api_secret()`` (``/os/_secrets/node_api``; with etcd auth, grant
read on ``/os/_secrets/`` to the nodes' and control planes' etcd users
only).  A node accepts a signature made within :data:`MAX_SKEW` seconds of
its clock, so a captured request is good for that long, for that one path
and method (they are reads).  The key never leaves etcd and the two
processes' memory: it is not logged, not audited, not in any API answer.

The first service that needs the key creates it (a create-if-absent
transaction, so concurrent first users agree).  Deleting the key rotates
it: both sides re-read it, at most every :data:`REFRESH_EVERY` seconds,
when a signature does not check.

:func:`sign` and :func:`verify` are pure; :class:`SharedKey` holds the key
and touches the store.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time

from lpmos.store import Compare, Conflict, Put, Store
from lpmos.store.keys import Keys

SCHEME = "LPMOS-HMAC"
MAX_SKEW = 60.0
REFRESH_EVERY = 5.0
KEY_BYTES = 32

_HEADER_RE = re.compile(SCHEME + r" t=(\d{1,12}),sig=([0-9a-f]{64})")


def _mac(key: bytes, method: str, target: str, stamp: int) -> str:
    message = f"{method.upper()}\n{target}\n{stamp}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, target: str, now: float) -> str:
    """The ``Authorization`` value for ``METHOD target`` (path and query as
    sent, e.g. ``/node/v1/logs/SN?attempt=2``) at time ``now``."""
    stamp = int(now)
    return f"{SCHEME} t={stamp},sig={_mac(key, method, target, stamp)}"


def verify(key: bytes, method: str, target: str, header: str | None, now: float,
           max_skew: float = MAX_SKEW) -> str:
    """``""`` when ``header`` signs ``METHOD target`` with ``key`` within
    ``max_skew`` seconds of ``now``; else why not (``missing``,
    ``malformed``, ``expired``, ``bad_signature``)."""
    if not header:
        return "missing"
    m = _HEADER_RE.fullmatch(header.strip())
    if m is None:
        return "malformed"
    stamp = int(m.group(1))
    if abs(now - stamp) > max_skew:
        return "expired"
    if not hmac.compare_digest(_mac(key, method, target, stamp), m.group(2)):
        return "bad_signature"
    return ""


class SharedKey:
    """The node-API key as one process knows it: read from etcd once,
    created there when absent, re-read (rate-limited) on :meth:`refresh`.
    Raises :class:`lpmos.store.StoreError` when etcd cannot be reached and
    no key is known yet."""

    def __init__(self, store: Store, keys: Keys, *, refresh_every: float = REFRESH_EVERY) -> None:
        self.store = store
        self.key_name = keys.node_api_secret()
        self.refresh_every = refresh_every
        self._lock = threading.Lock()
        self._key: bytes | None = None
        self._read_at = float("-inf")

    def get(self) -> bytes:
        with self._lock:
            if self._key is not None:
                return self._key
        return self._load()

    def refresh(self) -> bool:
        """Read the key again if the last read is older than
        ``refresh_every``; whether it changed."""
        with self._lock:
            if time.monotonic() - self._read_at < self.refresh_every:
                return False
            old = self._key
        return self._load() != old

    def _load(self) -> bytes:
        kv = self.store.get(self.key_name)
        if kv is None:
            fresh = json.dumps({"hmac_key": secrets.token_hex(KEY_BYTES),
                                "created_at": time.time()}).encode()
            try:
                self.store.commit([Compare(self.key_name, 0)], [Put(self.key_name, fresh)])
                raw = fresh
            except Conflict:             # another service created it first: theirs
                kv = self.store.get(self.key_name)
                if kv is None:
                    raise
                raw = kv.value
        else:
            raw = kv.value
        key = _parse(raw)
        with self._lock:
            self._key = key
            self._read_at = time.monotonic()
        return key


def _parse(raw: bytes) -> bytes:
    try:
        data = json.loads(raw)
        return bytes.fromhex(data["hmac_key"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError("the node API key in etcd is malformed; delete it to make a new "
                         "one") from exc
