"""Audit records: who did what, when, with the state before and after.

One key per record, ``/os/audit/{time}-{id}``; the time part sorts
lexically, so a range read returns records in time order.

A record is never a write of its own: :meth:`Auditor.op` builds it as an
operation for the very transaction that makes the change (with the change's
compares), so the change and its record are stored together or not at all.
A crash between two writes cannot lose the record, and a lost race
(:class:`lpmos.store.Conflict`) leaves none.  Since both are in one
transaction they share one revision: the record's ``mod_revision`` is the
revision of the change (readers report it as the record's ``revision``;
the record cannot carry it, it is unknown until etcd commits).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

from lpmos.store import Put
from lpmos.store.keys import Keys


def audit_stamp(t: float | None = None) -> str:
    t = time.time() if t is None else t
    return time.strftime("%Y%m%dT%H%M%S", time.gmtime(t)) + f".{int((t % 1) * 1e6):06d}Z"


@dataclass(frozen=True, slots=True)
class Auditor:
    """Who is changing something, and from where (``"token alice-ci from
    10.0.0.5"``); :meth:`op` is the audit record of one of their changes."""

    keys: Keys
    actor: str
    source: str = ""

    def op(self, action: str, target: str, *, before: Any = None, after: Any = None,
           detail: str = "") -> Put:
        """The record of ``action`` on ``target`` as a :class:`Put`, to be
        committed in the same transaction as the change.  ``before`` and
        ``after`` are JSON-able summaries (``None``: nothing before, or
        nothing left after); they must carry no secrets.  Each call makes a
        new key, so a retried transaction builds its record again."""
        t = time.time()
        key = self.keys.audit(audit_stamp(t), secrets.token_hex(4))
        record = {"at": t, "actor": self.actor, "action": action, "target": target,
                  "before": before, "after": after, "detail": detail, "source": self.source}
        return Put(key, json.dumps(record, separators=(",", ":"), default=str).encode())
