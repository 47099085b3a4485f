"""bootsvc/http/callback_body.py as tables: which shape a body is, the
events and timeline marks each gives, and why a bad one is refused.

The reports are what templates/cloud-init/lpmos-report.py sends (its
``build_report`` on cloud-init 22.4's files, see test_lpmos_report.py); the
webhook events are cloud-init 22.4's ``reporting`` events as its webhook
handler posts them (``as_dict()``: name, description, event_type, origin,
timestamp, and result on finish)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from bootsvc.http.callback_body import (
    ERRORS_MAX,
    REASON_CHARS,
    STAGES_MAX,
    parse_callback,
    parse_report,
)
from lpmos.models import ValidationError

NOW = 1_800_000_000.0
T0 = 1_799_999_900.0
RUNCMD = "('scripts_user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))"


def stages(final_errors: list[str] | None = None) -> dict[str, Any]:
    return {
        "init-local": {"start": T0, "finished": T0 + 1.5, "errors": []},
        "init": {"start": T0 + 2, "finished": T0 + 6.25, "errors": []},
        "modules-config": {"start": T0 + 7, "finished": T0 + 9, "errors": []},
        "modules-final": {"start": T0 + 10, "finished": T0 + 30, "errors": final_errors or []},
    }


SUCCESS: dict[str, Any] = {
    "event": "cloud-init", "status": "succeeded", "seq": 3,
    "message": "cloud-init done in 30 s (init-local, init, modules-config, modules-final)",
    "cloud_init": {"status": "done", "stages": stages(), "errors": [], "recoverable_errors": []},
    "hostname": "web-1", "boot_id": "0f3a4c1e-1111-2222-3333-444455556666"}
FAILURE: dict[str, Any] = {
    "event": "cloud-init", "status": "failed", "seq": 3,
    "message": f"cloud-init failed: modules-final: {RUNCMD}",
    "cloud_init": {"status": "error", "stages": stages([RUNCMD]),
                   "errors": [f"modules-final: {RUNCMD}"], "recoverable_errors": []},
    "hostname": "web-1", "boot_id": "b"}


def with_(base: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """``base`` with the field at dotted ``path`` set (``...=DELETE`` removes it)."""
    body = copy.deepcopy(base)
    *parents, last = path.split(".")
    here = body
    for p in parents:
        here = here[p]
    if value is DELETE:
        del here[last]
    else:
        here[last] = value
    return body


DELETE = object()


def hook(name: str, event_type: str, result: str | None = None,
         description: str = "running", ts: float = T0 + 1.25) -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "description": description, "event_type": event_type,
                            "origin": "cloudinit", "timestamp": ts}
    if result is not None:
        body["result"] = result
    return body


# --- the cloud-init report ----------------------------------------------------------------


def test_a_success_report_succeeds_the_task_and_marks_each_stage() -> None:
    cb = parse_callback(SUCCESS, now=NOW)
    assert cb.shape == "cloud-init"
    *logs, state = cb.events
    assert (state.source, state.seq, state.kind, state.status) == ("cloud-init", 3 * 16 + 15,
                                                                   "state", "succeeded")
    assert state.message == SUCCESS["message"]
    assert [(e.seq, e.kind, e.step) for e in logs] == [
        (48, "log", "init-local"), (49, "log", "init"), (50, "log", "modules-config"),
        (51, "log", "modules-final")]
    assert logs[1].message == ("started 2027-01-15T07:58:22.000Z, "
                               "finished 2027-01-15T07:58:26.250Z (4.2 s)")
    assert [m.stage for m in cb.marks] == [
        "cloud-init init-local", "cloud-init init", "cloud-init modules-config",
        "cloud-init modules-final", "cloud-init result"]
    assert cb.marks[0].detail == {"start": "2027-01-15T07:58:20.000Z",
                                  "finished": "2027-01-15T07:58:21.500Z", "seconds": 1.5,
                                  "errors": 0, "error": ""}
    assert cb.marks[-1].detail["status"] == "done" and cb.marks[-1].detail["task"] == "succeeded"
    assert cb.marks[-1].detail["hostname"] == "web-1"


def test_a_failure_report_fails_the_task_with_cloud_inits_reason() -> None:
    cb = parse_callback(FAILURE, now=NOW)
    state = cb.events[-1]
    assert state.status == "failed"
    assert state.message == f"cloud-init failed: modules-final: {RUNCMD}"
    assert cb.events[3].message.endswith(f"(20.0 s), 1 error: {RUNCMD}")
    assert cb.marks[3].detail["errors"] == 1 and cb.marks[3].detail["error"] == RUNCMD
    assert cb.marks[-1].detail["status"] == "error" and cb.marks[-1].detail["errors"] == 1


@pytest.mark.parametrize("ci_status, outcome, message, reason", [
    ("done", "succeeded", "", "cloud-init done"),
    ("error", "failed", "", f"cloud-init error: modules-final: {RUNCMD}"),
    ("degraded", "failed", "", f"cloud-init degraded: modules-final: {RUNCMD}"),
    ("running", "failed", "cloud-init did not finish in modules-final",
     "cloud-init did not finish in modules-final"),
    ("error", "failed", "x" * 2000, "x" * REASON_CHARS),
    ("error", "failed", "line one\nline two", "line one line two"),
])
def test_the_outcome_and_reason_come_from_cloud_inits_status(
        ci_status: str, outcome: str, message: str, reason: str) -> None:
    body = with_(with_(with_(FAILURE, "cloud_init.status", ci_status), "status", outcome),
                 "message", message)
    report = parse_report(body)
    assert (report.status, report.outcome, report.reason) == (ci_status, outcome, reason)


def test_a_report_with_no_errors_and_no_message_still_gives_a_reason() -> None:
    body = with_(with_(FAILURE, "cloud_init.errors", []), "message", "")
    assert parse_report(body).reason == "cloud-init error: no reason given"


def test_stages_are_in_cloud_inits_order_and_unknown_ones_last() -> None:
    raw = {"modules-final": {"start": T0 + 10, "finished": None},
           "zz-future": {"start": T0 + 40, "finished": T0 + 41},
           "init-local": {"start": T0, "finished": T0 + 1}}
    report = parse_report(with_(SUCCESS, "cloud_init.stages", raw))
    assert [s.name for s in report.stages] == ["init-local", "modules-final", "zz-future"]
    assert report.stages[1].seconds is None
    cb = parse_callback(with_(SUCCESS, "cloud_init.stages", raw), now=NOW)
    assert cb.events[1].message == "started 2027-01-15T07:58:30.000Z, not finished"


def test_lists_are_bounded_not_refused() -> None:
    many = [f"e{i}" for i in range(500)]
    report = parse_report(with_(with_(FAILURE, "cloud_init.errors", many),
                                "cloud_init.stages.init.errors", ["y" * 5000]))
    assert len(report.errors) == ERRORS_MAX
    assert len(report.stages[1].errors[0]) == 300


def test_a_repeated_report_gives_the_same_event_ids() -> None:
    first = [e.event_id for e in parse_callback(FAILURE, now=NOW).events]
    again = [e.event_id for e in parse_callback(FAILURE, now=NOW + 60).events]
    assert first == again


@pytest.mark.parametrize("path, value, field", [
    ("status", "succeeded", "status"),                 # cloud-init said error
    ("status", DELETE, "status"),
    ("cloud_init", DELETE, "cloud_init"),
    ("cloud_init", "done", "cloud_init"),
    ("cloud_init.status", "fine", "cloud_init.status"),
    ("cloud_init.errors", "boom", "cloud_init.errors"),
    ("cloud_init.errors", [1, 2], "cloud_init.errors"),
    ("cloud_init.recoverable_errors", {"WARNING": []}, "cloud_init.recoverable_errors"),
    ("cloud_init.stages", ["init"], "cloud_init.stages"),
    ("cloud_init.stages", {f"s{i}": {} for i in range(STAGES_MAX + 1)}, "cloud_init.stages"),
    ("cloud_init.stages", {"Init Local": {}}, "cloud_init.stages.Init Local"),
    ("cloud_init.stages.init", [1], "cloud_init.stages.init"),
    ("cloud_init.stages.init.start", "yesterday", "cloud_init.stages.init.start"),
    ("cloud_init.stages.init.start", -5, "cloud_init.stages.init.start"),
    ("cloud_init.stages.init.finished", True, "cloud_init.stages.init.finished"),
    ("cloud_init.stages.init.errors", "x", "cloud_init.stages.init.errors"),
    ("seq", -1, "seq"),
    ("seq", 2**50, "seq"),
    ("seq", "3", "seq"),
    ("message", ["x"], "message"),
    ("hostname", 7, "hostname"),
])
def test_a_bad_report_is_refused_naming_the_field(path: str, value: Any, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_callback(with_(FAILURE, path, value), now=NOW)
    assert err.value.field == field


@pytest.mark.parametrize("firmware, line, mode, secure_boot", [
    ({"mode": "uefi", "secure_boot": True}, "installed system booted UEFI, Secure Boot on",
     "uefi", True),
    ({"mode": "uefi", "secure_boot": False}, "installed system booted UEFI, Secure Boot off",
     "uefi", False),
    ({"mode": "uefi", "secure_boot": None}, "installed system booted UEFI, Secure Boot unknown",
     "uefi", None),
    ({"mode": "bios", "secure_boot": False}, "installed system booted BIOS (no Secure Boot)",
     "bios", False),
    ({"mode": "uefi", "secure_boot": True, "setup_mode": False},   # a newer field: ignored
     "installed system booted UEFI, Secure Boot on", "uefi", True),
])
def test_the_firmware_is_a_log_line_and_in_the_result_mark(
        firmware: dict[str, Any], line: str, mode: str, secure_boot: bool | None) -> None:
    cb = parse_callback(with_(SUCCESS, "firmware", firmware), now=NOW)
    *stage_logs, fw, state = cb.events
    assert [e.seq for e in stage_logs] == [48, 49, 50, 51]
    assert (fw.source, fw.seq, fw.kind, fw.step, fw.status) == ("cloud-init", 3 * 16 + 14,
                                                                "log", "", "")
    assert fw.log_line() == f"[cloud-init] {line}"
    assert (state.seq, state.status) == (3 * 16 + 15, "succeeded")
    result = cb.marks[-1]
    assert result.stage == "cloud-init result"
    assert (result.detail["firmware"], result.detail["secure_boot"]) == (mode, secure_boot)


@pytest.mark.parametrize("body", [SUCCESS, with_(SUCCESS, "firmware", None)])
def test_a_report_without_firmware_is_unknown_and_gives_the_events_it_gave_before(
        body: dict[str, Any]) -> None:
    assert "firmware" not in SUCCESS            # an lpmos-report older than the field
    assert parse_report(body).firmware is None
    cb = parse_callback(body, now=NOW)
    assert [(e.seq, e.kind) for e in cb.events] == [
        (48, "log"), (49, "log"), (50, "log"), (51, "log"), (63, "state")]
    assert cb.marks[-1].detail == {
        "status": "done", "task": "succeeded", "message": SUCCESS["message"], "errors": 0,
        "hostname": "web-1", "boot_id": "0f3a4c1e-1111-2222-3333-444455556666",
        "firmware": "", "secure_boot": None}


def test_the_firmware_line_keeps_clear_of_the_stage_slots() -> None:
    """STAGES_MAX stages take seq * 16 + 0..7; the firmware line and the
    state follow them, in the report's own block of 16."""
    many = {f"s{i}": {"start": T0 + i, "finished": T0 + i + 1} for i in range(STAGES_MAX)}
    body = with_(with_(SUCCESS, "cloud_init.stages", many), "firmware",
                 {"mode": "uefi", "secure_boot": True})
    seqs = [e.seq for e in parse_callback(body, now=NOW).events]
    assert seqs == [*range(48, 48 + STAGES_MAX), 62, 63]


@pytest.mark.parametrize("firmware, field", [
    ("uefi", "firmware"),
    (["uefi", True], "firmware"),
    (True, "firmware"),
    ({}, "firmware.mode"),
    ({"secure_boot": True}, "firmware.mode"),
    ({"mode": "UEFI", "secure_boot": True}, "firmware.mode"),
    ({"mode": "efi", "secure_boot": True}, "firmware.mode"),
    ({"mode": None, "secure_boot": None}, "firmware.mode"),
    ({"mode": "uefi"}, "firmware.secure_boot"),
    ({"mode": "uefi", "secure_boot": 1}, "firmware.secure_boot"),
    ({"mode": "uefi", "secure_boot": 0}, "firmware.secure_boot"),
    ({"mode": "uefi", "secure_boot": "on"}, "firmware.secure_boot"),
    ({"mode": "uefi", "secure_boot": "true"}, "firmware.secure_boot"),
    ({"mode": "bios", "secure_boot": True}, "firmware.secure_boot"),   # BIOS has none
    ({"mode": "bios", "secure_boot": None}, "firmware.secure_boot"),
    ({"mode": "bios", "secure_boot": 0}, "firmware.secure_boot"),
    ({"mode": "bios"}, "firmware.secure_boot"),
])
def test_a_bad_firmware_is_refused_naming_the_field(firmware: Any, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_callback(with_(SUCCESS, "firmware", firmware), now=NOW)
    assert err.value.field == field


# --- cloud-init's reporting webhook -------------------------------------------------------


@pytest.mark.parametrize("body, marks, logs", [
    # a stage's start and finish: timeline only
    (hook("init-local", "start", description="searching for local datasources"),
     ["cloud-init init-local start"], []),
    (hook("init-network", "finish", "SUCCESS"), ["cloud-init init-network finish"], []),
    (hook("modules-final", "finish", "FAIL", "running modules for final"),
     ["cloud-init modules-final finish"],
     ["[cloudinit] modules-final: FAIL: running modules for final"]),
    # a module: nothing unless it warned or failed
    (hook("init-network/config-ssh", "start"), [], []),
    (hook("modules-config/config-runcmd", "finish", "SUCCESS"), [], []),
    (hook("modules-final/config-scripts-user", "finish", "FAIL",
          "running config-scripts-user with frequency once-per-instance"),
     [], ["[cloudinit] modules-final/config-scripts-user: FAIL: running config-scripts-user "
          "with frequency once-per-instance"]),
    (hook("init-network/config-growpart", "finish", "WARN", ""),
     [], ["[cloudinit] init-network/config-growpart: WARN: init-network/config-growpart"]),
    # a top-level name that is no stage is treated as a module
    (hook("azure-ds", "finish", "SUCCESS"), [], []),
    # other event types are acknowledged and ignored
    ({**hook("init-local", "start"), "event_type": "log"}, [], []),
])
def test_webhook_events_mark_stages_and_log_only_problems(
        body: dict[str, Any], marks: list[str], logs: list[str]) -> None:
    cb = parse_callback(body, now=NOW)
    assert cb.shape == "cloudinit-webhook"
    assert [m.stage for m in cb.marks] == marks
    assert [e.log_line() for e in cb.events] == logs
    assert all(e.kind == "log" and e.source == "cloudinit" for e in cb.events)


def test_a_stage_mark_carries_the_machines_time_and_result() -> None:
    cb = parse_callback(hook("modules-final", "finish", "SUCCESS", "running modules for final",
                             ts=T0 + 30.5), now=NOW)
    assert cb.marks[0].detail == {"at_machine": "2027-01-15T07:58:50.500Z",
                                  "description": "running modules for final",
                                  "result": "SUCCESS"}


def test_webhook_log_events_are_ordered_by_their_timestamp() -> None:
    a = parse_callback(hook("m/a", "finish", "WARN", ts=T0 + 1), now=NOW).events[0]
    b = parse_callback(hook("m/b", "finish", "FAIL", ts=T0 + 2), now=NOW).events[0]
    absurd = parse_callback({**hook("m/c", "finish", "FAIL"), "timestamp": 1e12},
                            now=NOW).events[0]
    assert a.seq < b.seq < absurd.seq == int(NOW * 1_000_000)


@pytest.mark.parametrize("body, field", [
    ({**hook("x", "start"), "name": 5}, "name"),
    ({**hook("x", "start"), "name": ""}, "name"),
    ({**hook("x", "start"), "name": "n" * 201}, "name"),
    (hook("modules-final", "finish"), "result"),                 # finish without a result
    (hook("modules-final", "finish", "MAYBE"), "result"),
    ({**hook("modules-final", "start"), "description": {"a": 1}}, "description"),
])
def test_a_bad_webhook_event_is_refused_naming_the_field(body: dict[str, Any],
                                                         field: str) -> None:
    with pytest.raises(ValidationError) as err:
        parse_callback(body, now=NOW)
    assert err.value.field == field


# --- the other shapes, unchanged ------------------------------------------------------------


@pytest.mark.parametrize("body, shape, source, kind, status", [
    ({"event": "firstboot", "status": "succeeded", "message": "up"}, "callback", "firstboot",
     "state", "succeeded"),
    ({"event": "installer", "status": "progress", "percent": 140, "seq": 2}, "callback",
     "installer", "progress", ""),
    ({"event": "9lives", "status": "note"}, "callback", "callback", "log", ""),
    ({"event_type": "start", "origin": "curtin", "name": "cmd-install/stage-partitioning",
      "description": "configuring storage", "timestamp": T0}, "autoinstall", "autoinstall",
     "log", ""),
])
def test_our_callback_and_the_autoinstall_webhook(body: dict[str, Any], shape: str,
                                                  source: str, kind: str, status: str) -> None:
    cb = parse_callback(body, now=NOW)
    assert cb.shape == shape and len(cb.events) == 1
    ev = cb.events[0]
    assert (ev.source, ev.kind, ev.status) == (source, kind, status)
    assert [m.stage for m in cb.marks] == ["callback"]
    assert ev.percent in (None, 100.0)


@pytest.mark.parametrize("body", [[1, 2], "x", None, 3])
def test_a_body_that_is_no_object_is_refused(body: Any) -> None:
    with pytest.raises(ValidationError) as err:
        parse_callback(body, now=NOW)
    assert err.value.field == "body"


# --- the contract with templates/cloud-init/lpmos-report.py --------------------------------


def _report_script() -> Any:
    import importlib.util
    path = Path(__file__).resolve().parents[2] / "templates" / "cloud-init" / "lpmos-report.py"
    spec = importlib.util.spec_from_file_location("lpmos_report", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("v1_stages, rc, outcome", [
    (stages(), 0, "succeeded"),
    (stages([RUNCMD]), 1, "failed"),
    ({**stages(), "modules-config": {"start": T0 + 7, "finished": T0 + 9, "errors": [],
                                     "recoverable_errors": {"WARNING": ["w"]}}}, 2, "failed"),
    ({**stages(), "modules-final": {"start": T0 + 10, "finished": None, "errors": []}}, None,
     "failed"),
])
def test_what_the_script_sends_the_node_takes(v1_stages: dict[str, Any], rc: int | None,
                                              outcome: str) -> None:
    script = _report_script()
    errors = [e for s in v1_stages.values() for e in s["errors"]]
    summary = script.summarize({"v1": {**v1_stages, "stage": None}},
                               {"v1": {"errors": errors}}, rc)
    body = script.build_report({"seq": 4}, summary, "web-1", "b",
                               {"mode": "uefi", "secure_boot": True})
    cb = parse_callback(body, now=NOW)
    assert cb.events[-1].status == outcome
    assert cb.events[-1].message == body["message"]
    assert cb.events[-2].message == "installed system booted UEFI, Secure Boot on"
    assert [m.stage for m in cb.marks][:-1] == [f"cloud-init {n}" for n in v1_stages]
    assert cb.marks[-1].detail["secure_boot"] is True


@pytest.mark.parametrize("uefi, efivar, mode, secure_boot", [
    (True, b"\x06\x00\x00\x00\x01", "uefi", True),
    (True, b"\x06\x00\x00\x00\x00", "uefi", False),
    (True, None, "uefi", None),
    (False, None, "bios", False),
])
def test_the_firmware_the_script_reads_the_node_takes(
        tmp_path: Path, uefi: bool, efivar: bytes | None, mode: str,
        secure_boot: bool | None) -> None:
    script = _report_script()
    efi = tmp_path / "efi"
    if uefi:
        (efi / "efivars").mkdir(parents=True)
    if efivar is not None:
        (efi / "efivars" / "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c").write_bytes(efivar)
    summary = script.summarize({"v1": {**stages(), "stage": None}}, {"v1": {"errors": []}}, 0)
    body = script.build_report({"seq": 4}, summary, "web-1", "b",
                               script.read_firmware(str(efi)))
    report = parse_report(body)
    assert report.firmware is not None
    assert (report.firmware.mode, report.firmware.secure_boot) == (mode, secure_boot)
