"""RELIABILITY: the control plane (``lpmos control-plane`` under gunicorn, as
operators run it) with etcd gone, SIGKILLed mid-install, and two of them
racing on one task."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from lpmos.auth import Auth
from lpmos.models import ProgressEvent
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import IDC, ControlPlane, auth, eventually, stop_etcd

PASSWORD = "reliability-pass-1"


def users(store: EtcdStore, keys: Keys) -> dict[str, str]:
    """API tokens of an operator and an approver (and a viewer)."""
    a = Auth(store, keys)
    tokens = {}
    for name, role in (("op1", "operator"), ("ap1", "approver"), ("vw1", "viewer")):
        a.put_user(name, role, PASSWORD)
        tokens[role], _ = a.create_token(name)
    return tokens


def task_body(sn: str, n: int) -> dict[str, Any]:
    return {"idc": IDC, "sn": sn, "mac": f"02:00:00:00:{n >> 8:02x}:{n & 255:02x}",
            "os_type": "Lab OS"}


def assert_json_error(r: requests.Response, status: int, error: set[str]) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["Content-Type"].startswith("application/json"), r.headers
    body = dict(r.json())
    assert body["error"] in error and isinstance(body.get("detail"), str), body
    assert "Traceback" not in r.text and "File \"" not in r.text
    return body


@pytest.mark.slow
def test_api_reads_from_cache_writes_503_while_etcd_is_down_then_recovers(
        private_etcd: Any, keys: Keys, control_plane_factory: Callable[..., ControlPlane]
) -> None:
    store = EtcdStore([private_etcd.url], timeout=2.0)
    tokens = users(store, keys)
    cp = control_plane_factory(private_etcd.url, keys.prefix).start()
    op, ap, vw = (auth(tokens[r]) for r in ("operator", "approver", "viewer"))
    try:
        created = requests.post(f"{cp.url}/api/v1/tasks", json=task_body("cp-out-1", 1),
                                headers=op, timeout=10)
        assert created.status_code == 201, created.text
        reads: list[tuple[str, dict[str, str]]] = [
            ("/api/v1/tasks", vw),
            (f"/api/v1/tasks/{IDC}/cp-out-1", vw),
        ]
        writes: list[tuple[str, dict[str, str], Any]] = [
            ("/api/v1/tasks", op, task_body("cp-out-2", 2)),
            (f"/api/v1/tasks/{IDC}/cp-out-1/approve", ap, {}),
        ]
        # the cache has the tokens and users: reads are answered from it below
        eventually(lambda: requests.get(f"{cp.url}/api/v1/tasks/{IDC}/cp-out-1", headers=vw,
                                        timeout=10).status_code == 200,
                   timeout=10, what="the task visible through the cache")
        stop_etcd(private_etcd)           # SIGSTOP: every etcd call hangs to its deadline
        try:
            for path, headers in reads:   # served from the watch cache, at once
                started = time.monotonic()
                r = requests.get(cp.url + path, headers=headers, timeout=30)
                assert time.monotonic() - started < 2, path
                assert r.status_code == 200, (path, r.text)
            for path, headers, body in writes:
                started = time.monotonic()
                r = requests.post(cp.url + path, json=body, headers=headers, timeout=30)
                took = time.monotonic() - started
                # the deadline: the etcd timeout (2 s) per call, two calls at most, + slack
                assert took < 8, (path, took)
                detail = assert_json_error(r, 503, {"unavailable", "store_unavailable"})
                assert "etcd" in detail["detail"], detail
            # the health check says so, without etcd
            health = eventually(lambda: (r := requests.get(f"{cp.url}/healthz", timeout=10))
                                .status_code == 503 and r.json(), timeout=20,
                                what="control plane /healthz degraded")
            assert health["status"] == "degraded" and health["cache_staleness"] > 5
            assert requests.get(f"{cp.url}/login", timeout=10).status_code == 200
        finally:
            private_etcd.cont()
        # works again by itself, and nothing was half-done while etcd was gone
        eventually(lambda: requests.get(f"{cp.url}/healthz", timeout=10).status_code == 200,
                   timeout=30, what="control plane healthy again")
        r = requests.post(f"{cp.url}/api/v1/tasks/{IDC}/cp-out-1/approve", json={},
                          headers=ap, timeout=15)
        assert r.status_code == 200 and r.json()["task"]["status"] == "approved", r.text
        stored = TaskService(store, keys).get(IDC, "cp-out-1")
        assert stored is not None
        assert [h.to_status for h in stored.task.history].count("approved") == 1
        listed = requests.get(f"{cp.url}/api/v1/tasks", headers=vw, timeout=10).json()
        assert {t["sn"] for t in listed["items"]} <= {"cp-out-1", "cp-out-2"}
        assert "Traceback" not in cp.log()
    finally:
        store.close()


@pytest.mark.slow
def test_control_plane_sigkilled_mid_install_loses_nothing(
        etcd_server: Any, keys: Keys, control_plane_factory: Callable[..., ControlPlane]
) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tasks = TaskService(store, keys)
    tokens = users(store, keys)
    op, ap, vw = (auth(tokens[r]) for r in ("operator", "approver", "viewer"))
    cp = control_plane_factory(etcd_server.url, keys.prefix).start()
    try:
        # an install in progress, driven by the node side (TaskService, as a node does)
        assert requests.post(f"{cp.url}/api/v1/tasks", json=task_body("inst-1", 1), headers=op,
                             timeout=10).status_code == 201
        assert requests.post(f"{cp.url}/api/v1/tasks/{IDC}/inst-1/approve", json={},
                             headers=ap, timeout=10).status_code == 200
        tasks.transition(IDC, "inst-1", "booting", by="node:n1")
        tasks.apply_events(IDC, "inst-1", [ProgressEvent("agent", 1, kind="state",
                                                         status="installing", message="go")])
        # operators keep working: create + approve, one pair after another
        acked: list[tuple[str, str]] = []
        stop = threading.Event()

        def operator_loop() -> None:
            n = 100
            with requests.Session() as s:
                while not stop.is_set() and n < 400:
                    n += 1
                    sn = f"run-{n}"
                    try:
                        r = s.post(f"{cp.url}/api/v1/tasks", json=task_body(sn, n),
                                   headers=op, timeout=5)
                        if r.status_code == 201:
                            acked.append(("create", sn))
                        r = s.post(f"{cp.url}/api/v1/tasks/{IDC}/{sn}/approve", json={},
                                   headers=ap, timeout=5)
                        if r.status_code == 200:
                            acked.append(("approve", sn))
                    except requests.RequestException:
                        time.sleep(0.05)

        worker = threading.Thread(target=operator_loop)
        worker.start()
        try:
            eventually(lambda: len(acked) >= 10, timeout=30, what="some acknowledged calls")
            cp.kill()                                   # SIGKILL mid-traffic, mid-install
            killed_after = len(acked)
            # the install goes on without the control plane
            tasks.apply_events(IDC, "inst-1", [
                ProgressEvent("agent", 2, kind="progress", percent=50.0, message="half"),
                ProgressEvent("agent", 3, kind="progress", step="rebooting", percent=100.0),
                ProgressEvent("firstboot", 1, kind="state", status="succeeded", message="up")])
            cp.start()                                  # same port, same etcd
            time.sleep(0.5)
        finally:
            stop.set()
            worker.join(30)
        assert len(acked) >= killed_after
        # every acknowledged call is in etcd, exactly once, with its audit record
        for action, sn in acked:
            stored = tasks.get(IDC, sn)
            assert stored is not None, (action, sn)
            statuses = [h.to_status for h in stored.task.history]
            assert statuses.count("pending") == 1
            if action == "approve":
                assert stored.task.status == "approved" and statuses.count("approved") == 1
        audit = [kv.value.decode() for kv in store.range(keys.audit_prefix(), limit=5000).items]
        for action, sn in acked:
            assert any(f'"action":"task.{action}"' in a and f'"target":"{IDC}/{sn}"' in a
                       for a in audit), (action, sn)
        # no task was approved twice, none approved that nobody approved
        for kv in store.range(keys.idc(IDC)).items:
            if kv.key.endswith("/task"):
                history = [h for h in TaskService(store, keys).get(
                    IDC, kv.key.split("/")[-2]).task.history]  # type: ignore[union-attr]
                assert [h.to_status for h in history].count("approved") <= 1
        # the restarted control plane shows the finished install and every task
        r = requests.get(f"{cp.url}/api/v1/tasks/{IDC}/inst-1", headers=vw, timeout=10)
        assert r.status_code == 200
        task = r.json()["task"]
        assert task["status"] == "succeeded"
        assert task["event_seq"] == {"agent": 3, "firstboot": 1}
        listed = requests.get(f"{cp.url}/api/v1/tasks", params={"limit": 500}, headers=vw,
                              timeout=10).json()
        assert {sn for _, sn in acked} <= {t["sn"] for t in listed["items"]}
    finally:
        store.close()


@pytest.mark.slow
def test_two_control_planes_fifty_concurrent_approve_cancel_one_wins(
        etcd_server: Any, keys: Keys, control_plane_factory: Callable[..., ControlPlane]
) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tokens = users(store, keys)
    a = control_plane_factory(etcd_server.url, keys.prefix, name="cp-a").start()
    b = control_plane_factory(etcd_server.url, keys.prefix, name="cp-b").start()
    try:
        for round_ in range(2):
            sn = f"race-{round_}"
            r = requests.post(f"{a.url}/api/v1/tasks", json=task_body(sn, round_),
                              headers=auth(tokens["operator"]), timeout=10)
            assert r.status_code == 201, r.text
            seen = r.json()["revision"]
            barrier = threading.Barrier(50)
            results: list[tuple[str, int, dict[str, Any]]] = []
            lock = threading.Lock()

            def call(i: int, sn: str = sn, seen: int = seen,
                     barrier: threading.Barrier = barrier) -> None:
                base = (a, b)[i % 2].url
                action = "approve" if i % 4 < 2 else "cancel"
                role = "approver" if action == "approve" else "operator"
                barrier.wait(30)
                resp = requests.post(f"{base}/api/v1/tasks/{IDC}/{sn}/{action}",
                                     json={"revision": seen}, headers=auth(tokens[role]),
                                     timeout=30)
                with lock:
                    results.append((action, resp.status_code, resp.json()))

            threads = [threading.Thread(target=call, args=(i,)) for i in range(50)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert len(results) == 50
            winners = [x for x in results if x[1] == 200]
            losers = [x for x in results if x[1] != 200]
            assert len(winners) == 1, [(x[0], x[1]) for x in results]
            stored = TaskService(store, keys).get(IDC, sn)
            assert stored is not None
            assert stored.task.status == {"approve": "approved",
                                          "cancel": "cancelled"}[winners[0][0]]
            assert [h.to_status for h in stored.task.history] == ["pending",
                                                                 stored.task.status]
            for _action, status, body in losers:
                assert status == 409, body
                assert body["error"] == "conflict"
                assert body["revision"] == stored.revision, body
    finally:
        store.close()


def test_control_plane_with_etcd_down_at_start_answers_healthz_degraded(
        keys: Keys, control_plane_factory: Callable[..., ControlPlane]) -> None:
    """It used to wait 30 s for its first cache load before answering
    anything; now it waits about two etcd deadlines, then serves and says
    it is degraded."""
    dead = f"http://127.0.0.1:{free_port()}"       # a port nobody listens on
    started = time.monotonic()
    cp = control_plane_factory(dead, keys.prefix).start(timeout=60, healthy=False)
    try:
        r = requests.get(cp.url + "/healthz", timeout=5)
        assert r.status_code == 503, r.text
        assert r.json()["status"] == "degraded" and r.json()["cache_loaded"] is False
        assert time.monotonic() - started < 20, cp.log()
    finally:
        cp.kill()
