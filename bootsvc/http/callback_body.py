"""The bodies ``POST /callback/<sn>`` takes, parsed: pure, no request, clock or store.

Four shapes, told apart by their fields:

* our own callback (``{"event", "status", "message", "percent", "step",
  "seq"}``), posted by the install configs' and the first boot's scripts;
* the installed system's cloud-init report (``"event": "cloud-init"``,
  templates/cloud-init/lpmos-report.py): the task's success or failure,
  with cloud-init's reason, each stage's times and how the installed
  system booted (BIOS or UEFI, Secure Boot);
* cloud-init's own ``reporting`` webhook events (``"origin": "cloudinit"``);
* the Ubuntu autoinstall ``reporting`` webhook JSON (any other origin).

:func:`parse_callback` turns each into a :class:`Callback`: the progress
events for the task and the marks for the machine's boot timeline.  Only
our own callback and the cloud-init report change the task's state; a
webhook event never does (cloud-init's end is the report's to say).

The report's stage times are the machine's clock.  They go into a mark's
``detail`` (ISO 8601, UTC), not its time: a timeline is ordered by the
node's clock, and a machine without NTP must not reorder it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from lpmos.models import ProgressEvent, ValidationError, clean_message

#: cloud-init's stages as status.json names them, in the order they run.
REPORT_STAGES = ("init-local", "init", "modules-init", "modules-config", "modules-final")
#: cloud-init's top-level reporting events: a stage's start and finish.
WEBHOOK_STAGES = frozenset({"init-local", "init-network", "modules-init", "modules-config",
                            "modules-final"})
#: what the report's ``cloud_init.status`` may be; only ``done`` is success.
CLOUD_INIT_STATUSES = ("done", "error", "degraded", "running")
#: what the report's ``firmware.mode`` may be
FIRMWARE_MODES = ("uefi", "bios")
WEBHOOK_RESULTS = frozenset({"SUCCESS", "WARN", "FAIL"})

STAGES_MAX = 8          # stages in one report
ERRORS_MAX = 20         # errors kept per stage and per report
ERROR_CHARS = 300       # characters of one error
REASON_CHARS = 500      # characters of the reason a failed report gives the task
NAME_CHARS = 200        # characters of a webhook event's name
REPORT_SEQ_MAX = 2**40  # a report's seq; its events' seq is seq * 16 + n (< 2**53)
#: the report's events: a log line per stage (seq * 16 + its index, below STAGES_MAX),
#: the firmware's line, then the state
_FIRMWARE_SLOT = 14
_STATE_SLOT = 15

_STAGE_NAME_RE = re.compile(r"[a-z][a-z0-9-]{0,31}")


@dataclass(frozen=True)
class Mark:
    """One entry of the machine's boot timeline (``stage``, ``detail``)."""

    stage: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Callback:
    """A parsed callback body: ``shape`` (``callback``, ``cloud-init``,
    ``cloudinit-webhook``, ``autoinstall``), the events for the task (in
    order; may be empty) and the marks for the timeline."""

    shape: str
    events: tuple[ProgressEvent, ...]
    marks: tuple[Mark, ...]


def parse_callback(body: Any, *, now: float) -> Callback:
    """``body`` as a :class:`Callback`; ValidationError naming the field when unusable."""
    if not isinstance(body, dict):
        raise ValidationError("body", "a JSON object")
    if "event_type" in body and ("origin" in body or "name" in body):
        if body.get("origin") == "cloudinit":
            return parse_cloud_init_webhook(body, now=now)
        return _single("autoinstall", parse_autoinstall_webhook(body, now=now))
    if body.get("event") == "cloud-init":
        return parse_cloud_init_report(body, now=now)
    return _single("callback", parse_own_callback(body, now=now))


def _single(shape: str, event: ProgressEvent) -> Callback:
    mark = Mark("callback", {"source": event.source, "kind": event.kind, "status": event.status,
                             "message": event.message[:120]})
    return Callback(shape, (event,), (mark,))


# --- our own callback and the autoinstall webhook -------------------------------------------


def _stamp(value: Any, now: float) -> float:
    """A peer's epoch timestamp, or ``now`` when it is none or absurd."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 < value < 4e9:
        return float(value)
    return now


def parse_autoinstall_webhook(body: dict[str, Any], *, now: float) -> ProgressEvent:
    """An autoinstall (curtin, subiquity) ``reporting`` event: a log line."""
    ts = _stamp(body.get("timestamp"), now)
    result = str(body.get("result") or "")
    text = f"{body.get('event_type')} {body.get('name', '')}: " \
           f"{body.get('description', '')} {result}".strip()
    return ProgressEvent.from_dict({
        "source": "autoinstall", "seq": int(ts * 1_000_000), "kind": "log",
        "step": str(body.get("name") or "")[:64], "message": text, "at": ts})


def parse_own_callback(body: dict[str, Any], *, now: float) -> ProgressEvent:
    """Our callback body: a state (installing, succeeded, failed), progress or log event."""
    event = _label(str(body.get("event") or "callback"), 32) or "callback"
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


def _label(value: str, limit: int) -> str:
    return re.sub(r"[^a-z0-9_-]", "", value.lower())[:limit]


# --- the installed system's cloud-init report ------------------------------------------------


@dataclass(frozen=True)
class StageTimes:
    """One cloud-init stage of a report (times: the machine's clock)."""

    name: str
    start: float | None
    finished: float | None
    errors: tuple[str, ...]

    @property
    def seconds(self) -> float | None:
        if self.start is None or self.finished is None:
            return None
        return round(max(0.0, self.finished - self.start), 3)


@dataclass(frozen=True)
class Firmware:
    """How the installed system booted: ``mode`` ``uefi`` or ``bios``;
    ``secure_boot`` None when UEFI did not say (never None under BIOS)."""

    mode: str
    secure_boot: bool | None


@dataclass(frozen=True)
class CloudInitReport:
    """A checked cloud-init report: ``outcome`` is ``succeeded`` exactly
    when cloud-init's ``status`` is ``done``; ``firmware`` None when the
    report does not say (an lpmos-report older than the field)."""

    seq: int
    status: str
    outcome: str
    reason: str
    stages: tuple[StageTimes, ...]
    errors: tuple[str, ...]
    hostname: str
    boot_id: str
    firmware: Firmware | None = None


def _text(value: Any, name: str, limit: int) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValidationError(name, "a string")
    return clean_message(value, limit)


def _errors(value: Any, name: str) -> tuple[str, ...]:
    """A list of error strings, the first ERRORS_MAX kept, each clipped."""
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(e, str) for e in value):
        raise ValidationError(name, "a list of strings")
    return tuple(clean_message(e, ERROR_CHARS) for e in value[:ERRORS_MAX])


def _time(value: Any, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 4e9:
        raise ValidationError(name, "an epoch time in seconds, or null")
    return float(value)


def parse_stages(value: Any) -> tuple[StageTimes, ...]:
    """``cloud_init.stages``: at most STAGES_MAX, ordered as cloud-init runs them."""
    if value is None:
        return ()
    if not isinstance(value, dict):
        raise ValidationError("cloud_init.stages", "an object of stage name to its times")
    if len(value) > STAGES_MAX:
        raise ValidationError("cloud_init.stages", f"at most {STAGES_MAX} stages")
    stages: list[StageTimes] = []
    for name, times in value.items():
        where = f"cloud_init.stages.{str(name)[:32]}"
        if not isinstance(name, str) or not _STAGE_NAME_RE.fullmatch(name):
            raise ValidationError(where, "a stage name of a-z, 0-9 and '-'")
        if not isinstance(times, dict):
            raise ValidationError(where, 'an object {"start", "finished", "errors"}')
        stages.append(StageTimes(name, _time(times.get("start"), where + ".start"),
                                 _time(times.get("finished"), where + ".finished"),
                                 _errors(times.get("errors"), where + ".errors")))
    order = {n: i for i, n in enumerate(REPORT_STAGES)}
    return tuple(sorted(stages, key=lambda s: (order.get(s.name, len(order)), s.start or 0.0)))


def parse_firmware(value: Any) -> Firmware | None:
    """The report's ``firmware``; None when absent or null.  BIOS has no
    Secure Boot: a BIOS report that says otherwise, or does not say, is
    refused rather than believed."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise ValidationError("firmware", 'an object {"mode", "secure_boot"}')
    mode = value.get("mode")
    if mode not in FIRMWARE_MODES:
        raise ValidationError("firmware.mode", "one of " + ", ".join(FIRMWARE_MODES))
    if "secure_boot" not in value:
        raise ValidationError("firmware.secure_boot", "true, false or null")
    secure_boot = value["secure_boot"]
    if mode == "bios" and secure_boot is not False:
        raise ValidationError("firmware.secure_boot", "false under BIOS")
    if secure_boot is not None and not isinstance(secure_boot, bool):
        raise ValidationError("firmware.secure_boot", "true, false or null")
    return Firmware(str(mode), secure_boot)


def firmware_line(firmware: Firmware) -> str:
    """The firmware's line in the task's log."""
    if firmware.mode == "bios":
        return "installed system booted BIOS (no Secure Boot)"
    state = {True: "on", False: "off", None: "unknown"}[firmware.secure_boot]
    return f"installed system booted UEFI, Secure Boot {state}"


def parse_report(body: dict[str, Any]) -> CloudInitReport:
    """A cloud-init report, checked; ValidationError naming the field.

    The outcome is the node's rule, from cloud-init's own status: ``done``
    succeeds, anything else fails; a body whose ``status`` says otherwise is
    refused rather than believed.  The reason of a failure is the report's
    message, else cloud-init's first error."""
    seq = body.get("seq", 1)
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < REPORT_SEQ_MAX:
        raise ValidationError("seq", f"an integer from 0 to {REPORT_SEQ_MAX - 1}")
    ci = body.get("cloud_init")
    if not isinstance(ci, dict):
        raise ValidationError("cloud_init", 'an object {"status", "stages", "errors"}')
    status = ci.get("status")
    if status not in CLOUD_INIT_STATUSES:
        raise ValidationError("cloud_init.status", "one of " + ", ".join(CLOUD_INIT_STATUSES))
    outcome = "succeeded" if status == "done" else "failed"
    if body.get("status") != outcome:
        raise ValidationError("status", f"'{outcome}' for a cloud-init run that is {status}")
    errors = _errors(ci.get("errors"), "cloud_init.errors")
    recoverable = _errors(ci.get("recoverable_errors"), "cloud_init.recoverable_errors")
    stages = parse_stages(ci.get("stages"))
    message = _text(body.get("message"), "message", REASON_CHARS)
    if not message and outcome == "failed":
        first = (errors or recoverable or ("no reason given",))[0]
        message = clean_message(f"cloud-init {status}: {first}", REASON_CHARS)
    if not message:
        message = "cloud-init done"
    return CloudInitReport(seq, str(status), outcome, message, stages, errors,
                           _text(body.get("hostname"), "hostname", 64),
                           _text(body.get("boot_id"), "boot_id", 64),
                           parse_firmware(body.get("firmware")))


def iso_time(t: float | None) -> str:
    """``t`` (epoch seconds) as ISO 8601 UTC to the millisecond; ``""`` for None."""
    if t is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def stage_line(stage: StageTimes) -> str:
    """A stage's line in the task's log."""
    took = f" ({stage.seconds:.1f} s)" if stage.seconds is not None else ""
    end = f"finished {iso_time(stage.finished)}" if stage.finished is not None \
        else "not finished"
    errors = ""
    if stage.errors:
        errors = f", {len(stage.errors)} error{'s' if len(stage.errors) > 1 else ''}: " \
                 f"{stage.errors[0]}"
    return f"started {iso_time(stage.start) or '?'}, {end}{took}{errors}"


def parse_cloud_init_report(body: dict[str, Any], *, now: float) -> Callback:
    """The report as events (a log line per stage, one for the firmware
    when the report names it, then the task's state with cloud-init's
    reason) and marks (one per stage, then the result).

    The result mark's ``firmware`` is ``""`` and its ``secure_boot`` None
    when the report does not say; such a report gives no firmware line, so
    it gives the events it gave before the field existed."""
    report = parse_report(body)
    base = report.seq * 16
    events = [ProgressEvent.from_dict({
        "source": "cloud-init", "seq": base + i, "kind": "log", "step": stage.name,
        "message": stage_line(stage), "at": now}) for i, stage in enumerate(report.stages)]
    if report.firmware is not None:
        events.append(ProgressEvent.from_dict({
            "source": "cloud-init", "seq": base + _FIRMWARE_SLOT, "kind": "log",
            "message": firmware_line(report.firmware), "at": now}))
    events.append(ProgressEvent.from_dict({
        "source": "cloud-init", "seq": base + _STATE_SLOT, "kind": "state",
        "status": report.outcome, "message": report.reason, "at": now}))
    marks = [Mark(f"cloud-init {s.name}", {
        "start": iso_time(s.start), "finished": iso_time(s.finished), "seconds": s.seconds,
        "errors": len(s.errors), "error": s.errors[0][:200] if s.errors else ""})
        for s in report.stages]
    marks.append(Mark("cloud-init result", {
        "status": report.status, "task": report.outcome, "message": report.reason[:200],
        "errors": len(report.errors), "hostname": report.hostname, "boot_id": report.boot_id,
        "firmware": report.firmware.mode if report.firmware else "",
        "secure_boot": report.firmware.secure_boot if report.firmware else None}))
    return Callback("cloud-init", tuple(events), tuple(marks))


# --- cloud-init's own reporting webhook ------------------------------------------------------


def parse_cloud_init_webhook(body: dict[str, Any], *, now: float) -> Callback:
    """One cloud-init reporting event.  A stage's start or finish (a name
    without '/') is a timeline mark; a module's (``stage/module``) is
    dropped unless it finished WARN or FAIL, which, like a stage that
    did, adds a line to the task's log.  Never a state event.  Event types
    other than start and finish are acknowledged and ignored."""
    name = body.get("name")
    if not isinstance(name, str) or not name or len(name) > NAME_CHARS:
        raise ValidationError("name", f"the event's name, 1-{NAME_CHARS} characters")
    name = clean_message(name, NAME_CHARS)
    event_type = body.get("event_type")
    if event_type not in ("start", "finish"):
        return Callback("cloudinit-webhook", (), ())
    result = body.get("result")
    if event_type == "finish" and result not in WEBHOOK_RESULTS:
        raise ValidationError("result", "one of " + ", ".join(sorted(WEBHOOK_RESULTS)))
    description = _text(body.get("description"), "description", ERROR_CHARS)
    ts = _stamp(body.get("timestamp"), now)
    marks: tuple[Mark, ...] = ()
    if "/" not in name and name in WEBHOOK_STAGES:
        detail: dict[str, Any] = {"at_machine": iso_time(ts), "description": description[:200]}
        if event_type == "finish":
            detail["result"] = result
        marks = (Mark(f"cloud-init {name} {event_type}", detail),)
    events: tuple[ProgressEvent, ...] = ()
    if event_type == "finish" and result in ("WARN", "FAIL"):
        events = (ProgressEvent.from_dict({
            "source": "cloudinit", "seq": int(ts * 1_000_000), "kind": "log",
            "step": name[:64], "message": f"{result}: {description or name}", "at": ts}),)
    return Callback("cloudinit-webhook", events, marks)
