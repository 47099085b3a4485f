"""The ``ops`` blueprint: ``GET /healthz`` and ``GET /metrics``, no token.

``/healthz`` is 200 ``ok`` or 503 ``degraded`` with the reasons (etcd does
not answer, the IDC cache has not loaded or is stale, progress is spooled
to disk, and what the node's other checks report), so that a load
balancer or an operator sees why; the body also says whether installs are
allowed (not while degraded).
"""

from __future__ import annotations

from flask import Blueprint, Response

from bootsvc.http.backend import current_boot
from bootsvc.http.common import json_response

ops_bp = Blueprint("ops", __name__)

@ops_bp.get("/healthz")
def healthz() -> Response:
    boot = current_boot()
    cache = boot.ctx.cache
    staleness = cache.staleness()
    reachable = boot.etcd_healthy()
    spooled = len(boot.events.spooled_tasks())
    reasons = [why for check in boot.ctx.degraded_checks for why in check()]
    if not reachable:
        reasons.append("etcd does not answer")
    if not cache.loaded:
        reasons.append("the IDC cache has not loaded from etcd yet")
    elif staleness > 10.0:
        reasons.append(f"etcd has not confirmed the IDC cache for {staleness:.0f} s")
    if spooled:
        reasons.append(f"progress of {spooled} task(s) is spooled to disk, not yet in etcd")
    degraded = bool(reasons)
    body = {"status": "degraded" if degraded else "ok", "reasons": reasons,
            "node": boot.ctx.node_name, "idc": boot.ctx.idc,
            "etcd": {"reachable": reachable},
            "cache": {"loaded": cache.loaded,
                      "staleness_seconds": None if staleness == float("inf")
                      else round(staleness, 3),
                      "revision": cache.revision},
            "catalog": {"images": len(boot.catalog.images), "live": boot.live is not None},
            "events_spooled_tasks": spooled,
            "installs": "refused while degraded" if degraded else "allowed",
            "warnings": sorted(boot.ctx.warnings.values())}
    return json_response(body, 503 if degraded else 200)


@ops_bp.get("/metrics")
def metrics() -> Response:
    return Response(current_boot().metrics.render(), mimetype="text/plain; version=0.0.4")
