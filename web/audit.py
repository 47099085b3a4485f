"""The audit record of a request's change: who is calling, from where.

Every mutating view builds its records with :func:`request_auditor` and
hands them to the write itself (``audit=`` of :class:`lpmos.tasks.TaskService`
and :class:`lpmos.auth.Auth`, or the ops of a commit), so the change and its
record are one etcd transaction (:mod:`lpmos.audit`).
"""

from __future__ import annotations

from flask import request

from lpmos.audit import Auditor
from web.auth import current_principal
from web.context import WebContext


def request_auditor(c: WebContext) -> Auditor:
    """The caller of this request (authenticated: ``@requires`` ran first),
    with how they came in and their address as the record's ``source``."""
    p = current_principal()
    assert p is not None
    return Auditor(c.keys, p.user, f"{p.source} from {request.remote_addr}")
