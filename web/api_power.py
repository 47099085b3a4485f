"""Power control: ``/api/v1/servers/{idc}/{sn}/bmc`` and ``.../power``
(:mod:`lpmos.power`, issue #21).

| method and path                      | role     | what                                    |
| ------------------------------------ | -------- | --------------------------------------- |
| GET    /servers/{idc}/{sn}/bmc       | viewer   | the BMC record (never the password)     |
| PUT    /servers/{idc}/{sn}/bmc       | admin    | set it: driver, address, user, password |
| DELETE /servers/{idc}/{sn}/bmc       | admin    | forget it and its password              |
| POST   /servers/{idc}/{sn}/power     | operator | queue on, off, reset, cycle, pxe-once,  |
|                                      |          | status                                  |
| GET    /servers/{idc}/{sn}/power     | viewer   | the machine's requests, newest first    |
| GET    /servers/{idc}/{sn}/power/{id}| viewer   | one request and its result              |

The control plane never talks to a BMC: it queues a request in etcd and a
regional node of the IDC carries it out (:mod:`bootsvc.power.worker`).  The
password is written to ``keys.bmc_secret`` (outside the prefix the control
plane watches) and never read back, returned, logged or audited.  Every
change is audited in its own transaction.  Power actions are the
operator's, as cancelling a task is; approving an install (which also
queues the power cycle that starts it) stays the approver's.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, jsonify, request

from lpmos.audit import Auditor
from lpmos.auth import Role
from lpmos.models import Task, ValidationError, validate_name, validate_sn, validate_text
from lpmos.power import (
    API_ACTIONS,
    QUEUE_TTL,
    BmcRecord,
    BmcSecret,
    PowerRequest,
    decide_claim,
    new_request,
    parse_bmc_put,
    valid_request_id,
)
from lpmos.schedule import describe
from lpmos.store import Compare, Conflict, Delete, Op, Put
from web.audit import request_auditor
from web.auth import current_principal, requires
from web.context import WebContext, ctx
from web.http import ApiError, parse_json_body, parse_limit

bp = Blueprint("api_power", __name__, url_prefix="/api/v1")

#: finished requests kept per machine; older ones are deleted when a new one
#: is queued (the audit log keeps every one)
KEEP_PER_MACHINE = 20


def _ids(idc: str, sn: str) -> tuple[str, str]:
    try:
        return validate_name(idc, "idc"), validate_sn(sn, "sn")
    except ValidationError as exc:
        raise ApiError(404, "not_found", f"no server {idc}/{sn}: {exc}") from None


def _user() -> str:
    p = current_principal()
    assert p is not None
    return p.user


def inventory_bmc_address(c: WebContext, idc: str, sn: str) -> str | None:
    """The BMC address the machine's agent found (``inventory.bmc.address``)."""
    found = c.index.server(idc, sn)
    if found is None:
        return None
    bmc = found[0].inventory.get("bmc")
    address = bmc.get("address") if isinstance(bmc, dict) else None
    return address if isinstance(address, str) and address else None


def bmc_record(c: WebContext, idc: str, sn: str) -> tuple[BmcRecord, int] | None:
    """The BMC record from the watch cache (a malformed one counts as none)."""
    kv = c.cache.get(c.keys.bmc(idc, sn))
    if kv is None:
        return None
    try:
        return BmcRecord.from_json(kv.value), kv.mod_revision
    except ValidationError:
        return None


def requests_of(c: WebContext, idc: str, sn: str) -> list[tuple[PowerRequest, int]]:
    """The machine's power requests in the cache, newest first."""
    out = []
    for kv in c.cache.items(c.keys.power_requests(idc, sn)):
        try:
            out.append((PowerRequest.from_json(kv.value), kv.mod_revision))
        except ValidationError:
            continue
    out.sort(key=lambda rr: rr[0].id, reverse=True)
    return out


def request_view(req: PowerRequest, revision: int) -> dict[str, Any]:
    data = req.__dict__.copy()
    data["steps"] = [s.__dict__.copy() for s in req.steps]
    data["revision"] = revision
    data["describe"] = req.describe()
    return data


def queue_ops(c: WebContext, req: PowerRequest, auditor: Auditor) -> list[Op]:
    """The new request, its audit record, and the deletion of the oldest
    finished requests past :data:`KEEP_PER_MACHINE`."""
    ops: list[Op] = [Put(c.keys.power_request(req.idc, req.sn, req.id), req.to_json()),
                     auditor.op("power.request", f"{req.idc}/{req.sn}",
                                detail=req.reason[:500],
                                after={"id": req.id, "action": req.action,
                                       "steps": [s.name for s in req.steps],
                                       "task_attempt": req.task_attempt})]
    finished = [r for r, _ in requests_of(c, req.idc, req.sn) if r.final]
    for old in finished[KEEP_PER_MACHINE - 1:]:
        ops.append(Delete(c.keys.power_request(req.idc, req.sn, old.id)))
    return ops


def approval_request(c: WebContext, task: Task, *, by: str, action: str) -> PowerRequest | None:
    """The power request an approval (approve, retry, redeploy) of ``task``
    queues when the machine has a BMC record: ``provision`` (PXE as the
    next boot, then a power cycle) for the task's attempt, with a line in
    the task's log.  No BMC record: ``None`` (someone powers the machine).
    Called on the task being written; :func:`queue_ops` are its operations
    for the same transaction."""
    if bmc_record(c, task.idc, task.sn) is None:
        return None
    scheduled = task.status == "approved" and bool(task.not_before or task.window)
    req = new_request(task.idc, task.sn, "provision", by=by, now=time.time(),
                      reason=f"{action} of attempt {task.attempt}", task_attempt=task.attempt,
                      not_before=task.not_before if scheduled else 0.0,
                      window=task.window if scheduled else "")
    when = f" when its schedule lets it start ({describe(task.not_before, task.window)})" \
        if scheduled else ""
    task.add_log(f"power: queued PXE as the next boot and a power cycle ({req.id}); a "
                 f"regional node of {task.idc} carries it out{when}")
    return req


# -- the BMC record ----------------------------------------------------------------


@bp.get("/servers/<idc>/<sn>/bmc")
@requires(Role.VIEWER)
def get_bmc(idc: str, sn: str) -> Any:
    """The record (no password: ``has_password`` says whether one is
    stored), and the inventory's BMC address a PUT without one would use."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    found = bmc_record(c, idc, sn)
    return jsonify({"bmc": found[0].public() if found else None,
                    "revision": found[1] if found else 0,
                    "inventory_address": inventory_bmc_address(c, idc, sn)})


@bp.put("/servers/<idc>/<sn>/bmc")
@requires(Role.ADMIN)
def put_bmc(idc: str, sn: str) -> Any:
    """``{"driver": "redfish"|"ipmi", "address"?, "port"?, "user", "password"?,
    "options"?}``: ``address`` defaults to the inventory's BMC address,
    ``password`` to the one stored (a first PUT needs one)."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    body = parse_json_body(request.get_data(cache=True))
    key = c.keys.bmc(idc, sn)
    current = c.store.get(key)
    existing = None
    if current is not None:
        try:
            existing = BmcRecord.from_json(current.value)
        except ValidationError:
            existing = None
    now = time.time()
    try:
        record, password = parse_bmc_put(body, idc=idc, sn=sn,
                                         inventory_address=inventory_bmc_address(c, idc, sn),
                                         existing=existing, by=_user(), now=now)
    except ValidationError as exc:
        raise ApiError(400, "invalid", str(exc), field=exc.field) from None
    ops: list[Op] = [Put(key, record.to_json()),
                     request_auditor(c).op("bmc.set", f"{idc}/{sn}",
                                           before=existing.public() if existing else None,
                                           after=record.public(),
                                           detail="password changed" if password is not None
                                           else "password kept")]
    if password is not None:
        ops.append(Put(c.keys.bmc_secret(idc, sn), BmcSecret(password, now).to_json()))
    try:
        revision = c.store.commit([Compare(key, current.mod_revision if current else 0)], ops)
    except Conflict:
        raise ApiError(409, "conflict", f"the BMC record of {idc}/{sn} changed meanwhile; "
                                        "read it again") from None
    c.cache.wait_for_revision(revision, 2.0)
    return jsonify({"bmc": record.public(), "revision": revision})


@bp.delete("/servers/<idc>/<sn>/bmc")
@requires(Role.ADMIN)
def delete_bmc(idc: str, sn: str) -> Any:
    c = ctx()
    idc, sn = _ids(idc, sn)
    key = c.keys.bmc(idc, sn)
    current = c.store.get(key)
    if current is None:
        raise ApiError(404, "not_found", f"{idc}/{sn} has no BMC record")
    try:
        before = BmcRecord.from_json(current.value).public()
    except ValidationError:
        before = None
    try:
        revision = c.store.commit([Compare(key, current.mod_revision)], [
            Delete(key), Delete(c.keys.bmc_secret(idc, sn)),
            request_auditor(c).op("bmc.delete", f"{idc}/{sn}", before=before)])
    except Conflict:
        raise ApiError(409, "conflict", f"the BMC record of {idc}/{sn} changed meanwhile") \
            from None
    c.cache.wait_for_revision(revision, 2.0)
    return jsonify({"deleted": f"{idc}/{sn}", "revision": revision})


# -- power requests ------------------------------------------------------------------


@bp.post("/servers/<idc>/<sn>/power")
@requires(Role.OPERATOR)
def post_power(idc: str, sn: str) -> Any:
    """``{"action": "on"|"off"|"reset"|"cycle"|"pxe-once"|"status", "reason"?,
    "deadline"?}``: 202 with the queued request; its ``state`` turns
    ``done`` or ``failed`` once a node of the IDC carried it out (poll
    ``GET .../power/{id}``).  409 while another request of the machine is
    still open, so a double click never power-cycles twice."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    body = parse_json_body(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise ApiError(400, "invalid", "the body must be a JSON object")
    unknown = sorted(set(body) - {"action", "reason", "deadline"})
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown field (action, reason, "
                                       "deadline)", field=unknown[0])
    action = body.get("action")
    if action not in API_ACTIONS:
        raise ApiError(400, "invalid", f"action: one of {', '.join(API_ACTIONS)}",
                       field="action")
    try:
        reason = validate_text(body.get("reason", ""), "reason", 300)
        req = new_request(idc, sn, action, by=_user(), now=time.time(),
                          reason=reason or f"api {action}",
                          **({"deadline": body["deadline"]} if "deadline" in body else {}))
    except ValidationError as exc:
        raise ApiError(400, "invalid", str(exc), field=exc.field) from None
    if bmc_record(c, idc, sn) is None:
        raise ApiError(409, "no_bmc", f"{idc}/{sn} has no BMC record: set one first "
                                      f"(PUT /api/v1/servers/{idc}/{sn}/bmc, lpmos server "
                                      "bmc-set)")
    now = time.time()
    for other, _rev in requests_of(c, idc, sn):
        # a request waiting for its schedule blocks nothing until it is due
        if not other.final and (other.state == "claimed" or (
                now - other.created_at < QUEUE_TTL
                and decide_claim(other, now).what != "wait")):
            raise ApiError(409, "busy", f"{idc}/{sn} has a power request still open: "
                                        f"{other.id} ({other.describe()})", id=other.id)
    key = c.keys.power_request(idc, sn, req.id)
    revision = c.store.commit([Compare(key, 0)], queue_ops(c, req, request_auditor(c)))
    c.cache.wait_for_revision(revision, 2.0)
    resp = jsonify({"request": request_view(req, revision)})
    resp.status_code = 202
    resp.headers["Location"] = f"/api/v1/servers/{idc}/{sn}/power/{req.id}"
    return resp


@bp.get("/servers/<idc>/<sn>/power")
@requires(Role.VIEWER)
def list_power(idc: str, sn: str) -> Any:
    """The machine's power requests, newest first (``limit``, default 50)."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    limit = parse_limit(request.args.get("limit"), default=KEEP_PER_MACHINE * 2,
                        maximum=KEEP_PER_MACHINE * 2)
    return jsonify({"items": [request_view(r, rev) for r, rev in requests_of(c, idc, sn)[:limit]],
                    "revision": c.cache.revision})


@bp.get("/servers/<idc>/<sn>/power/<ident>")
@requires(Role.VIEWER)
def get_power(idc: str, sn: str, ident: str) -> Any:
    """One request (``?fresh=1``: read from etcd, not the cache)."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    if not valid_request_id(ident):
        raise ApiError(404, "not_found", f"no power request {ident!r}")
    key = c.keys.power_request(idc, sn, ident)
    kv = c.store.get(key) if request.args.get("fresh") in ("1", "true") else c.cache.get(key)
    if kv is None:
        raise ApiError(404, "not_found", f"no power request {ident} for {idc}/{sn}")
    return jsonify({"request": request_view(PowerRequest.from_json(kv.value), kv.mod_revision)})
