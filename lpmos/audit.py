"""Audit records: who did what, when, with the state before and after.

One key per record, ``/os/audit/{time}-{id}``; the time part sorts
lexically, so a range read returns records in time order.
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from lpmos.store import Store
from lpmos.store.keys import Keys


def audit_stamp(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


def write_audit(store: Store, keys: Keys, *, actor: str, action: str, target: str,
                before: Any = None, after: Any = None, detail: str = "",
                source: str = "") -> str:
    """Store one audit record and return its key."""
    t = time.time()
    key = keys.audit(audit_stamp(t), secrets.token_hex(4))
    record = {"at": t, "actor": actor, "action": action, "target": target,
              "before": before, "after": after, "detail": detail, "source": source}
    store.put(key, json.dumps(record, separators=(",", ":"), default=str).encode())
    return key
