"""Outbound webhooks, managed by admins: ``/api/v1/webhooks``.

A webhook's secret is returned once, in the answer that creates it (when
the caller gave none, one is generated); no other answer and no audit
record carries it.  ``PUT`` may set a new one (the caller then knows it).
Lists are served from the dispatcher's view of the watch cache
(:class:`web.webhooks.WebhookDispatcher`), writes are conditional commits
with their audit record in the same transaction.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, current_app, jsonify, request

from lpmos.auth import Role
from lpmos.models import now
from lpmos.store import Compare, Conflict, Delete, Put
from web.audit import request_auditor
from web.auth import current_principal, requires
from web.context import ctx
from web.http import ApiError, parse_json_body
from web.webhooks import (
    ID_RE,
    MAX_WEBHOOKS,
    WebhookDispatcher,
    new_id,
    new_secret,
    parse_webhook,
    webhook_view,
)

bp = Blueprint("api_webhooks", __name__, url_prefix="/api/v1")


def dispatcher() -> WebhookDispatcher:
    found: WebhookDispatcher = current_app.extensions["lpmos_webhooks"]
    return found


def _object_body() -> dict[str, Any]:
    body = parse_json_body(request.get_data(cache=True))
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def _user() -> str:
    p = current_principal()
    assert p is not None
    return p.user


def _existing(ident: str) -> tuple[dict[str, Any], int]:
    """The stored record and its revision (read from etcd: writes compare it)."""
    kv = ctx().store.get(ctx().keys.webhook(ident)) if ID_RE.fullmatch(ident) else None
    if kv is None:
        raise ApiError(404, "not_found", f"no webhook with id {ident}")
    record: dict[str, Any] = json.loads(kv.value)
    return record, kv.mod_revision


def _settle(revision: int) -> None:
    ctx().cache.wait_for_revision(revision, 2.0)
    dispatcher().wait_for_revision(revision, 2.0)


@bp.get("/webhooks")
@requires(Role.ADMIN)
def list_webhooks() -> Any:
    return jsonify({"items": [webhook_view(i, r, rev) for i, r, rev in dispatcher().webhooks()]})


@bp.post("/webhooks")
@requires(Role.ADMIN)
def create_webhook() -> Any:
    """A new webhook: ``{"url", "events", "secret"?, "enabled"?, "description"?}``;
    the answer carries the secret, once."""
    c = ctx()
    record = parse_webhook(_object_body())
    if len(dispatcher().webhooks()) >= MAX_WEBHOOKS:
        raise ApiError(409, "too_many", f"at most {MAX_WEBHOOKS} webhooks")
    record.setdefault("secret", new_secret())
    record.update(created_by=_user(), created_at=now())
    record.update(updated_by=record["created_by"], updated_at=record["created_at"])
    ident = new_id()
    key = c.keys.webhook(ident)
    revision = c.store.commit([Compare(key, 0)], [
        Put(key, json.dumps(record, sort_keys=True).encode()),
        request_auditor(c).op("webhook.create", ident, after=webhook_view(ident, record))])
    _settle(revision)
    resp = jsonify({"webhook": webhook_view(ident, record, revision),
                    "secret": record["secret"], "revision": revision})
    resp.status_code = 201
    return resp


@bp.get("/webhooks/<webhook_id>")
@requires(Role.ADMIN)
def get_webhook(webhook_id: str) -> Any:
    found = dispatcher().webhook(webhook_id) if ID_RE.fullmatch(webhook_id) else None
    if found is None:
        raise ApiError(404, "not_found", f"no webhook with id {webhook_id}")
    return jsonify({"webhook": webhook_view(webhook_id, *found)})


@bp.put("/webhooks/<webhook_id>")
@requires(Role.ADMIN)
def update_webhook(webhook_id: str) -> Any:
    """Change some of ``url``, ``events``, ``enabled``, ``description`` and
    ``secret``; with ``revision``, only if unchanged since."""
    c = ctx()
    body = _object_body()
    current, seen = _existing(webhook_id)
    expect = body.get("revision")
    if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
        raise ApiError(400, "invalid", "revision: an integer")
    if expect is not None and expect != seen:
        raise Conflict(c.keys.webhook(webhook_id), seen)
    record = parse_webhook(body, current)
    record.update(updated_by=_user(), updated_at=now())
    key = c.keys.webhook(webhook_id)
    after = dict(webhook_view(webhook_id, record), secret_changed=body.get("secret") is not None)
    revision = c.store.commit([Compare(key, seen)], [
        Put(key, json.dumps(record, sort_keys=True).encode()),
        request_auditor(c).op("webhook.update", webhook_id,
                              before=webhook_view(webhook_id, current), after=after)])
    _settle(revision)
    return jsonify({"webhook": webhook_view(webhook_id, record, revision), "revision": revision})


@bp.delete("/webhooks/<webhook_id>")
@requires(Role.ADMIN)
def delete_webhook(webhook_id: str) -> Any:
    c = ctx()
    current, seen = _existing(webhook_id)
    key = c.keys.webhook(webhook_id)
    revision = c.store.commit([Compare(key, seen)], [
        Delete(key),
        request_auditor(c).op("webhook.delete", webhook_id,
                              before=webhook_view(webhook_id, current))])
    _settle(revision)
    return jsonify({"deleted": webhook_id})


@bp.get("/webhooks/<webhook_id>/deliveries")
@requires(Role.ADMIN)
def list_deliveries(webhook_id: str) -> Any:
    """The webhook's last attempts, newest first (kept in this process's
    memory: each replica shows its own)."""
    if not ID_RE.fullmatch(webhook_id) or dispatcher().webhook(webhook_id) is None:
        raise ApiError(404, "not_found", f"no webhook with id {webhook_id}")
    return jsonify({"items": dispatcher().deliveries(webhook_id)})
