"""The ``agent`` blueprint: the live agent's API, ``/agent/v1/``.

| route                     | auth           |                                      |
| ------------------------- | -------------- | ------------------------------------ |
| POST /agent/v1/register   | token optional | inventory in, SN and token out       |
| POST /agent/v1/heartbeat  | token          | liveness (a lease in etcd)           |
| GET  /agent/v1/task       | token          | the task, long-polled by revision    |
| POST /agent/v1/events     | token          | progress events of the task          |

The token is checked before the request is judged: without one the answer
is 401 before the body is parsed, another machine's is 403, and only then
is a bad body 400.  An image-mode install is handed to the agent in the
task answer (``action: install`` with an install spec); the agent that polls
an approved image-mode task claims it.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, request

from bootsvc.http.backend import BootBackend, current_boot
from bootsvc.http.common import (
    HttpError,
    checked_sn,
    json_response,
    read_json,
    request_token,
)
from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import CONFIG_TEMPLATES
from bootsvc.render import file_url
from bootsvc.state.claim import claim_install, claim_release
from bootsvc.state.registration import RegistrationConflict, parse_register
from lpmos.audit import Auditor
from lpmos.catalog import Image
from lpmos.models import ProgressEvent, ValidationError
from lpmos.power import PowerRequest, new_request
from lpmos.states import FINAL, REBOOT_STEP, TaskStatus
from lpmos.store import Compare, Put, StoreError

#: the longest a task long poll waits, in seconds
LONG_POLL_MAX = 30.0
#: the most progress events one POST may carry
EVENTS_MAX = 500

agent_bp = Blueprint("agent", __name__, url_prefix="/agent/v1")

@agent_bp.post("/register")
def register() -> Response:
    boot = current_boot()
    body = read_json()
    try:
        req = parse_register(body)
    except ValidationError as exc:
        boot.metrics.inc("http_requests_refused_total", reason="bad_register")
        raise HttpError(400, "bad_request", str(exc)) from None
    ip = request.remote_addr or ""
    try:
        result = boot.registrar.register(req, request_token(), ip=ip)
    except RegistrationConflict as exc:
        boot.ctx.timeline.record(f"sn:{boot.registrar.identify(req)}", "agent refused",
                                 {"reason": "token held", "mac": req.boot_mac, "ip": ip})
        raise HttpError(409, "token_held", str(exc)) from None
    except StoreError as exc:
        raise HttpError(503, "etcd_unavailable", str(exc)) from None
    boot.ctx.timeline.record(f"sn:{result.sn}", "agent registered", {
        "mac": req.boot_mac, "ip": ip, "agent_version": req.agent_version,
        "token": "issued" if result.token else "kept", "conflict": result.conflict})
    return json_response({
        "sn": result.sn, "idc": boot.ctx.idc, "token": result.token, "server_time": time.time(),
        "heartbeat_interval": boot.heartbeat_interval,
        "task": result.task.to_dict() if result.task is not None else None})


def _agent_body(boot: BootBackend) -> tuple[str, dict[str, Any]]:
    """An agent POST's machine and body.  The token comes first: without
    one the answer is 401 before the body is parsed; then it must be the
    machine's the body names (403), and only then is the body judged (400)."""
    if not request_token():
        boot.authenticate(None)
    try:
        body, error = read_json(), None
    except HttpError as exc:
        body, error = None, exc
    boot.authenticate(body.get("sn") if isinstance(body, dict) else None)
    if error is not None:
        raise error
    if not isinstance(body, dict):
        raise HttpError(400, "bad_request", "a JSON object is required")
    return checked_sn(body.get("sn")), body


@agent_bp.post("/heartbeat")
def heartbeat() -> Response:
    boot = current_boot()
    sn, body = _agent_body(boot)
    state = body.get("state", "unknown")
    if not isinstance(state, str):
        raise HttpError(400, "bad_request", "state: a string such as idle or installing")
    try:
        boot.registrar.heartbeat(sn, str(state))
    except StoreError as exc:
        raise HttpError(503, "etcd_unavailable", str(exc)) from None
    boot.metrics.inc("http_heartbeats_total")
    task = boot.ctx.machines.view(sn).task
    return json_response({"server_time": time.time(),
                          "task_status": task.status if task is not None else None})


@agent_bp.get("/task")
def agent_task() -> Response:
    boot = current_boot()
    token = boot.authenticate(request.args.get("sn"))
    sn = checked_sn(request.args.get("sn"))
    try:
        wait = max(0.0, min(LONG_POLL_MAX, float(request.args.get("wait", 0))))
        raw_rev = request.args.get("revision")
        known = int(raw_rev) if raw_rev not in (None, "") else None
    except ValueError:
        raise HttpError(400, "bad_request", "wait and revision must be numbers") from None
    view = boot.ctx.machines.view(sn)
    if known is not None and known == view.task_revision and wait > 0 \
            and boot.task_waits.wait_for_change(sn, known, wait):
        view = boot.ctx.machines.view(sn)
    return json_response(_task_answer(boot, view, token))


def _task_answer(boot: BootBackend, view: MachineView, token: str) -> dict[str, Any]:
    """The agent's task answer; claims an approved image-mode task (fresh
    read + CAS) so an agent already running in discovery can install."""
    task, revision = view.task, view.task_revision
    answer: dict[str, Any] = {"revision": revision, "task": None, "action": "none",
                              "install": None}
    if task is None:
        return answer
    image = boot.image_for(view)
    image_mode = image is not None and image.mode == "image"
    conflict = bool(view.server is not None and view.server.conflict)
    status = task.state
    action = "wait"
    if status in FINAL:
        action = "done"
    elif status is TaskStatus.RELEASING and not conflict:
        outcome = claim_release(boot.ctx.store, boot.ctx.keys, idc=boot.ctx.idc, sn=view.sn,
                                node=boot.ctx.node_name)
        if outcome.install and outcome.task is not None:
            boot.ctx.cache.wait_for_revision(outcome.revision, 1.0)
            task, revision, action = outcome.task, outcome.revision, "release"
            answer["release"] = {
                "power_off": "bmc" if boot.ctx.cache.get(boot.ctx.keys.bmc(boot.ctx.idc, view.sn))
                is not None else "agent",
                "allow_removable": bool(task.params.get("allow_removable", False))}
            boot.ctx.timeline.record(f"sn:{view.sn}", "release claimed", {"by": "agent poll"})
        else:
            boot.ctx.timeline.record(f"sn:{view.sn}", "release refused",
                                     {"reason": outcome.reason[:200]})
    elif status is TaskStatus.APPROVED and image_mode and not conflict:
        outcome = claim_install(boot.ctx.store, boot.ctx.keys, boot.tokens, idc=boot.ctx.idc,
                                sn=view.sn, node=boot.ctx.node_name, continuing=False,
                                renew="keep")
        # the token is kept: this very agent uses it (and renders it into the seed)
        if outcome.install and outcome.task is not None:
            boot.ctx.cache.wait_for_revision(outcome.revision, 1.0)
            task, revision, action = outcome.task, outcome.revision, "install"
            boot.metrics.inc("http_install_claims_total", result="claimed_by_agent")
            boot.ctx.timeline.record(f"sn:{view.sn}", "install claimed", {"by": "agent poll"})
        else:
            boot.metrics.inc("http_install_claims_total", result="refused")
    elif status in (TaskStatus.BOOTING, TaskStatus.INSTALLING) and image_mode and not conflict \
            and task.progress.step != REBOOT_STEP:
        action = "install"
    answer.update(revision=revision, task=task.to_dict(), action=action)
    if action == "install" and image is not None:
        answer["install"] = _install_spec(boot, view, task, image, token)
    return answer


def _install_spec(boot: BootBackend, view: MachineView, task: Any, image: Image,
                  token: str) -> dict[str, Any]:
    ctx = boot.context(decision="install", sn=view.sn, mac=task.mac, task=task,
                       server=view.server, image=image, token=token,
                       remote_addr=request.remote_addr)
    seed = {}
    for name, template in CONFIG_TEMPLATES["image"].items():
        if template and name != "vendor-data":
            seed[name] = boot.renderer.render(template, ctx)
    size = image.size
    local = boot.catalog.local_path(image.disk_image)
    if not size and local is not None and local.is_file():
        size = local.stat().st_size
    params = ctx["params"]
    return {
        "mode": "image", "image": image.name,
        "image_url": file_url(ctx["node"]["url"], image.name, image.disk_image),
        "sha256": image.sha256, "size": size,
        "format": image.disk_format, "disk_size": image.disk_size or None,
        "root_device_hints": params.get("root_device_hints", {}),
        "seed": seed, "allow_removable": bool(params.get("allow_removable", False)),
    }


@agent_bp.post("/events")
def agent_events() -> Response:
    boot = current_boot()
    sn, body = _agent_body(boot)
    raw = body.get("events")
    if not isinstance(raw, list) or len(raw) > EVENTS_MAX:
        raise HttpError(400, "bad_request", f"events: a list of at most {EVENTS_MAX} events")
    events = []
    for i, item in enumerate(raw):
        try:
            events.append(ProgressEvent.from_dict(item))
        except ValidationError as exc:
            boot.metrics.inc("http_requests_refused_total", reason="bad_event")
            raise HttpError(400, "bad_event", f"events[{i}]: {exc}") from None
    result = boot.submit_events(sn, events)
    if result.task_status == TaskStatus.RELEASED.value and \
            any(e.kind == "state" and e.status == "released" for e in events):
        _power_off_released(boot, sn)
    states = [e for e in events if e.kind == "state"]
    if states:
        boot.ctx.timeline.record(f"sn:{sn}", "agent state",
                                 {"status": states[-1].status,
                                  "message": states[-1].message[:120]})
    return json_response({"acked": result.acked, "task_status": result.task_status})


def _power_off_released(boot: BootBackend, sn: str) -> None:
    """A released machine with a BMC record: queue its power-off (a request
    of the node, audited as such) once per attempt, in one CAS that
    requires the request not to exist yet.  Best effort: the agent powers
    the machine off itself when the BMC has not within its grace time."""
    ctx = boot.ctx
    if ctx.cache.get(ctx.keys.bmc(ctx.idc, sn)) is None:
        return
    task = ctx.machines.view(sn).task
    attempt = task.attempt if task is not None else 0
    for kv in ctx.cache.items(ctx.keys.power_requests(ctx.idc, sn)):
        try:
            old = PowerRequest.from_json(kv.value)
        except ValidationError:
            continue
        if old.action == "off" and old.task_attempt == attempt:
            return                      # a resent event: queued already
    req = new_request(ctx.idc, sn, "off", by=f"node:{ctx.node_name}", now=time.time(),
                      reason=f"release of attempt {attempt}: the disks are wiped",
                      task_attempt=attempt)
    key = ctx.keys.power_request(ctx.idc, sn, req.id)
    audit = Auditor(ctx.keys, f"node:{ctx.node_name}", f"regional node {ctx.node_name}").op(
        "power.request", f"{ctx.idc}/{sn}", detail=req.reason,
        after={"id": req.id, "action": req.action, "steps": [s.name for s in req.steps],
               "task_attempt": attempt})
    try:
        ctx.store.commit([Compare(key, 0)], [Put(key, req.to_json()), audit])
    except StoreError as exc:
        boot.ctx.timeline.record(f"sn:{sn}", "power off not queued", {"reason": str(exc)[:200]})
        return
    boot.ctx.timeline.record(f"sn:{sn}", "power off queued", {"id": req.id})
