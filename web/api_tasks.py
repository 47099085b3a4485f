"""``/api/v1/tasks``: create, list, read, approve, reject, cancel, retry,
redeploy, delete and batch-import install tasks.

Every change goes through :class:`lpmos.tasks.TaskService` (one CAS each)
with its audit record (who, what, before, after) in the same transaction.
Lists are served from
the process's watch cache (:class:`web.index.ConsoleIndex`), never from
etcd range reads.  After a write the view waits briefly for the cache to
reach the written revision, so the caller's next list shows its change.

The calls of the earlier console work as its operators wrote them: a JSON
body sent by ``curl -d`` without a Content-Type header is JSON here.

Install inputs (``params.hostname``, ``ssh_keys``, ``password_hash``,
``username``, ``cloud_config``, ``network``; docs/install-inputs.md) are
checked when a task is created, and a task with ``cloud_config`` has its
whole user-data rendered as the node will render it and checked by
cloud-init's own ``cloud-init schema``: a refusal is a 400 quoting
cloud-init, and nothing is stored.  Secrets never leave: every task this
API returns has its params through :func:`lpmos.cloudconfig.redact_params`
(list rows and WebSocket deltas carry no params at all).
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import Any

import yaml
from flask import Blueprint, jsonify, request

from bootsvc.policy.script import CONFIG_TEMPLATES
from bootsvc.render import Renderer, RenderError, build_context
from lpmos.auth import Role
from lpmos.catalog import Image
from lpmos.cloudconfig import (
    SchemaCheckUnavailable,
    check_cloud_config,
    parse_install_params,
    redact_params,
    render_cloud_config,
)
from lpmos.models import Task, ValidationError, validate_name, validate_sn, validate_text
from lpmos.power import PowerRequest
from lpmos.schedule import (
    ScheduleError,
    decide_start,
    describe,
    iso_time,
    parse_not_before,
    parse_window,
)
from lpmos.states import IllegalTransition, NotInState, TaskStatus
from lpmos.store import Op, Put, Unchanged
from lpmos.tasks import AuditFn, BatchRefused, Stored
from web.api_power import approval_request, queue_ops, requests_of
from web.audit import request_auditor
from web.auth import Principal, current_principal, requires
from web.context import WebContext, ctx
from web.http import ApiError, decode_cursor, encode_cursor, parse_json_body, parse_limit
from web.index import task_summary

bp = Blueprint("api_tasks", __name__, url_prefix="/api/v1")

TASK_FIELDS = ("idc", "sn", "mac", "os_type", "os_version", "image", "params", "notes",
               "template", "not_before", "window")
CSV_FIELDS = ("idc", "sn", "mac", "os_type", "os_version", "image", "template", "notes")
READ_YOUR_WRITES_WAIT = 2.0
#: what the create-time check renders in place of a node's URL and token
CHECK_NODE_URL = "http://lpmos-node.invalid:8081"
CHECK_TOKEN = "create-time-schema-check"  # noqa: S105 - a placeholder, not a secret


def _principal() -> Principal:
    p = current_principal()
    assert p is not None   # @requires ran first
    return p


def _body(*, allow_empty: bool = True) -> Any:
    raw = request.get_data(cache=True)
    if allow_empty and not raw.strip():
        return {}
    return parse_json_body(raw)


def _expected_revision(body: dict[str, Any]) -> int | None:
    """The task revision the caller saw (``"revision"``), or ``None``."""
    expect = body.get("revision")
    if expect is not None and (isinstance(expect, bool) or not isinstance(expect, int)):
        raise ApiError(400, "invalid", "revision: an integer (the task revision you saw)")
    return expect


def _object_body() -> dict[str, Any]:
    body = _body()
    if not isinstance(body, dict):
        raise ApiError(400, "bad_request", "the body must be a JSON object")
    return body


def task_view(task: Task) -> dict[str, Any]:
    """A task as the API returns it: its params redacted, and its schedule
    in words (:func:`schedule_view`)."""
    data = task.to_dict()
    data["params"] = redact_params(data.get("params"))
    data["schedule"] = schedule_view(task, time.time())
    return data


def schedule_view(task: Task, now: float) -> dict[str, Any]:
    """``{"not_before": ISO or "", "window": "HH:MM-HH:MM" or "", "summary",
    "waiting", "starts_at", "reason"}``: ``waiting`` when the task is
    approved (or pending) and its schedule does not let it start at
    ``now``; ``reason`` is what the boot script and the power worker say."""
    start = decide_start(task.not_before, task.window, now)
    scheduled = bool(task.not_before or task.window)
    waiting = scheduled and not start.start and task.status in ("pending", "approved")
    return {"not_before": iso_time(task.not_before), "window": task.window,
            "summary": describe(task.not_before, task.window), "waiting": waiting,
            "starts_at": iso_time(start.at) if scheduled else "",
            "reason": start.reason if waiting else ""}


def _synced(c: WebContext, revision: int) -> None:
    c.cache.wait_for_revision(revision, READ_YOUR_WRITES_WAIT)


def audit_summary(task: Task | None) -> dict[str, Any] | None:
    """A task as an audit record shows it: the list row's summary without
    the revision, which the record cannot know before etcd commits it (the
    record's own ``revision`` is the change's, see :mod:`lpmos.audit`)."""
    if task is None:
        return None
    summary = task_summary(task, 0)
    del summary["revision"]
    return summary


def _audit(c: WebContext, action: str, target: str, detail: str = "") -> AuditFn:
    """The audit builder of one task change by this request's caller."""
    auditor = request_auditor(c)

    def build(before: Stored | None, after: Task | None) -> Op:
        return auditor.op(action, target, detail=detail,
                          before=task_summary(before.task, before.revision) if before else None,
                          after=audit_summary(after))

    return build


def _path_ids(idc: str, sn: str) -> tuple[str, str]:
    try:
        return validate_name(idc, "idc"), validate_sn(sn, "sn")
    except ValidationError as exc:
        raise ApiError(404, "not_found", f"no task for {idc}/{sn}: {exc}") from None


# -- building a task from a request ------------------------------------------------


def build_task(c: WebContext, data: Any) -> Task:
    """A validated new :class:`Task` from one JSON object (or CSV row):
    the named template fills what the row leaves out, and the OS is
    checked against the image catalog when one is configured."""
    if not isinstance(data, dict):
        raise ValidationError("task", "a JSON object")
    values = {k: data[k] for k in TASK_FIELDS if k in data and data[k] is not None}
    for name in ("idc", "sn", "mac", "os_type", "os_version", "image", "notes", "template"):
        if name in values and not isinstance(values[name], str):
            raise ValidationError(name, "a string")
    template_name = values.get("template", "")
    if template_name:
        validate_text(template_name, "template", 64)
        found = c.index.template(template_name)
        if found is None:
            raise ValidationError("template", f"no template named {template_name!r}")
        preset = found[0]
        for name in ("os_type", "os_version", "image"):
            if not values.get(name) and isinstance(preset.get(name), str):
                values[name] = preset[name]
        params = dict(preset.get("params") or {}) if isinstance(preset.get("params"), dict) \
            else {}
        if isinstance(values.get("params"), dict):
            params.update(values["params"])
        values["params"] = params
    for required in ("idc", "sn", "mac", "os_type"):
        if not values.get(required):
            raise ValidationError(required, "is required")
    for name in ("not_before", "window"):
        if name in values and not isinstance(values[name], str):
            raise ValidationError(name, "a string: an ISO 8601 time such as "
                                  "2026-12-04T22:00:00Z" if name == "not_before"
                                  else "a string: a daily UTC window such as 22:00-04:00")
    task = Task(**values)
    task.validate()
    image: Image | None = None
    if c.catalog is not None:
        image = c.catalog.resolve(task.os_type, task.os_version, task.image)
        task.image = image.name
        known = c.index.server(task.idc, task.sn)
        mismatch = image.arch_mismatch(known[0].arch) if known else ""
        if mismatch:      # the inventory says which machine this is: never send it there
            raise ValidationError("image", mismatch)
    task.params = checked_params(c, task, task.params)
    task.validate()
    check_task_cloud_config(c, task, image)
    return task


def checked_params(c: WebContext, task: Task, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` checked and normalised as install inputs of ``task``'s
    machine (bond members against its registered MACs, once it has any)."""
    known = c.index.server(task.idc, task.sn)
    return parse_install_params(
        params, mac=task.mac,
        known_macs=frozenset(known[0].macs) if known and known[0].macs else None)


def check_task_cloud_config(c: WebContext, task: Task, image: Image | None) -> None:
    """cloud-init's schema check of the merged user-data, when the task
    brings its own cloud-config (:func:`check_seed_user_data`)."""
    if task.params.get("cloud_config"):
        templates = c.config.get("http.templates")
        check_seed_user_data(task, image, Renderer(Path(templates) if templates else None))


def seed_user_data(task: Task, image: Image | None, renderer: Renderer) -> str:
    """The user-data the node will render for ``task`` (its own URL and
    token aside): the image seed's, or for an Ubuntu autoinstall the
    installed system's embedded ``user-data``.  ValidationError when the
    install kind reads no cloud-config."""
    kind = "image" if image is None or image.mode == "image" else image.os_family
    if kind not in ("image", "ubuntu"):
        raise ValidationError("params.cloud_config", f"a {kind} installer does not read "
                              "cloud-config; it applies to image installs and Ubuntu autoinstall")
    context = build_context(node_url=CHECK_NODE_URL, idc=task.idc, node_name="control-plane",
                            decision="claim", sn=task.sn, mac=task.mac, task=task,
                            image=image, token=CHECK_TOKEN)
    try:
        text = renderer.render(CONFIG_TEMPLATES[kind]["user-data"], context)
    except RenderError as exc:
        # the operator's document cannot be merged (runcmd not a list ...):
        # cloud-init's own words on it first, else the renderer's
        check_cloud_config(str(task.params.get("cloud_config", "")))
        raise ValidationError("params.cloud_config", str(exc)) from None
    if kind == "ubuntu":
        embedded = yaml.safe_load(text)["autoinstall"]["user-data"]
        return render_cloud_config(embedded)
    return text


def check_seed_user_data(task: Task, image: Image | None, renderer: Renderer) -> None:
    """cloud-init's schema check on the merged user-data of ``task``:
    CloudConfigRejected (400) quoting cloud-init; 503 when it cannot run."""
    try:
        check_cloud_config(seed_user_data(task, image, renderer))
    except SchemaCheckUnavailable as exc:
        raise ApiError(503, "unavailable", str(exc), reason="schema_check") from None


# -- list and read --------------------------------------------------------------


@bp.get("/tasks")
@requires(Role.VIEWER)
def list_tasks() -> Any:
    """Tasks newest first; filters ``idc``, ``status`` (comma list), ``q``
    (text in SN, MAC, OS, users, notes); ``limit`` (1-500, default 50) and
    ``cursor`` (the previous page's ``next_cursor``)."""
    c = ctx()
    if not c.cache.wait_loaded(5.0):
        raise ApiError(503, "unavailable", "the task cache is still loading from etcd")
    idc = request.args.get("idc", "")
    statuses = [s for s in request.args.get("status", "").split(",") if s]
    for s in statuses:
        try:
            TaskStatus(s)
        except ValueError:
            raise ApiError(400, "bad_request", f"status: {s!r} is not one of "
                           + ", ".join(x.value for x in TaskStatus)) from None
    q = request.args.get("q", "")
    if len(q) > 200:
        raise ApiError(400, "bad_request", "q: at most 200 characters")
    limit = parse_limit(request.args.get("limit"))
    after = None
    if request.args.get("cursor"):
        parts = decode_cursor(request.args["cursor"], 3)
        try:
            after = (float(parts[0]), str(parts[1]), str(parts[2]))
        except (TypeError, ValueError):
            raise ApiError(400, "bad_request", "cursor is malformed") from None
    revision = c.cache.revision
    entries, next_after, total = c.index.query_tasks(idc=idc, status=statuses, q=q,
                                                     after=after, limit=limit)
    return jsonify({
        "items": [task_summary(e.task, e.revision) for e in entries],
        "next_cursor": encode_cursor(list(next_after)) if next_after else None,
        "total": total,
        "revision": revision,
    })


@bp.get("/tasks/<idc>/<sn>")
@requires(Role.VIEWER)
def get_task(idc: str, sn: str) -> Any:
    """One task with its history and log (from the cache; ``?fresh=1`` reads etcd)."""
    c = ctx()
    idc, sn = _path_ids(idc, sn)
    if request.args.get("fresh") in ("1", "true"):
        stored = c.tasks.get(idc, sn)
        if stored is None:
            raise ApiError(404, "not_found", f"no task for {idc}/{sn}")
        task, revision = stored.task, stored.revision
    else:
        entry = c.index.task(idc, sn)
        if entry is None:
            raise ApiError(404, "not_found", f"no task for {idc}/{sn}")
        task, revision = entry.task, entry.revision
    return jsonify({"task": task_view(task), "revision": revision,
                    "online": c.index.online(idc, sn)})


# -- create -----------------------------------------------------------------------


@bp.post("/tasks")
@requires(Role.OPERATOR)
def create_task() -> Any:
    """Create a ``pending`` task: ``{"idc", "sn", "mac", "os_type",
    "os_version"?, "image"?, "template"?, "params"?, "notes"?}``.  The
    install inputs in ``params`` are checked (400 naming the field), a
    ``cloud_config`` by cloud-init's schema check on the merged user-data."""
    c = ctx()
    body = _body(allow_empty=False)
    task = build_task(c, body)
    stored = c.tasks.create(task, by=_principal().user,
                            audit=_audit(c, "task.create", f"{task.idc}/{task.sn}", task.notes))
    _synced(c, stored.revision)
    ignored = sorted(set(body) - set(TASK_FIELDS)) if isinstance(body, dict) else []
    resp = jsonify({"task": task_view(stored.task), "revision": stored.revision,
                    "ignored_fields": ignored})
    resp.status_code = 201
    resp.headers["Location"] = f"/api/v1/tasks/{task.idc}/{task.sn}"
    return resp


def parse_batch(raw: bytes, mimetype: str) -> tuple[list[Any], list[int] | None]:
    """Rows of a batch: a JSON list (or ``{"tasks": [...]}``) or CSV with a
    header row naming the columns (idc, sn, mac, os_type, os_version, image,
    template, notes); for CSV also each row's line in the file (blank lines
    are skipped, so the row index alone does not find it)."""
    if mimetype in ("text/csv", "application/csv") or \
            (not raw.lstrip().startswith((b"[", b"{")) and b"," in raw.split(b"\n", 1)[0]):
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ApiError(400, "bad_request", "the CSV is not UTF-8") from None
        reader = csv.DictReader(io.StringIO(text))
        header = [h.strip() for h in (reader.fieldnames or [])]
        unknown = [h for h in header if h not in CSV_FIELDS]
        if unknown or not header:
            raise ApiError(400, "bad_request", "CSV header must name columns among "
                           + ", ".join(CSV_FIELDS) + (f"; unknown: {', '.join(unknown)}"
                                                      if unknown else ""))
        rows: list[Any] = []
        lines: list[int] = []
        try:
            for row in reader:
                rows.append({k.strip(): (v or "").strip() for k, v in row.items()
                             if k is not None and (v or "").strip()})
                lines.append(reader.line_num)
        except csv.Error as exc:
            raise ApiError(400, "bad_request", f"CSV line {reader.line_num}: {exc}") from None
        return rows, lines
    data = parse_json_body(raw)
    if isinstance(data, dict) and isinstance(data.get("tasks"), list):
        data = data["tasks"]
    if not isinstance(data, list):
        raise ApiError(400, "bad_request", "send a JSON list of tasks, {\"tasks\": [...]}, or CSV")
    return data, None


@bp.post("/tasks/batch")
@requires(Role.OPERATOR)
def batch_create() -> Any:
    """Create many tasks at once, all or nothing.  Body: a JSON list, or CSV
    (``Content-Type: text/csv``, or a multipart upload in the field
    ``file``).  Any bad row refuses the whole batch with 400 and an
    ``errors`` list ``[{"row", "field", "error"}]`` (rows count from 0; a
    CSV row's error also has its ``line`` in the file, the header being 1)."""
    c = ctx()
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise ApiError(400, "bad_request", "multipart upload needs a 'file' field")
        raw = upload.read(int(c.setting("web.max_body", 1 << 20)) + 1)
        mimetype = "text/csv" if (upload.filename or "").lower().endswith(".csv") \
            else (upload.mimetype or "")
    else:
        raw, mimetype = request.get_data(cache=True), request.mimetype
    rows, lines = parse_batch(raw, mimetype)
    limit = int(c.setting("web.batch_max", 100))
    if not rows:
        raise ApiError(400, "bad_request", "the batch is empty")
    if len(rows) > limit:
        raise ApiError(400, "bad_request", f"at most {limit} tasks per batch "
                                           f"(got {len(rows)}); split the file")
    tasks: list[Task] = []
    errors: list[dict[str, Any]] = []
    for i, row in enumerate(rows):
        try:
            tasks.append(build_task(c, row))
        except ValidationError as exc:
            errors.append({"row": i, "field": exc.field, "error": str(exc),
                           **({"line": lines[i]} if lines else {})})
    if errors:
        raise ApiError(400, "invalid", f"{len(errors)} of {len(rows)} rows are invalid; "
                                       "nothing was created", errors=errors)
    user = _principal().user
    auditor = request_auditor(c)

    def audit(created: list[Task]) -> Op:
        return auditor.op("task.batch_create", f"{len(created)} tasks",
                          after=[f"{t.idc}/{t.sn}" for t in created])

    try:
        stored = c.tasks.create_many(tasks, by=user, audit=audit)
    except BatchRefused as exc:
        raise ApiError(409, "conflict", f"{len(exc.errors)} of {len(rows)} rows conflict with "
                                        "existing tasks; nothing was created",
                       errors=exc.errors) from None
    revision = stored[-1].revision if stored else c.cache.revision
    _synced(c, revision)
    resp = jsonify({"created": len(stored), "revision": revision,
                    "tasks": [task_summary(s.task, s.revision) for s in stored]})
    resp.status_code = 201
    return resp


# -- transitions -------------------------------------------------------------------


def _transition(idc: str, sn: str, target: TaskStatus, action: str, *,
                note_field: str = "notes", four_eyes: bool = False,
                source: TaskStatus | None = None, new_params: bool = False) -> Any:
    """``source``: the one state the call applies to, when several calls lead
    to the same state (approve: pending → approved; retry: failed →
    approved; redeploy: succeeded → approved), so that none does another's
    job under its name in the audit log.  ``new_params``: the body's
    ``params`` (an object) are merged into the task's and checked as at
    creation, in the same CAS as the move.  A move to ``approved`` of a
    machine with a BMC record also queues its power request (PXE next, then
    a power cycle: :func:`web.api_power.approval_request`) in that CAS,
    unless the body says ``"power": false``."""
    c = ctx()
    idc, sn = _path_ids(idc, sn)
    body = _object_body()
    note = body.get(note_field, body.get("reason" if note_field == "notes" else "notes", ""))
    try:
        note = validate_text(note, note_field, 1000, single_line=False)
    except ValidationError as exc:
        raise ApiError(400, "invalid", str(exc), field=exc.field) from None
    expect = _expected_revision(body)
    user = _principal().user
    changes = body.get("params") if new_params else None
    if changes is not None and not isinstance(changes, dict):
        raise ApiError(400, "invalid", "params: a JSON object (merged into the task's)",
                       field="params")

    power = body.get("power", True)
    if not isinstance(power, bool):
        raise ApiError(400, "invalid", "power: true or false (false: do not power-cycle the "
                                       "machine through its BMC)", field="power")
    queued: list[PowerRequest] = []

    def check(task: Task) -> None:
        if four_eyes and c.setting("web.four_eyes", False) and task.created_by == user:
            raise ApiError(403, "four_eyes", f"{user} created this task and may not approve "
                                             "it (four-eyes rule)")
        if changes:
            _merge_params(c, task, changes)
        queued.clear()
        if target in (TaskStatus.APPROVED, TaskStatus.RELEASING) and power:
            req = approval_request(c, task, by=user, action=action)
            if req is not None:
                queued.append(req)

    def power_ops(_task: Task) -> list[Op]:
        return queue_ops(c, queued[0], request_auditor(c)) if queued else []

    try:
        stored = c.tasks.transition(idc, sn, target, by=user, reason=note,
                                    expect_revision=expect, mutate=check, source=source,
                                    audit=_audit(c, action, f"{idc}/{sn}", note),
                                    extra=power_ops)
    except IllegalTransition as exc:
        current = c.tasks.get(idc, sn)
        detail = str(exc)
        if isinstance(exc, NotInState):
            detail = (f"{action.removeprefix('task.')} applies to a {exc.expected.value} task; "
                      f"{idc}/{sn} is {exc.current.value}")
        raise ApiError(409, "illegal_transition", detail,
                       status=current.task.status if current else None,
                       revision=current.revision if current else 0) from None
    _synced(c, stored.revision)
    out: dict[str, Any] = {"task": task_view(stored.task), "revision": stored.revision}
    if queued:
        out["power_request"] = queued[0].id
    return jsonify(out)


@bp.post("/tasks/<idc>/<sn>/approve")
@requires(Role.APPROVER)
def approve_task(idc: str, sn: str) -> Any:
    """pending → approved.  ``{"notes"?, "revision"?}``: with ``revision``
    the approval applies only to the task as you saw it (else 409)."""
    return _transition(idc, sn, TaskStatus.APPROVED, "task.approve", four_eyes=True,
                       source=TaskStatus.PENDING)


@bp.post("/tasks/<idc>/<sn>/reject")
@requires(Role.APPROVER)
def reject_task(idc: str, sn: str) -> Any:
    """pending → rejected.  ``{"notes"?, "revision"?}``."""
    return _transition(idc, sn, TaskStatus.REJECTED, "task.reject")


@bp.post("/tasks/<idc>/<sn>/cancel")
@requires(Role.OPERATOR)
def cancel_task(idc: str, sn: str) -> Any:
    """Any active state → cancelled.  ``{"reason"?, "revision"?}``."""
    return _transition(idc, sn, TaskStatus.CANCELLED, "task.cancel", note_field="reason")


@bp.post("/tasks/<idc>/<sn>/retry")
@requires(Role.APPROVER)
def retry_task(idc: str, sn: str) -> Any:
    """failed → approved (a new install: an approval, so the approver role)."""
    return _transition(idc, sn, TaskStatus.APPROVED, "task.retry", four_eyes=True,
                       source=TaskStatus.FAILED)


@bp.post("/tasks/<idc>/<sn>/redeploy")
@requires(Role.APPROVER)
def redeploy_task(idc: str, sn: str) -> Any:
    """succeeded → approved: the machine installs again as a new attempt
    (its history kept).  ``{"params"?, "notes"?, "revision"?}``: ``params``
    are merged into the task's (e.g. ``{"hostname": "web-2"}``) and checked
    as at creation; a bad one is a 400 and changes nothing.  The machine
    installs at its next network boot."""
    return _transition(idc, sn, TaskStatus.APPROVED, "task.redeploy", four_eyes=True,
                       source=TaskStatus.SUCCEEDED, new_params=True)


def _merge_params(c: WebContext, task: Task, changes: dict[str, Any]) -> None:
    """``changes`` merged into ``task.params`` (a null value removes the
    key) and checked as a new task's are; ValidationError (400) else."""
    merged = {k: v for k, v in {**task.params, **changes}.items() if v is not None}
    try:
        task.params = checked_params(c, task, merged)
        task.validate()
    except ValidationError as exc:
        raise ApiError(400, "invalid", str(exc), field=exc.field) from None
    check_task_cloud_config(c, task, c.catalog.images.get(task.image)
                            if c.catalog is not None else None)


@bp.delete("/tasks/<idc>/<sn>")
@requires(Role.OPERATOR)
def delete_task(idc: str, sn: str) -> Any:
    """Delete a task that is not booting or installing (cancel it first).
    ``?revision=N`` deletes only the task as you saw it."""
    c = ctx()
    idc, sn = _path_ids(idc, sn)
    expect: int | None = None
    if request.args.get("revision"):
        try:
            expect = int(request.args["revision"])
        except ValueError:
            raise ApiError(400, "invalid", "revision: an integer") from None
    before = c.tasks.get(idc, sn)
    if before is None:
        raise ApiError(404, "not_found", f"no task for {idc}/{sn}")
    try:
        c.tasks.delete(idc, sn, expect_revision=expect,
                       audit=_audit(c, "task.delete", f"{idc}/{sn}"))
    except ValidationError as exc:
        raise ApiError(409, "illegal_transition", str(exc), status=before.task.status,
                       revision=before.revision) from None
    _synced(c, c.store.revision())
    return jsonify({"deleted": f"{idc}/{sn}"})


# -- schedule and release ------------------------------------------------------------

#: the states whose schedule may still change: not yet started (pending,
#: approved) or finished (for the next redeploy or retry)
SCHEDULABLE = (TaskStatus.PENDING, TaskStatus.APPROVED, TaskStatus.SUCCEEDED,
               TaskStatus.FAILED)


@bp.put("/tasks/<idc>/<sn>/schedule")
@requires(Role.APPROVER)
def put_schedule(idc: str, sn: str) -> Any:
    """Replace the task's schedule: ``{"not_before": ISO 8601 | null,
    "window": "HH:MM-HH:MM" | null, "notes"?, "revision"?}`` (a field left
    out or null is cleared; both null: no schedule).  400 for an unparsable
    time or window, 409 once the install has started.  An approved task's
    queued power cycle (:func:`web.api_power.approval_request`) is rewritten
    with the new schedule in the same transaction; one a node is already
    carrying out is a 409."""
    c = ctx()
    idc, sn = _path_ids(idc, sn)
    body = _object_body()
    unknown = sorted(set(body) - {"not_before", "window", "notes", "revision"})
    if unknown:
        raise ApiError(400, "invalid", f"{unknown[0]}: unknown field (not_before, window, "
                                       "notes, revision)", field=unknown[0])
    try:
        not_before = parse_not_before(body.get("not_before"))
        window = parse_window(body.get("window"))
        note = validate_text(body.get("notes", ""), "notes", 1000, single_line=False)
    except (ScheduleError, ValidationError) as exc:
        raise ApiError(400, "invalid", str(exc), field=exc.field) from None
    expect = _expected_revision(body)
    user = _principal().user
    rewritten: list[tuple[str, int, PowerRequest]] = []

    def change(task: Task) -> None:
        if task.state not in SCHEDULABLE:
            raise ApiError(409, "illegal_transition", f"{idc}/{sn} is {task.status}: its "
                           "schedule can no longer change", status=task.status)
        if (task.not_before, task.window) == (not_before, window):
            raise Unchanged
        rewritten.clear()
        if task.state is TaskStatus.APPROVED:
            for req, revision in requests_of(c, idc, sn):
                if req.final or req.task_attempt != task.attempt:
                    continue
                if req.state != "queued":
                    raise ApiError(409, "busy", f"node {req.node} is carrying out the power "
                                   f"cycle of this attempt ({req.id}); too late to "
                                   "reschedule it", id=req.id)
                req.not_before, req.window = not_before, window
                rewritten.append((c.keys.power_request(idc, sn, req.id), revision, req))
        before = describe(task.not_before, task.window) or "none"
        task.not_before, task.window = not_before, window
        task.add_log(f"schedule set by {user}: {describe(not_before, window) or 'none'} "
                     f"(was {before})")

    def power_ops(_task: Task) -> list[Op]:
        return [Put(key, req.to_json()) for key, _rev, req in rewritten]

    stored = c.tasks.update(idc, sn, change, expect_revision=expect,
                            audit=_audit(c, "task.schedule", f"{idc}/{sn}",
                                         note or describe(not_before, window) or "cleared"),
                            extra=power_ops)
    _synced(c, stored.revision)
    return jsonify({"task": task_view(stored.task), "revision": stored.revision,
                    "power_requests": [req.id for _k, _r, req in rewritten]})


@bp.post("/tasks/<idc>/<sn>/release")
@requires(Role.APPROVER)
def release_task(idc: str, sn: str) -> Any:
    """succeeded | failed → releasing: the machine network-boots the live
    image, whose agent wipes every disk (signatures and partition tables;
    blkdiscard where the disk supports discard) and reports ``released``;
    then it is powered off (its BMC when known, else the agent).  A new
    attempt, so the wipe's log is kept beside the installs'.  ``{"notes"?,
    "revision"?, "power"?}``: with a BMC record the network boot and power
    cycle are queued in the same transaction, as an approval does."""
    return _transition(idc, sn, TaskStatus.RELEASING, "task.release", four_eyes=False)
