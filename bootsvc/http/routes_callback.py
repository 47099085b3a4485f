"""The ``callback`` blueprint: ``POST /callback/<sn>`` (token), the
installer's and the first boot's progress hooks.

It takes our own callback body (``{"event", "status", "message",
"percent", "step", "seq"}``, posted by the install configs' and the first
boot's scripts) and the Ubuntu autoinstall ``reporting`` webhook JSON, and turns
either into a progress event of the machine's task.
"""

from __future__ import annotations

import time
from typing import Any

from flask import Blueprint, Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import (
    HttpError,
    checked_sn,
    json_response,
    read_json,
    sanitize_label,
)
from lpmos.models import ProgressEvent, ValidationError

callback_bp = Blueprint("callback", __name__)

def parse_callback(body: Any, *, now: float) -> ProgressEvent:
    """A callback body (ours, or the Ubuntu autoinstall ``reporting``
    webhook JSON) as a progress event.  Pure; ValidationError when unusable."""
    if not isinstance(body, dict):
        raise ValidationError("body", "a JSON object")
    if "event_type" in body and ("origin" in body or "name" in body):
        stamp = body.get("timestamp")
        ts = float(stamp) if isinstance(stamp, int | float) and not isinstance(stamp, bool) \
            and 0 < stamp < 4e9 else now
        result = str(body.get("result") or "")
        text = f"{body.get('event_type')} {body.get('name', '')}: " \
               f"{body.get('description', '')} {result}".strip()
        return ProgressEvent.from_dict({
            "source": "autoinstall", "seq": int(ts * 1_000_000), "kind": "log",
            "step": str(body.get("name") or "")[:64], "message": text, "at": ts})
    event = sanitize_label(str(body.get("event") or "callback"), 32) or "callback"
    if not event[0].isalpha():
        event = "callback"
    status = str(body.get("status") or "progress")
    seq = body.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        seq = 1 if status in ("succeeded", "failed") else int(now * 1000)
    data: dict[str, Any] = {"source": event, "seq": seq, "message": body.get("message") or "",
                            "at": now}
    if status in ("installing", "succeeded", "failed"):
        data["kind"] = "state"
        data["status"] = status
    elif status == "progress":
        data["kind"] = "progress"
    else:
        data["kind"] = "log"
    percent = body.get("percent")
    if isinstance(percent, int | float) and not isinstance(percent, bool):
        data["percent"] = max(0.0, min(100.0, float(percent)))
    if body.get("step"):
        data["step"] = str(body["step"])
    return ProgressEvent.from_dict(data)


@callback_bp.post("/callback/<sn>")
def callback(sn: str) -> Response:
    boot = current_boot()
    boot.authenticate(sn)
    sn = checked_sn(sn)
    body = read_json()
    try:
        event = parse_callback(body, now=time.time())
    except ValidationError as exc:
        boot.metrics.inc("http_requests_refused_total", reason="bad_callback")
        raise HttpError(400, "bad_event", str(exc)) from None
    boot.ctx.timeline.record(f"sn:{sn}", "callback", {
        "source": event.source, "kind": event.kind, "status": event.status,
        "message": event.message[:120], "ip": request.remote_addr or ""})
    result = boot.submit_events(sn, [event])
    return json_response({"acked": result.acked, "task_status": result.task_status})
