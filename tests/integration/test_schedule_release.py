"""Scheduling and release through the real control plane on a real etcd
(issue #21): a task's schedule set at creation and changed by an approver,
bad input refused with nothing changed, the approval's power cycle
carrying the schedule (and rewritten with it); a release of a finished
machine, confirmed by a node's fresh read + CAS, ending ``released`` from
the agent's own report, after which nothing wipes it again."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from bootsvc.state.claim import claim_release
from lpmos.models import ProgressEvent
from lpmos.power import PowerRequest, decide_claim, finish
from lpmos.schedule import parse_not_before
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from web.testing import WebEnv

LATER = "2030-06-01T22:30:00Z"


@pytest.fixture
def env(etcd_store: EtcdStore, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys)
    yield e
    e.close()


def _sn() -> str:
    return "sn-" + uuid.uuid4().hex[:10]


def _body(sn: str, **extra: Any) -> dict[str, Any]:
    return {"idc": "dc1", "sn": sn, "mac": "02:00:00:00:10:01", "os_type": "Ubuntu 22.04",
            "os_version": "22.04", **extra}


def _call(env: WebEnv, method: str, path: str, role: str, body: Any = None) -> Any:
    r = env.app.test_client().open(path, method=method, headers=env.headers(role),
                                   data=json.dumps(body) if body is not None else None)
    return r.status_code, r.get_json()


def _bmc(env: WebEnv, sn: str) -> None:
    code, body = _call(env, "PUT", f"/api/v1/servers/dc1/{sn}/bmc", "admin",
                       {"driver": "redfish", "address": "192.0.2.20", "user": "root",
                        "password": "bmc-secret-2"})
    assert code == 200, body


def _requests(store: EtcdStore, keys: Keys, sn: str) -> list[PowerRequest]:
    return [PowerRequest.from_json(kv.value)
            for kv in store.range(keys.power_requests("dc1", sn)).items]


def test_a_schedule_is_set_at_creation_and_shown(env: WebEnv) -> None:
    sn = _sn()
    code, body = _call(env, "POST", "/api/v1/tasks", "operator",
                       _body(sn, not_before="2030-06-01T23:30+01:00", window="22:00-04:00"))
    assert code == 201, body
    task = body["task"]
    assert task["not_before"] == parse_not_before(LATER) and task["window"] == "22:00-04:00"
    assert task["schedule"] == {
        "not_before": "2030-06-01T22:30:00Z", "window": "22:00-04:00",
        "summary": "not before 2030-06-01 22:30 UTC, window 22:00-04:00 UTC daily",
        "waiting": True, "starts_at": "2030-06-01T22:30:00Z",
        "reason": "scheduled: not before 2030-06-01 22:30 UTC, maintenance window "
                  "22:00-04:00 UTC daily; starts at 2030-06-01 22:30 UTC"}
    code, listed = _call(env, "GET", "/api/v1/tasks?q=" + sn, "viewer")
    assert listed["items"][0]["window"] == "22:00-04:00"


@pytest.mark.parametrize("extra,field,words", [
    ({"not_before": "2030-06-01T22:30:00"}, "not_before", "time zone"),
    ({"not_before": "next tuesday"}, "not_before", "not an ISO 8601"),
    ({"not_before": 1_900_000_000}, "not_before", "a string"),
    ({"window": "22:00-22:00"}, "window", "must differ"),
    ({"window": "25:00-02:00"}, "window", "hours 00-23"),
    ({"window": "22:00"}, "window", "HH:MM-HH:MM"),
])
def test_bad_schedule_at_creation_is_400_and_creates_nothing(env: WebEnv, extra: dict[str, Any],
                                                             field: str, words: str) -> None:
    sn = _sn()
    code, body = _call(env, "POST", "/api/v1/tasks", "operator", _body(sn, **extra))
    assert code == 400, body
    assert words in body["detail"] and body.get("field") == field
    assert env.store.get(env.keys.task("dc1", sn)) is None


def test_an_approver_changes_the_schedule_and_the_queued_power_cycle_with_it(
        env: WebEnv, etcd_store: EtcdStore, keys: Keys) -> None:
    sn = _sn()
    assert _call(env, "POST", "/api/v1/tasks", "operator", _body(sn))[0] == 201
    _bmc(env, sn)
    # an operator may not reschedule; bad input changes nothing
    before = etcd_store.get(keys.task("dc1", sn))
    assert before is not None
    assert _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "operator",
                 {"window": "22:00-04:00"})[0] == 403
    for bad in ({"window": "4:00-4:00"}, {"not_before": "2030-02-30T00:00Z"},
                {"not_before": "soon"}, {"when": "now"}):
        code, body = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver", bad)
        assert code == 400, (bad, body)
        assert body["detail"]
    after = etcd_store.get(keys.task("dc1", sn))
    assert after is not None and after.mod_revision == before.mod_revision
    # approved with a schedule: the power cycle is queued, and waits for it
    code, body = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver",
                       {"not_before": LATER})
    assert code == 200 and body["task"]["schedule"]["waiting"], body
    code, body = _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/approve", "approver", {})
    assert code == 200, body
    [req] = _requests(etcd_store, keys, sn)
    assert (req.not_before, req.window) == (parse_not_before(LATER), "")
    assert decide_claim(req, time.time()).what == "wait"
    assert "when its schedule lets it start" in \
        body["task"]["logs"][-1]
    # rescheduled: the task and its queued request change in one revision
    code, body = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver",
                       {"window": "01:00-03:00", "revision": body["revision"]})
    assert code == 200, body
    assert body["power_requests"] == [req.id]
    [moved] = _requests(etcd_store, keys, sn)
    assert (moved.not_before, moved.window) == (0.0, "01:00-03:00")
    kv = etcd_store.get(keys.power_request("dc1", sn, req.id))
    assert kv is not None and kv.mod_revision == body["revision"]
    assert body["task"]["logs"][-1].startswith("schedule set by approver1: window 01:00-03:00")
    # a stale revision is refused
    code, _ = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver",
                    {"revision": body["revision"] - 1})
    assert code == 409
    # cleared: the request may be carried out now
    code, body = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver", {})
    assert code == 200 and not body["task"]["schedule"]["waiting"]
    [now_due] = _requests(etcd_store, keys, sn)
    assert decide_claim(now_due, time.time()).what == "claim"


def test_a_schedule_cannot_change_once_the_install_started(env: WebEnv, etcd_store: EtcdStore,
                                                           keys: Keys) -> None:
    sn = _sn()
    assert _call(env, "POST", "/api/v1/tasks", "operator", _body(sn))[0] == 201
    svc = TaskService(etcd_store, keys)
    svc.transition("dc1", sn, "approved", by="approver2")
    svc.transition("dc1", sn, "booting", by="node:n1")
    code, body = _call(env, "PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver",
                       {"window": "22:00-04:00"})
    assert code == 409 and "can no longer change" in body["detail"]


def test_release_wipes_through_the_agent_and_ends_released(env: WebEnv, etcd_store: EtcdStore,
                                                           keys: Keys) -> None:
    sn = _sn()
    svc = TaskService(etcd_store, keys)
    assert _call(env, "POST", "/api/v1/tasks", "operator", _body(sn))[0] == 201
    # a pending task is not released
    code, body = _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "approver", {})
    assert code == 409 and "pending" in body["detail"]
    assert _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "operator", {})[0] == 403
    svc.transition("dc1", sn, "approved", by="approver2")
    svc.transition("dc1", sn, "booting", by="node:n1")
    svc.transition("dc1", sn, "succeeded", by="node:n1")
    _bmc(env, sn)
    code, body = _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "approver",
                       {"notes": "decommission rack 4"})
    assert code == 200, body
    task = body["task"]
    assert (task["status"], task["attempt"], task["approved_by"]) == ("releasing", 2,
                                                                      "approver1")
    [req] = _requests(etcd_store, keys, sn)
    assert req.action == "provision" and req.task_attempt == 2 and body["power_request"] == req.id
    assert decide_claim(req, time.time()).what == "claim"       # a release is not scheduled
    # an agent already running there does not start a wipe that the BMC's coming
    # power cycle would cut off: the machine's next boot, from the network, wipes
    early = claim_release(etcd_store, keys, idc="dc1", sn=sn, node="n1")
    assert not early.install and early.reason == (
        f"the BMC is to power-cycle the machine into PXE for attempt 2 ({req.id}, queued); "
        "the wipe starts from that boot")
    for step in req.steps:
        step.state = "done"
    finish(req, time.time())
    etcd_store.put(keys.power_request("dc1", sn, req.id), req.to_json())
    # the node confirms with a fresh read + CAS before its agent wipes anything
    first = claim_release(etcd_store, keys, idc="dc1", sn=sn, node="n1")
    assert first.install and first.task is not None and first.task.claimed_by == "n1"
    stored = svc.get("dc1", sn)
    assert stored is not None and stored.revision == first.revision
    assert stored.task.attempt_nodes["2"] == "n1"
    again = claim_release(etcd_store, keys, idc="dc1", sn=sn, node="n1")
    assert again.install and again.revision == first.revision     # no second write
    # the agent's report: one line per disk, then released
    events = [
        ProgressEvent("agent", 1, "progress", step="wiping",
                      message="/dev/sda: wiped: wipefs on the disk, sgdisk --zap-all, "
                              "blkdiscard (the disk supports discard)"),
        ProgressEvent("agent", 2, "state", status="released", step="released",
                      message="1 disk(s) wiped; powering off through the BMC")]
    done, applied = svc.apply_events("dc1", sn, [e.validate() for e in events], by="agent")
    assert applied == ["agent:1", "agent:2"]
    assert done.task.status == "released" and done.task.finished_at > 0
    assert any("blkdiscard" in line for line in done.task.logs)
    # released is final: no node has it wiped again, and a new task may replace it
    late = claim_release(etcd_store, keys, idc="dc1", sn=sn, node="n2")
    assert not late.install and late.reason == "the task is now released"
    assert _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "approver", {})[0] == 409
    code, body = _call(env, "POST", "/api/v1/tasks", "operator", _body(sn))
    assert code == 201 and body["task"]["status"] == "pending"


def test_a_failed_release_is_failed_with_the_agents_reason(env: WebEnv, etcd_store: EtcdStore,
                                                           keys: Keys) -> None:
    sn = _sn()
    svc = TaskService(etcd_store, keys)
    assert _call(env, "POST", "/api/v1/tasks", "operator", _body(sn))[0] == 201
    svc.transition("dc1", sn, "approved", by="approver2")
    svc.transition("dc1", sn, "failed", by="node:n1", reason="never claimed")
    code, body = _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "approver", {})
    assert code == 200 and body["task"]["status"] == "releasing"
    assert body.get("power_request") is None              # no BMC: someone powers it on
    fail = ProgressEvent("agent", 1, "state", status="failed", step="failed",
                         message="release: /dev/sda: wipefs failed (1): Device busy").validate()
    done, _ = svc.apply_events("dc1", sn, [fail], by="agent")
    assert done.task.status == "failed" and "Device busy" in done.task.reason
    # it may be released again
    code, body = _call(env, "POST", f"/api/v1/tasks/dc1/{sn}/release", "approver", {})
    assert code == 200 and body["task"]["attempt"] == 3
