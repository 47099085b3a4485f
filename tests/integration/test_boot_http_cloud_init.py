"""The installed system's cloud-init decides an image install, against a real
etcd and a real node's HTTP service: cloud-init's reporting webhook (the
tokened URL, ``?token=``) marks its stages in the boot timeline and logs
only what went wrong; the final report (templates/cloud-init/lpmos-report.py's
body, ``Authorization: Bearer``) succeeds or fails the task with cloud-init's
reason; bad bodies are refused, counted and change nothing."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog

from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import Stored, TaskService
from tests.prometheus_text import value

MAC = "52:54:00:c1:00:01"
UUID = "4c4c4544-0042-3010-8053-b7c04f4b4d31"
T0 = 1_799_999_900.0
RUNCMD = "('scripts_user', RuntimeError('Runparts: 1 failures (runcmd) in 1 attempted commands'))"


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "images"
    root.mkdir()
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    n = start_node(etcd_server.url, keys, tmp_path / "state", "node-a", write_catalog(root)[0],
                   tftp__root=str(tftp))
    yield n
    n.stop()


@pytest.fixture
def tasks(etcd_store: EtcdStore, keys: Keys) -> TaskService:
    return TaskService(etcd_store, keys)


def machine_in(node: Node, tasks: TaskService, sn: str, status: str) -> str:
    """A registered machine whose task is ``booting`` or ``installing``; its token."""
    reg = requests.post(f"{node.url}/agent/v1/register", timeout=10, json={
        "sn": sn, "uuid": UUID, "macs": [MAC], "boot_mac": MAC, "arch": "x86_64",
        "inventory": {"schema": 1, "system": {"serial": sn}}, "agent_version": "test"})
    assert reg.status_code == 200, reg.text
    token: str = reg.json()["token"]
    tasks.create(Task(idc=IDC, sn=sn, mac=MAC, os_type="Lab OS"), by="alice")
    tasks.transition(IDC, sn, "approved", by="bob")
    tasks.transition(IDC, sn, "booting", by="node-a")
    if status == "installing":
        ev: list[dict[str, Any]] = [
            {"source": "agent", "seq": 1, "kind": "state", "status": "installing",
             "message": "writing the image"},
            {"source": "agent", "seq": 2, "kind": "progress", "step": "rebooting",
             "percent": 100.0}]
        r = requests.post(f"{node.url}/agent/v1/events", json={"sn": sn, "events": ev},
                          headers={"Authorization": f"Bearer {token}"}, timeout=10)
        assert r.json()["task_status"] == "installing", r.text
    return token


def stored(tasks: TaskService, sn: str) -> Stored:
    got = tasks.get(IDC, sn)
    assert got is not None
    return got


def webhook(node: Node, sn: str, token: str, body: dict[str, Any]) -> requests.Response:
    """As cloud-init's webhook handler posts: the tokened URL, no header."""
    return requests.post(f"{node.url}/callback/{sn}?token={token}", json=body, timeout=10)


def report(node: Node, sn: str, token: str, body: dict[str, Any]) -> requests.Response:
    return requests.post(f"{node.url}/callback/{sn}", json=body, timeout=10,
                         headers={"Authorization": f"Bearer {token}"})


def hook(name: str, event_type: str, result: str | None = None, at: float = 0.0,
         description: str = "") -> dict[str, Any]:
    body: dict[str, Any] = {"name": name, "description": description or f"running {name}",
                            "event_type": event_type, "origin": "cloudinit",
                            "timestamp": T0 + at}
    if result:
        body["result"] = result
    return body


def cloud_init_report(final_errors: list[str]) -> dict[str, Any]:
    failed = bool(final_errors)
    return {
        "event": "cloud-init", "status": "failed" if failed else "succeeded", "seq": 1,
        "message": f"cloud-init failed: modules-final: {final_errors[0]}" if failed
        else "cloud-init done in 30 s (init-local, init, modules-config, modules-final)",
        "cloud_init": {
            "status": "error" if failed else "done",
            "stages": {
                "init-local": {"start": T0, "finished": T0 + 1.5, "errors": []},
                "init": {"start": T0 + 2, "finished": T0 + 6, "errors": []},
                "modules-config": {"start": T0 + 7, "finished": T0 + 9, "errors": []},
                "modules-final": {"start": T0 + 10, "finished": T0 + 30,
                                  "errors": final_errors}},
            "errors": [f"modules-final: {e}" for e in final_errors], "recoverable_errors": []},
        "hostname": "web-1", "boot_id": "0f3a4c1e-1111-2222-3333-444455556666"}


STAGE_MARKS = ["cloud-init init-local", "cloud-init init", "cloud-init modules-config",
               "cloud-init modules-final", "cloud-init result"]


def timeline_stages(node: Node, sn: str, wanted: list[str]) -> list[dict[str, Any]]:
    """The machine's stored timeline, once it holds every stage in ``wanted``."""
    def ready() -> list[dict[str, Any]] | None:
        entries = node.timeline.read(sn)
        have = [e["stage"] for e in entries]
        return entries if all(w in have for w in wanted) else None
    found: list[dict[str, Any]] = eventually(ready, timeout=10)
    return found


def test_cloud_init_done_succeeds_an_installing_task(node: Node, tasks: TaskService) -> None:
    sn = "CI-OK"
    token = machine_in(node, tasks, sn, "installing")
    # cloud-init's webhook, live: stages to the timeline, quiet modules nowhere
    for body in (hook("init-local", "start"), hook("init-local", "finish", "SUCCESS", 1.5),
                 hook("init-network/config-ssh", "start", at=3),
                 hook("init-network/config-ssh", "finish", "SUCCESS", 4),
                 hook("modules-final", "start", at=10),
                 hook("modules-final", "finish", "SUCCESS", 30)):
        r = webhook(node, sn, token, body)
        assert r.status_code == 200 and r.json()["acked"] == [], r.text
    assert stored(tasks, sn).task.status == "installing"
    # the final report decides; it says how the installed system booted
    body = {**cloud_init_report([]), "firmware": {"mode": "uefi", "secure_boot": True}}
    r = report(node, sn, token, body)
    assert r.status_code == 200, r.text
    assert r.json() == {"acked": [f"cloud-init:{n}" for n in (16, 17, 18, 19, 30, 31)],
                        "task_status": "succeeded"}
    task = stored(tasks, sn).task
    assert task.status == "succeeded" and task.reason == ""
    assert task.progress.percent == 100.0
    assert any(line.startswith("[cloud-init] init-local: started ") for line in task.logs)
    assert any(line.startswith("[cloud-init] modules-final: started ") and "(20.0 s)" in line
               for line in task.logs)
    assert task.logs[-2:] == ["[cloud-init] installed system booted UEFI, Secure Boot on",
                              "[cloud-init] cloud-init done in 30 s "
                              "(init-local, init, modules-config, modules-final)"]
    assert not any("config-ssh" in line for line in task.logs)
    entries = timeline_stages(node, sn, ["cloud-init init-local start",
                                         "cloud-init modules-final finish", *STAGE_MARKS])
    by_stage = {e["stage"]: e["detail"] for e in entries}
    assert by_stage["cloud-init init-local"]["start"] == "2027-01-15T07:58:20.000Z"
    assert by_stage["cloud-init init-local"]["seconds"] == 1.5
    assert by_stage["cloud-init modules-final"]["finished"] == "2027-01-15T07:58:50.000Z"
    assert by_stage["cloud-init modules-final finish"]["result"] == "SUCCESS"
    assert by_stage["cloud-init result"]["status"] == "done"
    assert by_stage["cloud-init result"]["hostname"] == "web-1"
    assert by_stage["cloud-init result"]["firmware"] == "uefi"
    assert by_stage["cloud-init result"]["secure_boot"] is True
    assert not any("config-ssh" in e["stage"] for e in entries)
    ours = [e["stage"] for e in entries if e["stage"].startswith("cloud-init")]
    assert ours.index("cloud-init modules-final finish") < ours.index("cloud-init init-local")
    # the report again (its answer was lost): the same ids, nothing changes twice
    again = report(node, sn, token, body)
    assert again.status_code == 200 and again.json()["task_status"] == "succeeded"
    assert [h.to_status for h in stored(tasks, sn).task.history].count("succeeded") == 1


def test_cloud_init_error_fails_a_booting_task_with_its_reason(
        node: Node, tasks: TaskService) -> None:
    sn = "CI-FAIL"
    token = machine_in(node, tasks, sn, "booting")
    before = stored(tasks, sn).task.logs
    # a failing module: a line in the task's log, the state untouched
    r = webhook(node, sn, token, hook("modules-final/config-scripts-user", "finish", "FAIL", 29,
                                      "running config-scripts-user with frequency "
                                      "once-per-instance"))
    assert r.status_code == 200 and len(r.json()["acked"]) == 1
    r = webhook(node, sn, token, hook("modules-final", "finish", "FAIL", 30,
                                      "running modules for final"))
    assert r.status_code == 200 and r.json()["task_status"] == "booting"
    task = stored(tasks, sn).task
    assert task.status == "booting"
    assert task.logs[len(before):] == [
        "[cloudinit] modules-final/config-scripts-user: FAIL: running config-scripts-user "
        "with frequency once-per-instance",
        "[cloudinit] modules-final: FAIL: running modules for final"]
    # the report fails it, with cloud-init's reason
    r = report(node, sn, token, cloud_init_report([RUNCMD]))
    assert r.status_code == 200 and r.json()["task_status"] == "failed", r.text
    task = stored(tasks, sn).task
    assert task.status == "failed"
    assert task.reason == f"cloud-init failed: modules-final: {RUNCMD}"
    assert task.history[-1].to_status == "failed" and task.history[-1].reason == task.reason
    assert any(line.startswith("[cloud-init] modules-final: started ")
               and line.endswith(f"1 error: {RUNCMD}") for line in task.logs)
    entries = timeline_stages(node, sn, ["cloud-init modules-final finish", *STAGE_MARKS])
    by_stage = {e["stage"]: e["detail"] for e in entries}
    assert by_stage["cloud-init modules-final"]["errors"] == 1
    assert by_stage["cloud-init modules-final"]["error"] == RUNCMD
    assert by_stage["cloud-init modules-final finish"]["result"] == "FAIL"
    assert by_stage["cloud-init result"] == {
        "status": "error", "task": "failed",
        "message": f"cloud-init failed: modules-final: {RUNCMD}"[:200], "errors": 1,
        "hostname": "web-1", "boot_id": "0f3a4c1e-1111-2222-3333-444455556666",
        "firmware": "", "secure_boot": None,        # a report without firmware: unknown
        "ip": "127.0.0.1"}


def _without(body: dict[str, Any], key: str) -> dict[str, Any]:
    out = copy.deepcopy(body)
    del out[key]
    return out


def _lying() -> dict[str, Any]:
    body = cloud_init_report([RUNCMD])
    body["status"] = "succeeded"
    return body


@pytest.mark.parametrize("body, field", [
    (_lying(), "status: 'failed' for a cloud-init run that is error"),
    (_without(cloud_init_report([]), "cloud_init"), "cloud_init: "),
    ({**cloud_init_report([]), "seq": -2}, "seq: "),
    ({**cloud_init_report([]), "firmware": {"mode": "bios", "secure_boot": True}},
     "firmware.secure_boot: "),
    ({"name": 7, "event_type": "finish", "origin": "cloudinit"}, "name: "),
    (hook("modules-final", "finish", "BROKEN"), "result: "),
])
def test_a_bad_body_is_refused_counted_and_changes_nothing(
        node: Node, tasks: TaskService, body: dict[str, Any], field: str) -> None:
    sn = "CI-BAD"
    token = machine_in(node, tasks, sn, "installing")
    revision = stored(tasks, sn).revision
    r = report(node, sn, token, body)
    assert r.status_code == 400
    assert r.json()["error"] == "bad_event" and r.json()["detail"].startswith(field)
    assert stored(tasks, sn).revision == revision
    metrics = requests.get(f"{node.url}/metrics", timeout=5).text
    assert value(metrics, "lpmos_http_requests_refused_total", reason="bad_callback") == 1


def test_the_webhooks_tokened_url_needs_the_machines_own_token(
        node: Node, tasks: TaskService) -> None:
    token = machine_in(node, tasks, "CI-TOK", "installing")
    body = hook("init-local", "start")
    assert webhook(node, "CI-TOK", "u" * 43, body).status_code == 401
    assert requests.post(f"{node.url}/callback/CI-TOK", json=body, timeout=5).status_code == 401
    other = requests.post(f"{node.url}/agent/v1/register", timeout=10, json={
        "sn": "CI-OTHER", "uuid": "22222222-2222-2222-2222-222222222222",
        "macs": ["52:54:00:c1:00:02"], "boot_mac": "52:54:00:c1:00:02", "arch": "x86_64",
        "inventory": {"schema": 1, "system": {"serial": "CI-OTHER"}},
        "agent_version": "test"}).json()["token"]
    assert webhook(node, "CI-TOK", other, body).status_code == 403
    assert webhook(node, "CI-TOK", token, body).status_code == 200
