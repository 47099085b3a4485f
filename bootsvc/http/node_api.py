"""The node API of a regional node: what the control plane asks it.

| route                                  | auth                                   |
| -------------------------------------- | -------------------------------------- |
| GET /node/v1/logs/<sn>?attempt=N       | the control plane's signed request     |

It shares the boot HTTP port with the machines but not their credentials:
every request must carry a signature made with the node-API key from etcd
(:mod:`lpmos.nodeapi`); a machine token, no header, a stale or wrong
signature are all 401.  The answer is the full install log this node kept
for one attempt (:mod:`bootsvc.state.install_log`):
``{"idc", "sn", "node", "attempt", "first_line", "truncated", "lines"}``.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import HttpError, checked_sn, json_response
from lpmos.nodeapi import SharedKey, verify
from lpmos.store import StoreError

bp = Blueprint("node_api", __name__, url_prefix="/node/v1")

_ATTEMPT_MAX_DIGITS = 9


def register(app: Flask) -> None:
    """Add the node API to the boot HTTP app (after its ``lpmos_boot``)."""
    boot = app.extensions["lpmos_boot"]
    app.extensions["lpmos_node_key"] = SharedKey(boot.ctx.store, boot.ctx.keys)
    boot.metrics.describe("node_api_refused_total",
                          "node API requests refused for their signature, by reason")
    app.register_blueprint(bp)


def check_signature() -> None:
    """Return if the request is signed by the control plane; else 401 (503
    when the key cannot be read from etcd).  A signature that fails is
    checked once more against a re-read key (it may have been rotated)."""
    boot = current_boot()
    shared: SharedKey = current_app.extensions["lpmos_node_key"]
    query = request.query_string.decode("latin-1")
    target = request.path + (f"?{query}" if query else "")
    header = request.headers.get("Authorization")
    try:
        why = verify(shared.get(), request.method, target, header, time.time())
        if why == "bad_signature" and shared.refresh():
            why = verify(shared.get(), request.method, target, header, time.time())
    except (StoreError, ValueError) as exc:
        boot.metrics.inc("node_api_refused_total", reason="no_key")
        raise HttpError(503, "key_unavailable",
                        f"the node API key cannot be read from etcd ({type(exc).__name__})") \
            from None
    if why:
        boot.metrics.inc("node_api_refused_total", reason=why)
        raise HttpError(401, "unauthorized",
                        f"the node API answers the control plane's signed requests only ({why})")


@bp.get("/logs/<sn>")
def install_log(sn: str) -> Response:
    """The full install log of one attempt of ``sn`` kept by this node."""
    check_signature()
    boot = current_boot()
    sn = checked_sn(sn)
    raw = request.args.get("attempt", "")
    if not raw.isdigit() or len(raw) > _ATTEMPT_MAX_DIGITS:
        raise HttpError(400, "bad_attempt", "attempt: a non-negative integer is required")
    attempt = int(raw)
    found = boot.install_logs.read(sn, attempt)
    if found is None:
        raise HttpError(404, "no_log", f"node {boot.ctx.node_name} keeps no log of attempt "
                                       f"{attempt} of {boot.ctx.idc}/{sn}")
    return json_response({"idc": boot.ctx.idc, "sn": sn, "node": boot.ctx.node_name,
                          "attempt": attempt, "first_line": found.first_line,
                          "truncated": found.truncated, "lines": found.lines})
