"""Administration: the audit log, users and API tokens, task templates,
IDCs with their regional nodes, and the image catalog.

Audit records are read from etcd (they are not in the watch cache, which
would grow with them), a bounded number of keys per request.  Their key
starts with a sortable UTC time stamp, so a time range is a key range.
Each is written in the transaction of its change, so its ``revision`` (the
key's mod_revision) is the change's.
"""

from __future__ import annotations

import calendar
import json
import re
import time
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, jsonify, request

from lpmos.audit import audit_stamp
from lpmos.auth import Role, TokenRecord, User
from lpmos.cloudconfig import (
    SchemaCheckUnavailable,
    check_cloud_config,
    parse_install_params,
    redact_params,
)
from lpmos.models import PARAMS_MAX_BYTES, ValidationError, now, validate_text
from lpmos.store import Compare, Conflict, Delete, KeyValue, Op, Put, Store
from web.audit import request_auditor
from web.auth import Principal, current_principal, requires
from web.context import ctx
from web.http import ApiError, decode_cursor, encode_cursor, parse_json_body, parse_limit

bp = Blueprint("api_admin", __name__, url_prefix="/api/v1")

AUDIT_SCAN_MAX = 20000          # keys read per audit request at most
AUDIT_PAGE = 500
TEMPLATE_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def _principal() -> Principal:
    p = current_principal()
    assert p is not None
    return p


def _object_body() -> dict[str, Any]:
    raw = request.get_data(cache=True)
    body = parse_json_body(raw) if raw.strip() else {}
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


# -- audit ------------------------------------------------------------------------


def scan_keys(store: Store, prefix: str, start: str, end: str,
              budget: list[int]) -> Iterator[KeyValue]:
    """Keys in ``[start, end)`` under ``prefix``, ascending, reading pages of
    :data:`AUDIT_PAGE` until ``budget[0]`` keys have been read."""
    revision = 0
    while budget[0] > 0:
        page = store.range(prefix, start=start, limit=min(AUDIT_PAGE, budget[0]),
                           revision=revision)
        revision = page.revision
        for kv in page.items:
            if kv.key >= end:
                return
            budget[0] -= 1
            yield kv
        if not page.more or not page.items:
            return
        start = page.items[-1].key + "\x00"


def _audit_match(record: dict[str, Any], actor: str, action: str, target: str) -> bool:
    if actor and record.get("actor") != actor:
        return False
    if action and not str(record.get("action", "")).startswith(action):
        return False
    return not (target and target.lower() not in str(record.get("target", "")).lower())


def _decode(kv: KeyValue) -> dict[str, Any] | None:
    try:
        record = json.loads(kv.value)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    record["id"] = kv.key.rsplit("/", 1)[1]
    record["revision"] = kv.mod_revision      # the change's: one transaction
    return record


def read_audit(store: Store, prefix: str, *, since: float, until: float, actor: str = "",
               action: str = "", target: str = "", limit: int = 100, order: str = "desc",
               cursor: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """One page of audit records between ``since`` and ``until`` (unix
    times) matching the filters; ``(records, next_cursor)``.

    ``desc`` (newest first) reads growing time windows backwards from
    ``until`` (1 minute, then x4) so the newest records cost the fewest
    reads; ``asc`` reads forwards from ``since``.  At most
    :data:`AUDIT_SCAN_MAX` keys are read per call; when that bound stops the
    scan, ``next_cursor`` continues it."""
    lo_key = prefix + audit_stamp(since)
    hi_key = prefix + audit_stamp(until)
    budget = [AUDIT_SCAN_MAX]
    found: list[dict[str, Any]] = []
    if order == "asc":
        start = cursor or lo_key
        last = start
        for kv in scan_keys(store, prefix, start, hi_key, budget):
            last = kv.key + "\x00"
            record = _decode(kv)
            if record is None or not _audit_match(record, actor, action, target):
                continue
            found.append(record)
            if len(found) == limit:
                return found, kv.key + "\x00"
        return found, (last if budget[0] <= 0 else None)
    upper = cursor or hi_key
    window = 60.0
    upper_time = stamp_time(cursor[len(prefix):]) if cursor else until
    while True:
        lower_time = max(since, upper_time - window)
        lower = prefix + audit_stamp(lower_time) if lower_time > since else lo_key
        matches = []
        for kv in scan_keys(store, prefix, lower, upper, budget):
            record = _decode(kv)
            if record is not None and _audit_match(record, actor, action, target):
                matches.append((kv.key, record))
        matches.reverse()
        for key, record in matches:
            found.append(record)
            if len(found) == limit:
                return found, key
        if budget[0] <= 0:
            return found, lower if lower > lo_key else None
        if lower <= lo_key:
            return found, None
        upper, upper_time = lower, lower_time
        window *= 4


def stamp_time(stamp: str) -> float:
    """The unix time of an audit key stamp (``20260101T000000.000000Z-...``)."""
    try:
        head, _, frac = stamp[:23].partition(".")
        return calendar.timegm(time.strptime(head, "%Y%m%dT%H%M%S")) + int(frac[:6]) / 1e6
    except ValueError:
        return 0.0


def _float_arg(name: str, default: float) -> float:
    raw = request.args.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ApiError(400, "bad_request", f"{name}: a unix time in seconds") from None


@bp.get("/audit")
@requires(Role.VIEWER)
def list_audit() -> Any:
    """Audit records, newest first (``order=asc`` for oldest first).
    Filters: ``actor`` (exact), ``action`` (prefix, e.g. ``task.``),
    ``target`` (text), ``since``/``until`` (unix time, default the last 30
    days); ``limit`` (1-500) and ``cursor``."""
    c = ctx()
    t = now()
    since = _float_arg("since", t - 30 * 86400)
    until = _float_arg("until", t + 1)
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise ApiError(400, "bad_request", "order: asc or desc")
    cursor = None
    if request.args.get("cursor"):
        cursor = str(decode_cursor(request.args["cursor"], 1)[0])
        if not cursor.startswith(c.keys.audit_prefix()):
            raise ApiError(400, "bad_request", "cursor is malformed")
    records, next_key = read_audit(
        c.store, c.keys.audit_prefix(), since=since, until=until,
        actor=request.args.get("actor", ""), action=request.args.get("action", ""),
        target=request.args.get("target", ""), limit=parse_limit(request.args.get("limit"), 100),
        order=order, cursor=cursor)
    return jsonify({"items": records,
                    "next_cursor": encode_cursor([next_key]) if next_key else None})


# -- users and tokens ---------------------------------------------------------------


@bp.get("/users")
@requires(Role.ADMIN)
def list_users() -> Any:
    return jsonify({"items": [u.public() for u in ctx().auth.users()]})


@bp.put("/users/<name>")
@requires(Role.ADMIN)
def put_user(name: str) -> Any:
    """Create or update a user: ``{"role", "password"?}`` (password at least 8
    characters)."""
    c = ctx()
    body = _object_body()
    role = body.get("role")
    password = body.get("password")
    if not isinstance(role, str):
        raise ApiError(400, "invalid", "role: one of viewer, operator, approver, admin")
    if password is not None and (not isinstance(password, str) or not 8 <= len(password) <= 256):
        raise ApiError(400, "invalid", "password: 8 to 256 characters")
    auditor = request_auditor(c)

    def audit(before: User | None, after: User) -> Op:
        return auditor.op("user.put", name, before=before.public() if before else None,
                          after=dict(after.public(), password_changed=password is not None))

    user = c.auth.put_user(name, role, password, audit=audit)
    return jsonify({"user": user.public()})


@bp.get("/tokens")
@requires(Role.ADMIN)
def list_tokens() -> Any:
    return jsonify({"items": [{"id": t.id, "user": t.user, "created_at": t.created_at,
                               "label": t.label} for t in ctx().auth.tokens()]})


@bp.post("/tokens")
@requires(Role.ADMIN)
def create_token() -> Any:
    """A new API token for ``{"user", "label"?}``; shown once in the answer."""
    c = ctx()
    body = _object_body()
    user = body.get("user")
    label = validate_text(body.get("label", ""), "label", 100)
    if not isinstance(user, str):
        raise ApiError(400, "invalid", "user: the user name")
    auditor = request_auditor(c)

    def audit(created: TokenRecord) -> Op:
        return auditor.op("token.create", created.id,
                          after={"user": created.user, "label": created.label})

    token, record = c.auth.create_token(user, label=label, audit=audit)
    resp = jsonify({"token": token, "id": record.id, "user": user})
    resp.status_code = 201
    return resp


@bp.delete("/tokens/<token_id>")
@requires(Role.ADMIN)
def revoke_token(token_id: str) -> Any:
    c = ctx()
    auditor = request_auditor(c)

    def audit(revoked: list[TokenRecord]) -> Op:
        return auditor.op("token.revoke", token_id, after=None, before=[
            {"id": r.id, "user": r.user, "label": r.label} for r in revoked])

    count = c.auth.revoke_token(token_id, audit=audit)
    if count == 0:
        raise ApiError(404, "not_found", f"no token with id {token_id}")
    return jsonify({"revoked": count})


# -- templates --------------------------------------------------------------------


def parse_template(name: str, body: dict[str, Any]) -> dict[str, Any]:
    """A task template (preset): OS, image, parameters, description."""
    if not TEMPLATE_NAME_RE.fullmatch(name):
        raise ValidationError("name", "1-64 of a-z, 0-9, '.', '_', '-'")
    out: dict[str, Any] = {
        "os_type": validate_text(body.get("os_type", ""), "os_type", 64, allow_empty=False),
        "os_version": validate_text(body.get("os_version", ""), "os_version", 32),
        "image": validate_text(body.get("image", ""), "image", 64),
        "description": validate_text(body.get("description", ""), "description", 500),
    }
    params = body.get("params", {})
    if not isinstance(params, dict):
        raise ValidationError("params", "a JSON object")
    if len(json.dumps(params)) > PARAMS_MAX_BYTES:
        raise ValidationError("params", f"at most {PARAMS_MAX_BYTES} bytes of JSON")
    out["params"] = parse_install_params(params, mac=None)
    if out["params"].get("cloud_config"):
        try:   # the operator's document alone: a task merges ours in, and checks again
            check_cloud_config(out["params"]["cloud_config"])
        except SchemaCheckUnavailable as exc:
            raise ApiError(503, "unavailable", str(exc), reason="schema_check") from None
    return out


def template_view(data: dict[str, Any]) -> dict[str, Any]:
    """A template as the API returns it: its params' secrets redacted."""
    return dict(data, params=redact_params(data.get("params")))


@bp.get("/templates")
@requires(Role.VIEWER)
def list_templates() -> Any:
    return jsonify({"items": [template_view(t) for t in ctx().index.templates()]})


@bp.put("/templates/<name>")
@requires(Role.OPERATOR)
def put_template(name: str) -> Any:
    """Create or replace a template: ``{"os_type", "os_version"?, "image"?,
    "params"?, "description"?, "revision"?}`` (with ``revision``, only if
    unchanged since; 0 means it must not exist yet)."""
    c = ctx()
    body = _object_body()
    data = parse_template(name, body)
    if c.catalog is not None:
        c.catalog.resolve(data["os_type"], data["os_version"], data["image"])
    key = c.keys.template(name)
    current = c.store.get(key)
    expect = body.get("revision")
    if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
        raise ApiError(400, "invalid", "revision: an integer")
    seen = current.mod_revision if current else 0
    if expect is not None and expect != seen:
        raise Conflict(key, seen)
    data["updated_by"] = _principal().user
    data["updated_at"] = now()
    before = template_view(json.loads(current.value)) if current else None
    revision = c.store.commit([Compare(key, seen)], [
        Put(key, json.dumps(data, sort_keys=True).encode()),
        request_auditor(c).op("template.put", name, before=before, after=template_view(data))])
    c.cache.wait_for_revision(revision, 2.0)
    return jsonify({"template": dict(template_view(data), name=name), "revision": revision})


@bp.delete("/templates/<name>")
@requires(Role.OPERATOR)
def delete_template(name: str) -> Any:
    c = ctx()
    key = c.keys.template(name)
    current = c.store.get(key) if TEMPLATE_NAME_RE.fullmatch(name) else None
    if current is None:
        raise ApiError(404, "not_found", f"no template named {name}")
    revision = c.store.commit([Compare(key, current.mod_revision)], [
        Delete(key),
        request_auditor(c).op("template.delete", name,
                              before=template_view(json.loads(current.value)))])
    c.cache.wait_for_revision(revision, 2.0)
    return jsonify({"deleted": name})


# -- IDCs, nodes, catalog ----------------------------------------------------------


@bp.get("/idcs")
@requires(Role.VIEWER)
def list_idcs() -> Any:
    """IDCs seen in tasks, servers and node registrations, with their
    regional nodes (a node key lives under an etcd lease: present = alive)."""
    return jsonify({"items": ctx().index.idcs()})


@bp.get("/idcs/<idc>/nodes")
@requires(Role.VIEWER)
def list_nodes(idc: str) -> Any:
    for item in ctx().index.idcs():
        if item["name"] == idc:
            return jsonify({"items": item["nodes"]})
    raise ApiError(404, "not_found", f"no IDC named {idc}")


@bp.get("/catalog")
@requires(Role.VIEWER)
def catalog() -> Any:
    """The installable images (empty when no catalog is configured: any OS
    name is then accepted).  Entries no task may install (the live agent
    image) are left out; the console's OS list is this list."""
    cat = ctx().catalog
    items = [] if cat is None else [
        {"name": i.name, "os_type": i.os_type, "os_family": i.os_family, "version": i.version,
         "arch": i.arch, "mode": i.mode, "description": i.description, "managed": i.managed}
        for i in cat.installable()]
    return jsonify({"items": items, "configured": cat is not None})
