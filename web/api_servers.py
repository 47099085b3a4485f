"""``/api/v1/servers``: discovered machines, their inventory and boot timeline.

Served from the process's watch cache.  The regional node writes server
records (``/os/{idc}/servers/{sn}``, inventory schema v1, see
``docs/agent-api.md``) and a machine's boot timeline
(``/os/{idc}/machines/{sn}/timeline``, JSON); this blueprint reads them,
and lets an approver clear a conflict flag.
Whatever a machine reported is returned as data; the console shows it with
``textContent``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, jsonify, request

from lpmos.auth import Role
from lpmos.models import Server, ValidationError, validate_name, validate_sn, validate_text
from lpmos.store import KeyValue, Op, Unchanged, atomic_update
from web.audit import request_auditor
from web.auth import requires
from web.context import ctx
from web.http import ApiError, decode_cursor, encode_cursor, parse_json_body, parse_limit
from web.index import task_summary

bp = Blueprint("api_servers", __name__, url_prefix="/api/v1")

TIMELINE_MAX = 500


def _ids(idc: str, sn: str) -> tuple[str, str]:
    try:
        return validate_name(idc, "idc"), validate_sn(sn, "sn")
    except ValidationError as exc:
        raise ApiError(404, "not_found", f"no server {idc}/{sn}: {exc}") from None


@bp.get("/servers")
@requires(Role.VIEWER)
def list_servers() -> Any:
    """Discovered machines in (IDC, SN) order; filters ``idc`` and ``q`` (SN,
    MAC, UUID, IP, vendor, product); ``limit`` and ``cursor`` as for tasks."""
    c = ctx()
    if not c.cache.wait_loaded(5.0):
        raise ApiError(503, "unavailable", "the cache is still loading from etcd")
    q = request.args.get("q", "")
    if len(q) > 200:
        raise ApiError(400, "bad_request", "q: at most 200 characters")
    after = None
    if request.args.get("cursor"):
        parts = decode_cursor(request.args["cursor"], 2)
        after = (str(parts[0]), str(parts[1]))
    items, last = c.index.query_servers(idc=request.args.get("idc", ""), q=q, after=after,
                                        limit=parse_limit(request.args.get("limit")))
    return jsonify({"items": items, "next_cursor": encode_cursor(list(last)) if last else None,
                    "revision": c.cache.revision})


@bp.get("/servers/<idc>/<sn>")
@requires(Role.VIEWER)
def get_server(idc: str, sn: str) -> Any:
    """One machine: its record with the full inventory, liveness and task."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    found = c.index.server(idc, sn)
    if found is None:
        raise ApiError(404, "not_found", f"no server {idc}/{sn}")
    server, revision, online = found
    entry = c.index.task(idc, sn)
    return jsonify({"server": server.to_dict(), "revision": revision, "online": online,
                    "task": task_summary(entry.task, entry.revision) if entry else None})


def parse_timeline(raw: bytes) -> list[dict[str, Any]]:
    """Timeline entries from the stored JSON, oldest first, at most
    :data:`TIMELINE_MAX`.  Accepts a list of entries or an object holding
    one under ``entries``/``events``; each entry keeps ``at``, ``stage``
    and the other fields as given (shown as text)."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return []
    if isinstance(data, dict):
        data = data.get("entries", data.get("events", []))
    if not isinstance(data, list):
        return []
    entries = [e for e in data if isinstance(e, dict)]
    entries.sort(key=_entry_time)
    return entries[-TIMELINE_MAX:]


def _entry_time(entry: dict[str, Any]) -> float:
    at = entry.get("at")
    return float(at) if isinstance(at, int | float) and not isinstance(at, bool) else 0.0


@bp.get("/servers/<idc>/<sn>/timeline")
@requires(Role.VIEWER)
def get_timeline(idc: str, sn: str) -> Any:
    """The machine's boot timeline as recorded by its regional node
    (DHCP offer, TFTP, boot script, agent registration ...), plus the task's
    state transitions, oldest first."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    kv = c.cache.get(c.keys.timeline(idc, sn))
    entries = parse_timeline(kv.value) if kv is not None else []
    entry = c.index.task(idc, sn)
    transitions = [{"at": h.at, "from": h.from_status, "to": h.to_status, "by": h.by,
                    "reason": h.reason} for h in entry.task.history] if entry else []
    if kv is None and entry is None and c.index.server(idc, sn) is None:
        raise ApiError(404, "not_found", f"nothing known about {idc}/{sn}")
    return jsonify({"idc": idc, "sn": sn, "entries": entries, "transitions": transitions,
                    "revision": kv.mod_revision if kv else 0})


@bp.post("/servers/<idc>/<sn>/clear-conflict")
@requires(Role.APPROVER)
def clear_conflict(idc: str, sn: str) -> Any:
    """Clear a machine's conflict flag (a cloned VM, a MAC seen with another
    UUID) once an approver has checked it; installs are refused while it is
    set.  Body ``{"notes": "..."}`` (required: say what was checked).  One
    CAS on the server record, with the audit record (the flag before and
    after) in the same transaction."""
    c = ctx()
    idc, sn = _ids(idc, sn)
    body = parse_json_body(request.get_data(cache=True) or b"{}")
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    try:
        notes = validate_text(body.get("notes", ""), "notes", 1000, single_line=False,
                              allow_empty=False)
    except ValidationError as exc:
        raise ApiError(400, "bad_request", f"{exc} (say what was checked)") from None
    before: list[str] = []
    auditor = request_auditor(c)

    def clear(raw: bytes | None) -> bytes | None:
        if raw is None:
            raise ApiError(404, "not_found", f"no server {idc}/{sn}")
        server = Server.from_json(raw)
        if not server.conflict:
            raise Unchanged
        before[:] = [server.conflict]
        server.conflict = ""
        return server.to_json()

    def audit(_current: KeyValue | None, _new: bytes | None) -> list[Op]:
        return [auditor.op("server.clear_conflict", f"{idc}/{sn}", detail=notes,
                           before={"conflict": before[0]}, after={"conflict": ""})]

    _value, revision = atomic_update(c.store, c.keys.server(idc, sn), clear, extra=audit)
    if not before:
        return jsonify({"cleared": False, "revision": revision,
                        "detail": "the machine has no conflict flag"})
    c.cache.wait_for_revision(revision, 2.0)
    return jsonify({"cleared": True, "revision": revision, "was": before[0]})
