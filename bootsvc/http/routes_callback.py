"""The ``callback`` blueprint: ``POST /callback/<sn>`` (the machine token, as
``Authorization: Bearer`` or ``?token=``), the installers', the first boot's
and the installed system's cloud-init's reports.

It takes our own callback body, the installed system's cloud-init report,
cloud-init's ``reporting`` webhook events and the Ubuntu autoinstall webhook
JSON (:mod:`bootsvc.http.callback_body` tells them apart and parses them),
records their marks in the machine's boot timeline and hands their events
to the task.  A body that cannot be used is a 400 with the reason, counted,
and changes nothing.
"""

from __future__ import annotations

import time

from flask import Blueprint, Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.callback_body import Callback, parse_callback
from bootsvc.http.common import HttpError, checked_sn, json_response, read_json
from lpmos.models import ValidationError

__all__ = ["Callback", "callback_bp", "parse_callback"]

callback_bp = Blueprint("callback", __name__)


@callback_bp.post("/callback/<sn>")
def callback(sn: str) -> Response:
    boot = current_boot()
    boot.authenticate(sn)
    sn = checked_sn(sn)
    body = read_json()
    try:
        parsed = parse_callback(body, now=time.time())
    except ValidationError as exc:
        boot.metrics.inc("http_requests_refused_total", reason="bad_callback")
        raise HttpError(400, "bad_event", str(exc)) from None
    boot.metrics.inc("http_callbacks_total", shape=parsed.shape)
    ip = request.remote_addr or ""
    for mark in parsed.marks:
        boot.ctx.timeline.record(f"sn:{sn}", mark.stage, {**mark.detail, "ip": ip})
    result = boot.submit_events(sn, list(parsed.events))
    return json_response({"acked": result.acked, "task_status": result.task_status})
