"""Stats, health and metrics of the control plane."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, jsonify

from lpmos.auth import Role
from web.auth import requires
from web.context import ctx

bp = Blueprint("api_stats", __name__)

STALE_AFTER = 10.0


@bp.get("/api/v1/stats")
@requires(Role.VIEWER)
def stats() -> Any:
    """Counts per state and per IDC, installs per hour over the last 24 h,
    median install time (approved-and-booting to succeeded), servers online."""
    c = ctx()
    return jsonify(c.index.stats())


@bp.get("/healthz")
def healthz() -> Any:
    """200 while the watch cache is loaded and recently confirmed by etcd
    and etcd has no alarm raised, else 503 ``degraded`` with the
    ``reasons`` (the console keeps serving its last view; with a NOSPACE
    alarm reads work and every write is refused)."""
    c = ctx()
    staleness = c.cache.staleness()
    reasons = []
    if not c.cache.loaded:
        reasons.append("the watch cache has not loaded from etcd yet")
    elif staleness >= STALE_AFTER:
        reasons.append(f"etcd has not confirmed the watch cache for {staleness:.0f} s")
    if c.maintenance is not None:
        reasons.extend(c.maintenance.reasons())
    ok = not reasons
    body = {"status": "ok" if ok else "degraded", "reasons": reasons,
            "cache_loaded": c.cache.loaded,
            "cache_staleness": staleness if staleness != float("inf") else None,
            "revision": c.cache.revision, "tasks": c.index.task_count(),
            "ws_clients": c.hub.client_count(), "last_error": c.cache.last_error}
    resp = jsonify(body)
    resp.status_code = 200 if ok else 503
    return resp


@bp.get("/metrics")
def metrics() -> Response:
    """Prometheus text: refusals by reason, WebSocket clients and drops,
    cache staleness."""
    return Response(ctx().metrics.render(), mimetype="text/plain; version=0.0.4")
