"""``/api/v1/openapi.json``: the API described, and kept true to the routes.

Paths, methods and required roles come from the application's URL map and
the :func:`web.auth.requires` marks, so they cannot drift; what the URL map
does not know (summaries, parameters, bodies) is written in :data:`DOCS`,
one entry per ``"METHOD /path"``.  ``tests/integration/test_web_api.py``
fails when a route has no entry or an entry names no route.
"""

from __future__ import annotations

import re
from typing import Any

from flask import Blueprint, Flask, current_app, jsonify

bp = Blueprint("openapi", __name__)

_S = {"type": "string"}
_I = {"type": "integer"}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _q(name: str, desc: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": desc,
            "schema": schema or _S}


PAGE = [_q("limit", "page size, 1-500", _I), _q("cursor", "next_cursor of the previous page")]
_REVISION = {"type": "integer", "description": "apply only if the task is still at this "
                                              "revision (else 409)"}
NOTES_BODY = {"type": "object", "properties": {"notes": _S, "reason": _S, "revision": _REVISION}}
_POWER = {"type": "boolean", "description": "default true: with a BMC record, queue PXE as the "
                                            "next boot and a power cycle in the same "
                                            "transaction; false: power the machine yourself"}
APPROVE_BODY = {"type": "object", "properties": {"notes": _S, "reason": _S, "revision": _REVISION,
                                                 "power": _POWER}}

REDEPLOY_BODY = {"type": "object", "properties": {
    "notes": _S, "reason": _S, "revision": _REVISION, "power": _POWER,
    "params": {"type": "object", "description": "merged into the task's params and checked "
                                                "as at creation; null removes a key"}}}

SCHEDULE_BODY = {"type": "object", "properties": {
    "not_before": {"type": ["string", "null"], "description": "ISO 8601 with a zone, e.g. "
                   "2026-12-04T22:00:00Z; null or left out: none"},
    "window": {"type": ["string", "null"], "description": "daily UTC window HH:MM-HH:MM, "
               "e.g. 22:00-04:00 (crosses midnight); null or left out: none"},
    "notes": _S, "revision": _REVISION}}

#: "METHOD /openapi/path" → summary, query parameters, request body schema, response schema
DOCS: dict[str, dict[str, Any]] = {
    "GET /api/v1/tasks": {
        "summary": "List tasks, newest first (served from the watch cache)",
        "params": [_q("idc", "IDC name"), _q("status", "comma list of states"),
                   _q("q", "text in SN, MAC, OS, users, notes"), *PAGE],
        "response": "TaskPage"},
    "POST /api/v1/tasks": {"summary": "Create a pending install task",
                           "body": _ref("TaskCreate"), "response": "TaskResult", "status": 201},
    "POST /api/v1/tasks/batch": {
        "summary": "Create many tasks, all or nothing (JSON list or CSV)",
        "body": {"type": "array", "items": _ref("TaskCreate")}, "response": "BatchResult",
        "status": 201, "csv": True},
    "GET /api/v1/tasks/{idc}/{sn}": {"summary": "One task with history and log",
                                     "params": [_q("fresh", "1: read etcd, not the cache")],
                                     "response": "TaskResult"},
    "GET /api/v1/tasks/{idc}/{sn}/log": {
        "summary": "The full install log of one attempt, fetched from the regional node that "
                   "served it (404: no such task, attempt or log; 503/504: the node is down "
                   "or did not answer within --node-timeout)",
        "params": [_q("attempt", "attempt number, 1 to the task's attempt (default: the "
                                 "current one)", _I)],
        "response": "TaskLog"},
    "DELETE /api/v1/tasks/{idc}/{sn}": {
        "summary": "Delete a task that is not booting or installing",
        "params": [_q("revision", "delete only at this revision", _I)], "response": "Object"},
    "POST /api/v1/tasks/{idc}/{sn}/approve": {"summary": "pending → approved",
                                              "body": APPROVE_BODY, "response": "TaskResult"},
    "POST /api/v1/tasks/{idc}/{sn}/reject": {"summary": "pending → rejected",
                                             "body": NOTES_BODY, "response": "TaskResult"},
    "POST /api/v1/tasks/{idc}/{sn}/cancel": {"summary": "active → cancelled",
                                             "body": NOTES_BODY, "response": "TaskResult"},
    "POST /api/v1/tasks/{idc}/{sn}/retry": {"summary": "failed → approved",
                                            "body": APPROVE_BODY, "response": "TaskResult"},
    "POST /api/v1/tasks/{idc}/{sn}/redeploy": {
        "summary": "succeeded → approved: install again as a new attempt, with params "
                   "merged into the task's (e.g. a new hostname)",
        "body": REDEPLOY_BODY, "response": "TaskResult"},
    "PUT /api/v1/tasks/{idc}/{sn}/schedule": {
        "summary": "Replace when the task may start (approver): not before a time and/or "
                   "inside a daily UTC window; an approved task's queued power cycle moves "
                   "with it (409 once a node carries it out)",
        "body": SCHEDULE_BODY, "response": "TaskResult"},
    "POST /api/v1/tasks/{idc}/{sn}/release": {
        "summary": "succeeded | failed → releasing (approver): the live agent wipes every "
                   "disk (wipefs, sgdisk --zap-all, blkdiscard where supported), reports "
                   "released, and the machine is powered off",
        "body": APPROVE_BODY, "response": "TaskResult"},
    "GET /api/v1/servers": {"summary": "Discovered machines",
                            "params": [_q("idc", "IDC name"),
                                       _q("q", "text in SN, MAC, UUID, IP, vendor"), *PAGE],
                            "response": "Page"},
    "GET /api/v1/servers/{idc}/{sn}": {"summary": "One machine with its inventory",
                                       "response": "Object"},
    "GET /api/v1/servers/{idc}/{sn}/timeline": {"summary": "A machine's boot timeline",
                                                "response": "Object"},
    "POST /api/v1/servers/{idc}/{sn}/clear-conflict": {
        "summary": "Clear a machine's conflict flag (cloned VM) after checking it (approver)",
        "body": NOTES_BODY, "response": "Object"},
    "GET /api/v1/stats": {"summary": "Counts per state and IDC, installs per hour, median "
                                     "install time", "response": "Object"},
    "GET /api/v1/audit": {"summary": "Audit records, newest first",
                          "params": [_q("actor", "user name"),
                                     _q("action", "action prefix, e.g. task."),
                                     _q("target", "text in the target"),
                                     _q("since", "unix time", {"type": "number"}),
                                     _q("until", "unix time", {"type": "number"}),
                                     _q("order", "asc or desc"), *PAGE],
                          "response": "Page"},
    "GET /api/v1/users": {"summary": "Users and roles", "response": "Page"},
    "PUT /api/v1/users/{name}": {"summary": "Create or update a user",
                                 "body": {"type": "object", "required": ["role"],
                                          "properties": {"role": _S, "password": _S}},
                                 "response": "Object"},
    "GET /api/v1/tokens": {"summary": "API tokens (ids, users, labels)", "response": "Page"},
    "POST /api/v1/tokens": {"summary": "Create an API token (shown once)",
                            "body": {"type": "object", "required": ["user"],
                                     "properties": {"user": _S, "label": _S}},
                            "response": "Object", "status": 201},
    "DELETE /api/v1/tokens/{token_id}": {"summary": "Revoke tokens by id prefix",
                                         "response": "Object"},
    "GET /api/v1/webhooks": {"summary": "Outbound webhooks (never their secrets)",
                             "response": "Page"},
    "POST /api/v1/webhooks": {
        "summary": "Create a webhook; the answer carries its HMAC secret, once",
        "body": {"type": "object", "required": ["url", "events"], "properties": {
            "url": _S, "events": {"type": "array", "items": _S}, "secret": _S,
            "enabled": {"type": "boolean"}, "description": _S}},
        "response": "Object", "status": 201},
    "GET /api/v1/webhooks/{webhook_id}": {"summary": "One webhook", "response": "Object"},
    "PUT /api/v1/webhooks/{webhook_id}": {
        "summary": "Change a webhook's url, events, enabled, description or secret",
        "body": {"type": "object", "properties": {
            "url": _S, "events": {"type": "array", "items": _S}, "secret": _S,
            "enabled": {"type": "boolean"}, "description": _S, "revision": _I}},
        "response": "Object"},
    "DELETE /api/v1/webhooks/{webhook_id}": {"summary": "Delete a webhook",
                                             "response": "Object"},
    "GET /api/v1/webhooks/{webhook_id}/deliveries": {
        "summary": "The webhook's last delivery attempts in this process, newest first",
        "response": "Page"},
    "GET /api/v1/templates": {"summary": "Task templates", "response": "Page"},
    "PUT /api/v1/templates/{name}": {"summary": "Create or replace a task template",
                                     "body": _ref("Template"), "response": "Object"},
    "DELETE /api/v1/templates/{name}": {"summary": "Delete a task template",
                                        "response": "Object"},
    "GET /api/v1/idcs": {"summary": "IDCs and their regional nodes with liveness",
                         "response": "Page"},
    "GET /api/v1/idcs/{idc}/nodes": {"summary": "Regional nodes of one IDC", "response": "Page"},
    "GET /api/v1/catalog": {"summary": "Installable images (the seed file's and the managed "
                                       "ones that are available)", "response": "Page"},
    "GET /api/v1/images": {"summary": "Managed images, with each IDC's and node's copy",
                           "response": "Page"},
    "POST /api/v1/images": {
        "summary": "Add a managed image: from an http(s) URL with its sha256, or by upload "
                   "(then PUT each file)",
        "body": {"type": "object", "properties": {
            "name": _S, "os_type": _S, "os_family": _S, "version": _S, "format": _S,
            "source": _S, "architectures": {"type": "array", "items": _S},
            "idcs": {"type": "array", "items": _S}, "files": {"type": "object"},
            "disk_size": _I, "kernel_args": _S, "description": _S}},
        "response": "Object", "status": 201},
    "GET /api/v1/images/{name}": {"summary": "One managed image, per IDC and node",
                                  "response": "Object"},
    "DELETE /api/v1/images/{name}": {"summary": "Remove a managed image (refused while an "
                                               "active task needs it)", "response": "Object"},
    "PUT /api/v1/images/{name}/files/{role}": {
        "summary": "Upload one file of an image (application/octet-stream, Content-Length "
                   "required; streamed, checked against the announced sha256 and size)",
        "response": "Object"},
    "GET /api/v1/images/{name}/files/{role}": {
        "summary": "An uploaded file (Range, ETag); operators, or regional nodes with a "
                   "signed request", "response": "Object"},
    "GET /api/v1/servers/{idc}/{sn}/bmc": {
        "summary": "The machine's BMC record (driver, address, port, user, options; never the "
                   "password) and the inventory's BMC address", "response": "Object"},
    "PUT /api/v1/servers/{idc}/{sn}/bmc": {
        "summary": "Set the machine's BMC (admin); the password goes where only regional "
                   "nodes read it and is never returned",
        "body": {"type": "object", "required": ["driver", "user"], "properties": {
            "driver": {"type": "string", "enum": ["redfish", "ipmi"]},
            "address": {"type": "string", "description": "IP or host name; absent: the "
                                                         "inventory's BMC address"},
            "port": _I, "user": _S,
            "password": {"type": "string", "description": "absent: keep the stored one"},
            "options": {"type": "object", "description": "Redfish: scheme (https|http), "
                                                         "verify_tls, system"}}},
        "response": "Object"},
    "DELETE /api/v1/servers/{idc}/{sn}/bmc": {"summary": "Forget the BMC record and its "
                                                         "password (admin)",
                                              "response": "Object"},
    "POST /api/v1/servers/{idc}/{sn}/power": {
        "summary": "Queue a power action; a regional node of the IDC carries it out (202; "
                   "409 while another request of the machine is open, or without a BMC)",
        "body": {"type": "object", "required": ["action"], "properties": {
            "action": {"type": "string",
                       "enum": ["on", "off", "reset", "cycle", "pxe-once", "status"]},
            "reason": _S,
            "deadline": {"type": "number", "description": "seconds, 5-110 (default 60), "
                                                          "retries included"}}},
        "response": "Object", "status": 202},
    "GET /api/v1/servers/{idc}/{sn}/power": {
        "summary": "The machine's power requests and their results, newest first",
        "params": [_q("limit", "at most this many (1-40)", _I)], "response": "Object"},
    "GET /api/v1/servers/{idc}/{sn}/power/{ident}": {
        "summary": "One power request: state (queued, claimed, done, failed), steps, the "
                   "reason of a failure, the power state read back",
        "params": [_q("fresh", "1: read etcd, not the cache")], "response": "Object"},
    "GET /api/v1/session": {"summary": "The caller, role and CSRF token", "response": "Object"},
    "POST /api/v1/session/tokens": {"summary": "Create an API token for the signed-in user "
                                              "(console session only; shown once)",
                                   "body": {"type": "object", "properties": {"label": _S}},
                                   "response": "Object", "status": 201},
    "GET /api/v1/openapi.json": {"summary": "This document", "response": "Object",
                                 "public": True},
}

SCHEMAS: dict[str, Any] = {
    "Error": {"type": "object", "required": ["error", "detail"],
              "properties": {"error": _S, "detail": _S, "revision": _I,
                             "errors": {"type": "array", "items": {"type": "object"}}}},
    "Object": {"type": "object"},
    "Page": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object"}},
        "next_cursor": {"type": "string", "nullable": True}}},
    "TaskCreate": {"type": "object", "required": ["idc", "sn", "mac", "os_type"], "properties": {
        "idc": _S, "sn": _S, "mac": _S, "os_type": _S, "os_version": _S, "image": _S,
        "template": _S, "notes": _S, "params": {"type": "object"}}},
    "TaskResult": {"type": "object", "properties": {"task": {"type": "object"},
                                                    "revision": _I}},
    "TaskPage": {"type": "object", "properties": {
        "items": {"type": "array", "items": {"type": "object"}},
        "next_cursor": {"type": "string", "nullable": True},
        "total": {"type": "integer", "nullable": True}, "revision": _I}},
    "TaskLog": {"type": "object", "properties": {
        "idc": _S, "sn": _S, "attempt": _I, "attempts": _I, "node": _S,
        "first_line": {"type": "integer",
                       "description": "lines dropped before `lines` by the node's size bound"},
        "truncated": {"type": "boolean"},
        "lines": {"type": "array", "items": _S}}},
    "BatchResult": {"type": "object", "properties": {"created": _I, "revision": _I,
                                                     "tasks": {"type": "array"}}},
    "Template": {"type": "object", "required": ["os_type"], "properties": {
        "os_type": _S, "os_version": _S, "image": _S, "description": _S,
        "params": {"type": "object"}, "revision": _I}},
}


def api_routes(app: Flask) -> dict[str, Any]:
    """``"METHOD /openapi/path"`` → view function, for every /api/v1 route."""
    routes: dict[str, Any] = {}
    for rule in app.url_map.iter_rules():
        if not rule.rule.startswith("/api/v1/"):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes[f"{method} {path}"] = app.view_functions[rule.endpoint]
    return routes


def build_document(app: Flask) -> dict[str, Any]:
    paths: dict[str, Any] = {}
    for route, view in sorted(api_routes(app).items()):
        method, path = route.split(" ", 1)
        doc = DOCS.get(route, {})
        role = getattr(view, "lpmos_role", None)
        op: dict[str, Any] = {
            "operationId": view.__name__,
            "summary": doc.get("summary", ""),
            "description": (view.__doc__ or "").strip(),
            "parameters": [{"name": p, "in": "path", "required": True, "schema": _S}
                           for p in re.findall(r"{([^}]+)}", path)] + doc.get("params", []),
            "responses": {
                str(doc.get("status", 200)): {
                    "description": "OK",
                    "content": {"application/json": {"schema": _ref(doc.get("response",
                                                                            "Object"))}}},
                "4XX": {"description": "refused",
                        "content": {"application/json": {"schema": _ref("Error")}}},
            },
        }
        if role is not None:
            op["x-lpmos-role"] = role.label
            op["security"] = [{"bearer": []}, {"session": []}]
        else:
            op["security"] = []
        if "body" in doc:
            content: dict[str, Any] = {"application/json": {"schema": doc["body"]}}
            if doc.get("csv"):
                content["text/csv"] = {"schema": _S}
            op["requestBody"] = {"required": method == "POST" and route.endswith("/tasks"),
                                 "content": content}
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": "3.0.3",
        "info": {"title": "LPMOS control plane", "version": "1",
                 "description": "Install tasks, approvals, discovered servers, stats and "
                                "audit. Errors are {\"error\", \"detail\"} with a 4xx status."},
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "token from `lpmos token create`"},
                "session": {"type": "apiKey", "in": "cookie", "name": "lpmos_session",
                            "description": "console session; mutating calls also need "
                                           "the X-CSRF-Token header"}}},
    }


@bp.get("/api/v1/openapi.json")
def openapi() -> Any:
    """The OpenAPI 3 document of this API."""
    return jsonify(build_document(current_app))
