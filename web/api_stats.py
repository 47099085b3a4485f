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
    """200 while the watch cache is loaded and recently confirmed by etcd,
    else 503 ``degraded`` (the console keeps serving its last view)."""
    c = ctx()
    staleness = c.cache.staleness()
    ok = c.cache.loaded and staleness < STALE_AFTER
    body = {"status": "ok" if ok else "degraded", "cache_loaded": c.cache.loaded,
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
