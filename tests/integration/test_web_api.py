"""The control plane's REST API against a real etcd."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lpmos.catalog import parse_catalog
from lpmos.models import Progress, ProgressEvent, Server, Task
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore
from lpmos.store.testing import CountingStore
from lpmos.tasks import TaskService
from tests.prometheus_text import value
from web.http import ApiError, json_depth, parse_json_body
from web.index import ConsoleCache, ConsoleIndex
from web.openapi import DOCS, api_routes
from web.testing import TEST_PASSWORD, LiveServer, WebEnv

CATALOG = parse_catalog({"image": [
    {"name": "ubuntu-22.04", "os_type": "Ubuntu 22.04", "os_family": "ubuntu",
     "version": "22.04", "disk_image": "ubuntu.img"},
    {"name": "debian-12", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "disk_image": "debian.img"},
]})


@pytest.fixture
def env(etcd_store: Any, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys, catalog=CATALOG)
    yield e
    e.close()


def new_sn() -> str:
    return "sn-" + uuid.uuid4().hex[:10]


def mac_for(i: int) -> str:
    return "02:00:" + ":".join(f"{(i >> s) & 255:02x}" for s in (24, 16, 8, 0))


def task_body(sn: str, i: int = 1, idc: str = "dc1") -> dict[str, Any]:
    return {"idc": idc, "sn": sn, "mac": mac_for(i), "os_type": "Ubuntu 22.04",
            "os_version": "22.04"}


def audit_items(env: WebEnv, **params: str) -> list[dict[str, Any]]:
    r = env.app.test_client().get("/api/v1/audit", query_string=params,
                                  headers=env.headers("viewer"))
    assert r.status_code == 200, r.get_json()
    return list(r.get_json()["items"])


# -- pure codecs ----------------------------------------------------------------------


def test_json_depth_ignores_brackets_in_strings() -> None:
    assert json_depth(b'{"a": "[[[[{{{{"}') == 1
    assert json_depth(b'[[[{"x": [1]}]]]') == 5
    assert json_depth(b'"\\"[[[["') == 0


def test_parse_json_body_refuses_bombs_and_garbage() -> None:
    with pytest.raises(ApiError) as exc:
        parse_json_body(b"[" * 100000 + b"]" * 100000)
    assert exc.value.status == 400 and "nested" in exc.value.detail
    with pytest.raises(ApiError):
        parse_json_body(b"{not json")
    with pytest.raises(ApiError):
        parse_json_body(b"   ")
    assert parse_json_body(b'{"a": [1, 2]}') == {"a": [1, 2]}


# -- the earlier version's calls, with real curl -----------------------------------------


def test_legacy_curl_calls_work_as_written(env: WebEnv) -> None:
    with LiveServer(env.app) as url:
        def curl(*args: str, role: str) -> tuple[int, Any]:
            out = subprocess.run(
                ["curl", "-s", "-w", "\n%{http_code}", "-H",
                 f"Authorization: Bearer {env.tokens[role]}", *args],
                capture_output=True, text=True, timeout=30, check=True).stdout
            body, _, code = out.rpartition("\n")
            return int(code), json.loads(body)

        code, body = curl("-X", "POST", f"{url}/api/v1/tasks", "-d",
                          '{"idc": "dc1", "sn": "sn-001", "mac": "00:1a:2b:3c:4d:5e", '
                          '"os_type": "Ubuntu 22.04", "os_version": "22.04"}', role="operator")
        assert code == 201, body
        assert body["task"]["status"] == "pending"
        assert body["task"]["image"] == "ubuntu-22.04"      # resolved from the catalog
        code, body = curl(f"{url}/api/v1/tasks", role="viewer")
        assert code == 200
        assert [(t["sn"], t["status"]) for t in body["items"]] == [("sn-001", "pending")]
        code, body = curl("-X", "POST", f"{url}/api/v1/tasks/dc1/sn-001/approve", "-d",
                          '{"notes": "rack 12, ticket 4711"}', role="approver")
        assert code == 200, body
        assert body["task"]["status"] == "approved"
        assert body["task"]["approved_by"] == "approver1"
        assert body["task"]["history"][-1]["reason"] == "rack 12, ticket 4711"


# -- every mutating route: no token → 401, too-low role → 403, nothing written ---------------

MUTATING: list[tuple[str, str, str]] = [
    ("POST", "/api/v1/tasks", "operator"),
    ("POST", "/api/v1/tasks/batch", "operator"),
    ("POST", "/api/v1/tasks/dc1/sn-x/approve", "approver"),
    ("POST", "/api/v1/tasks/dc1/sn-x/reject", "approver"),
    ("POST", "/api/v1/tasks/dc1/sn-x/cancel", "operator"),
    ("POST", "/api/v1/tasks/dc1/sn-x/retry", "approver"),
    ("POST", "/api/v1/tasks/dc1/sn-x/redeploy", "approver"),
    ("PUT", "/api/v1/tasks/dc1/sn-x/schedule", "approver"),
    ("POST", "/api/v1/tasks/dc1/sn-x/release", "approver"),
    ("DELETE", "/api/v1/tasks/dc1/sn-x", "operator"),
    ("PUT", "/api/v1/users/someone", "admin"),
    ("POST", "/api/v1/tokens", "admin"),
    ("DELETE", "/api/v1/tokens/abcdef12", "admin"),
    ("PUT", "/api/v1/templates/tpl1", "operator"),
    ("DELETE", "/api/v1/templates/tpl1", "operator"),
    ("POST", "/api/v1/servers/dc1/sn-x/clear-conflict", "approver"),
    ("POST", "/api/v1/webhooks", "admin"),
    ("PUT", "/api/v1/webhooks/0123456789abcdef", "admin"),
    ("DELETE", "/api/v1/webhooks/0123456789abcdef", "admin"),
    ("POST", "/api/v1/session/tokens", "viewer"),
    ("POST", "/api/v1/images", "admin"),
    ("PUT", "/api/v1/images/someone/files/disk_image", "admin"),
    ("DELETE", "/api/v1/images/someone", "admin"),
    ("PUT", "/api/v1/servers/dc1/sn-x/bmc", "admin"),
    ("DELETE", "/api/v1/servers/dc1/sn-x/bmc", "admin"),
    ("POST", "/api/v1/servers/dc1/sn-x/power", "operator"),
]
BELOW = {"viewer": None, "operator": "viewer", "approver": "operator", "admin": "approver"}


def _rule_of(path: str) -> str:
    parts = path.split("/")
    mapping = {"dc1": "{idc}", "sn-x": "{sn}", "someone": "{name}", "abcdef12": "{token_id}",
               "tpl1": "{name}", "0123456789abcdef": "{webhook_id}",
               "disk_image": "{role}"}
    return "/".join(mapping.get(p, p) for p in parts)


def test_mutating_route_list_covers_every_mutating_route(env: WebEnv) -> None:
    declared = {f"{m} {_rule_of(p)}" for m, p, _ in MUTATING}
    actual = {r for r in api_routes(env.app) if r.split(" ")[0] in ("POST", "PUT", "DELETE")}
    assert declared == actual


@pytest.mark.parametrize(("method", "path", "role"), MUTATING)
def test_mutating_route_refuses_missing_token_and_low_role(env: WebEnv, method: str, path: str,
                                                           role: str) -> None:
    client = env.app.test_client()
    body = json.dumps(task_body("sn-x") if path.endswith("/tasks") else {"role": "viewer"})
    before = env.store.revision()
    r = client.open(path, method=method, data=body)
    assert r.status_code == 401
    assert set(r.get_json()) >= {"error", "detail"}
    below = BELOW[role]
    if below is not None:       # no role is below viewer
        r = client.open(path, method=method, data=body, headers=env.headers(below))
        assert r.status_code == 403, r.get_json()
        assert role in r.get_json()["detail"]
    r = client.open(path, method=method, data=body,
                    headers={"Authorization": "Bearer lpm_not-a-real-token"})
    assert r.status_code == 401
    assert env.store.revision() == before     # nothing was written, not even audit


def test_operator_cannot_approve_and_four_eyes_rule(etcd_store: Any, keys: Keys) -> None:
    env = WebEnv(etcd_store, keys, settings={"web.four_eyes": True})
    try:
        env.auth.put_user("lead", "approver", TEST_PASSWORD)
        lead_token, _ = env.auth.create_token("lead")
        c = env.app.test_client()
        sn = new_sn()
        r = c.post("/api/v1/tasks", json=task_body(sn),
                   headers={"Authorization": f"Bearer {lead_token}"})
        assert r.status_code == 201
        r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={},
                   headers={"Authorization": f"Bearer {lead_token}"})
        assert r.status_code == 403
        assert r.get_json()["error"] == "four_eyes"
        r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("operator"))
        assert r.status_code == 403
        r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
        assert r.status_code == 200
        assert r.get_json()["task"]["status"] == "approved"
    finally:
        env.close()


# -- transitions, conflicts, errors ---------------------------------------------------------


def test_conflict_and_illegal_transition_answer_409_with_revision(env: WebEnv) -> None:
    c = env.app.test_client()
    sn = new_sn()
    created = c.post("/api/v1/tasks", json=task_body(sn), headers=env.headers("operator"))
    rev = created.get_json()["revision"]
    TaskService(env.store, env.keys).apply_events(
        "dc1", sn, [ProgressEvent("agent", 1, message="hello")])
    r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={"revision": rev},
               headers=env.headers("approver"))
    assert r.status_code == 409
    body = r.get_json()
    assert body["error"] == "conflict" and body["revision"] > rev
    r = c.post(f"/api/v1/tasks/dc1/{sn}/reject", json={"notes": "wrong rack"},
               headers=env.headers("approver"))
    assert r.status_code == 200 and r.get_json()["task"]["status"] == "rejected"
    r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    assert r.status_code == 409
    body = r.get_json()
    assert body["error"] == "illegal_transition" and body["status"] == "rejected"
    assert body["revision"] == TaskService(env.store, env.keys).get("dc1", sn).revision  # type: ignore[union-attr]


def test_cancel_retry_delete_and_not_found(env: WebEnv) -> None:
    c = env.app.test_client()
    svc = TaskService(env.store, env.keys)
    sn = new_sn()
    c.post("/api/v1/tasks", json=task_body(sn), headers=env.headers("operator"))
    c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    svc.transition("dc1", sn, "booting", by="node")
    svc.transition("dc1", sn, "failed", by="node", reason="disk missing")
    r = c.post(f"/api/v1/tasks/dc1/{sn}/retry", json={"notes": "disk replaced"},
               headers=env.headers("approver"))
    assert r.status_code == 200 and r.get_json()["task"]["attempt"] == 2
    r = c.delete(f"/api/v1/tasks/dc1/{sn}", headers=env.headers("operator"))
    assert r.status_code == 200       # approved is deletable (not booting/installing)
    r = c.post(f"/api/v1/tasks/dc1/{sn}/cancel", json={}, headers=env.headers("operator"))
    assert r.status_code == 404
    r = c.get(f"/api/v1/tasks/dc1/{sn}", headers=env.headers("viewer"))
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"


def test_retry_is_only_for_failed_and_approve_only_for_pending(env: WebEnv) -> None:
    """Both lead to approved; neither does the other's job under its own
    name in the audit log (a retry of a pending task used to approve it)."""
    c = env.app.test_client()
    svc = TaskService(env.store, env.keys)
    sn = new_sn()
    c.post("/api/v1/tasks", json=task_body(sn), headers=env.headers("operator"))
    before = svc.get("dc1", sn)
    r = c.post(f"/api/v1/tasks/dc1/{sn}/retry", json={}, headers=env.headers("approver"))
    body = r.get_json()
    assert r.status_code == 409 and body["error"] == "illegal_transition"
    assert body["detail"] == f"retry applies to a failed task; dc1/{sn} is pending"
    assert body["status"] == "pending" and body["revision"] == before.revision  # type: ignore[union-attr]
    assert svc.get("dc1", sn).revision == before.revision  # type: ignore[union-attr]
    c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    svc.transition("dc1", sn, "booting", by="node")
    svc.transition("dc1", sn, "failed", by="node", reason="disk missing")
    r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    assert r.status_code == 409
    assert r.get_json()["detail"] == f"approve applies to a pending task; dc1/{sn} is failed"
    r = c.post(f"/api/v1/tasks/dc1/{sn}/retry", json={}, headers=env.headers("approver"))
    assert r.status_code == 200 and r.get_json()["task"]["status"] == "approved"


#: ``openssl passwd -6 -salt saltsalt secret``
HASH = ("$6$saltsalt$TVLlQcbpFVof5W3Yz4DTP6gRstiNuHwwTt6GLc"
        "1E5n0U0aDehy0S5knV8wiOQSpT0Y77vwPZN.Pq.H91p5hVO1")


def test_redeploy_installs_a_succeeded_machine_again_with_new_params(env: WebEnv) -> None:
    """succeeded → approved as attempt 2, params merged and checked in the
    same CAS, the history kept; only a succeeded task, and a bad param
    changes nothing."""
    c = env.app.test_client()
    svc = TaskService(env.store, env.keys)
    sn = new_sn()
    body = task_body(sn) | {"params": {"hostname": "web-1", "password_hash": HASH}}
    assert c.post("/api/v1/tasks", json=body, headers=env.headers("operator")).status_code == 201
    r = c.post(f"/api/v1/tasks/dc1/{sn}/redeploy", json={}, headers=env.headers("approver"))
    assert r.status_code == 409
    assert r.get_json()["detail"] == f"redeploy applies to a succeeded task; dc1/{sn} is pending"
    c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    svc.transition("dc1", sn, "booting", by="node")
    svc.transition("dc1", sn, "succeeded", by="node")
    before = svc.get("dc1", sn)
    assert before is not None
    for bad in ({"params": {"hostname": "not a name!"}}, {"params": ["x"]}):
        r = c.post(f"/api/v1/tasks/dc1/{sn}/redeploy", json=bad, headers=env.headers("approver"))
        assert r.status_code == 400, r.get_json()
        assert svc.get("dc1", sn).revision == before.revision  # type: ignore[union-attr]
    r = c.post(f"/api/v1/tasks/dc1/{sn}/redeploy", headers=env.headers("viewer"),
               json={"params": {"hostname": "web-2"}})
    assert r.status_code == 403
    r = c.post(f"/api/v1/tasks/dc1/{sn}/redeploy", headers=env.headers("approver"),
               json={"params": {"hostname": "web-2"}, "notes": "new name"})
    assert r.status_code == 200, r.get_json()
    task = r.get_json()["task"]
    assert (task["status"], task["attempt"]) == ("approved", 2)
    assert task["params"]["hostname"] == "web-2"
    assert task["params"]["password_hash"] != HASH        # redacted
    stored = svc.get("dc1", sn).task  # type: ignore[union-attr]
    assert stored.params["hostname"] == "web-2" and stored.params["password_hash"] == HASH
    assert [(h.from_status, h.to_status) for h in stored.history][-2:] == [
        ("booting", "succeeded"), ("succeeded", "approved")]
    assert any(a["action"] == "task.redeploy" for a in audit_items(env, target=f"dc1/{sn}"))


@pytest.mark.parametrize(("body", "field"), [
    ({"idc": "dc1", "sn": "<img src=x onerror=alert(1)>", "mac": "00:1a:2b:3c:4d:5e",
      "os_type": "Ubuntu 22.04"}, "sn"),
    ({"idc": "dc1", "sn": "ok-1", "mac": "zz", "os_type": "Ubuntu 22.04"}, "mac"),
    ({"idc": "dc1", "sn": "ok-1", "mac": "00:1a:2b:3c:4d:5e", "os_type": "Windows 95"},
     "os_type"),
    ({"idc": "DC 1", "sn": "ok-1", "mac": "00:1a:2b:3c:4d:5e", "os_type": "Ubuntu 22.04"},
     "idc"),
    ({"sn": "ok-1", "mac": "00:1a:2b:3c:4d:5e", "os_type": "Ubuntu 22.04"}, "idc"),
    ({"idc": "dc1", "sn": "ok-1", "mac": "00:1a:2b:3c:4d:5e", "os_type": "Ubuntu 22.04",
      "template": "nope"}, "template"),
])
def test_bad_task_input_is_400_and_writes_nothing(env: WebEnv, body: dict[str, Any],
                                                   field: str) -> None:
    before = env.store.revision()
    r = env.app.test_client().post("/api/v1/tasks", json=body, headers=env.headers("operator"))
    assert r.status_code == 400
    data = r.get_json()
    assert data["error"] == "invalid" and data["field"] == field and data["detail"]
    assert env.store.revision() == before


def test_oversized_and_nested_bodies_are_refused(env: WebEnv) -> None:
    c = env.app.test_client()
    r = c.post("/api/v1/tasks", data=b"{" * 10, headers=env.headers("operator"))
    assert r.status_code == 400
    r = c.post("/api/v1/tasks", data=b"[" * 5000 + b"]" * 5000, headers=env.headers("operator"))
    assert r.status_code == 400 and "nested" in r.get_json()["detail"]
    r = c.post("/api/v1/tasks", data=b" " * (2 * 1024 * 1024), headers=env.headers("operator"))
    assert r.status_code == 413 and r.get_json()["error"] == "too_large"
    assert env.context.metrics.get("web_refused_total", reason="body_too_large") >= 1


def test_oversized_body_refused_before_it_is_read(env: WebEnv) -> None:
    import socket

    with LiveServer(env.app) as url:
        host, port = url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as s:
            s.sendall(b"POST /api/v1/tasks HTTP/1.1\r\nHost: x\r\n"
                      b"Authorization: Bearer " + env.tokens["operator"].encode() +
                      b"\r\nContent-Length: 100000000\r\n\r\n")
            answer = s.recv(4096)     # answered without sending any of the 100 MB
    assert b" 413 " in answer.split(b"\r\n", 1)[0]


# -- lists, filters, pagination (served from the cache) -----------------------------------------


def test_pagination_filters_and_no_range_reads_per_request(etcd_store: Any, keys: Keys) -> None:
    store = CountingStore(etcd_store)
    env = WebEnv(store, keys)
    try:
        c = env.app.test_client()
        rows = [task_body(f"page-{i:03d}", i, idc="dc1" if i % 3 else "dc2") for i in range(130)]
        for chunk in (rows[:100], rows[100:]):
            r = c.post("/api/v1/tasks/batch", json=chunk, headers=env.headers("operator"))
            assert r.status_code == 201, r.get_json()
        TaskService(env.store, env.keys).transition("dc1", "page-001", "approved", by="x")
        reads_before = store.calls.count("range")
        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            q = {"limit": "50", **({"cursor": cursor} if cursor else {})}
            body = c.get("/api/v1/tasks", query_string=q, headers=env.headers("viewer")).get_json()
            seen += [t["sn"] for t in body["items"]]
            assert body["total"] == 130
            pages += 1
            cursor = body["next_cursor"]
            if not cursor:
                break
        assert pages == 3 and len(seen) == 130 and len(set(seen)) == 130
        body = c.get("/api/v1/tasks?idc=dc2&limit=500", headers=env.headers("viewer")).get_json()
        assert {t["idc"] for t in body["items"]} == {"dc2"}
        assert len(body["items"]) == body["total"] == 44
        # the transition was written to etcd directly, not through the API:
        # the console's cache hears of it through its watch, a moment later
        deadline = time.monotonic() + 10
        while True:
            body = c.get("/api/v1/tasks?status=approved",
                         headers=env.headers("viewer")).get_json()
            if body["items"] or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert [t["sn"] for t in body["items"]] == ["page-001"]
        body = c.get("/api/v1/tasks?q=PAGE-12", headers=env.headers("viewer")).get_json()
        assert sorted(t["sn"] for t in body["items"]) == [f"page-12{i}" for i in range(10)]
        r = c.get("/api/v1/tasks?status=bogus", headers=env.headers("viewer"))
        assert r.status_code == 400
        r = c.get("/api/v1/tasks?cursor=!!!", headers=env.headers("viewer"))
        assert r.status_code == 400
        assert store.calls.count("range") == reads_before     # every list came from the watch cache
    finally:
        env.close()


@pytest.mark.slow
def test_index_pages_100k_tasks() -> None:
    keys = Keys("/big")
    store = MemoryStore()
    from lpmos.store import Put

    ops = []
    for i in range(100_000):
        task = Task(idc=f"dc{i % 4}", sn=f"n{i:06d}", mac=mac_for(i), os_type="Ubuntu 22.04",
                    status="pending" if i % 5 == 1 else "succeeded", created_at=1000.0 + i,
                    progress=Progress())
        ops.append(Put(keys.task(task.idc, task.sn), task.to_json()))
    for start in range(0, len(ops), 5000):
        store.commit([], ops[start:start + 5000])
    cache = ConsoleCache(store, keys)   # type: ignore[arg-type]
    cache.load()
    index = ConsoleIndex(cache, keys)
    assert index.task_count() == 100_000
    entries, after, total = index.query_tasks(idc="dc1", status=["pending"], limit=100)
    assert total == 5000 and len(entries) == 100 and after is not None
    assert all(e.task.idc == "dc1" and e.task.status == "pending" for e in entries)
    assert entries[0].task.sn == "n099981"            # newest first
    got = [e.task.sn for e in entries]
    while after is not None:
        entries, after, _ = index.query_tasks(idc="dc1", status=["pending"], after=after,
                                              limit=500)
        got += [e.task.sn for e in entries]
    assert len(got) == len(set(got)) == 5000
    entries, _, total = index.query_tasks(q="n05000", limit=50)
    assert total is None and sorted(e.task.sn for e in entries) == [f"n05000{i}"
                                                                   for i in range(10)]


# -- batch ------------------------------------------------------------------------------


def test_batch_is_all_or_nothing_with_an_error_per_row(env: WebEnv) -> None:
    c = env.app.test_client()
    existing = new_sn()
    c.post("/api/v1/tasks", json=task_body(existing, 900), headers=env.headers("operator"))
    rows = [task_body(new_sn(), 1), {"idc": "dc1", "sn": "bad sn", "mac": mac_for(2),
                                     "os_type": "Ubuntu 22.04"},
            task_body(new_sn(), 3), {"idc": "dc1", "sn": new_sn(), "mac": "nope",
                                     "os_type": "Ubuntu 22.04"}]
    before = env.store.revision()
    r = c.post("/api/v1/tasks/batch", json=rows, headers=env.headers("operator"))
    assert r.status_code == 400
    errors = r.get_json()["errors"]
    assert [(e["row"], e["field"]) for e in errors] == [(1, "sn"), (3, "mac")]
    assert env.store.revision() == before
    rows = [task_body(new_sn(), 10), task_body(existing, 11)]
    r = c.post("/api/v1/tasks/batch", json=rows, headers=env.headers("operator"))
    assert r.status_code == 409
    assert r.get_json()["errors"][0]["row"] == 1
    assert c.get(f"/api/v1/tasks/dc1/{rows[0]['sn']}",
                 headers=env.headers("viewer")).status_code == 404
    # CSV upload, multipart
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["idc", "sn", "mac", "os_type", "os_version"])
    sns = [new_sn() for _ in range(3)]
    for i, sn in enumerate(sns):
        writer.writerow(["dc1", sn, mac_for(100 + i), "Debian 12", "12"])
    r = c.post("/api/v1/tasks/batch", data={"file": (io.BytesIO(out.getvalue().encode()),
                                                     "tasks.csv")},
               headers=dict(env.headers("operator")), content_type="multipart/form-data")
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["created"] == 3
    for sn in sns:
        task = c.get(f"/api/v1/tasks/dc1/{sn}", headers=env.headers("viewer")).get_json()
        assert task["task"]["image"] == "debian-12" and task["task"]["created_by"] == "operator1"
    # CSV as a raw body, like curl --data-binary @tasks.csv
    sn = new_sn()
    r = c.post("/api/v1/tasks/batch", data=f"idc,sn,mac,os_type\ndc1,{sn},{mac_for(7)},"
                                           "Ubuntu 22.04\n",
               headers=dict(env.headers("operator"), **{"Content-Type": "text/csv"}))
    assert r.status_code == 201
    assert audit_items(env, action="task.batch_create")[0]["after"] == [f"dc1/{sn}"]
    # a CSV row's error names its line in the file too (blank lines skipped)
    r = c.post("/api/v1/tasks/batch", data=f"idc,sn,mac,os_type\ndc1,{new_sn()},"
                                           f"{mac_for(8)},Ubuntu 22.04\n\ndc1,{new_sn()},zz,"
                                           "Ubuntu 22.04\n",
               headers=dict(env.headers("operator"), **{"Content-Type": "text/csv"}))
    assert r.status_code == 400
    assert [(e["row"], e["line"], e["field"]) for e in r.get_json()["errors"]] == \
        [(1, 4, "mac")]


# -- audit --------------------------------------------------------------------------------


def test_every_mutation_is_audited_with_before_and_after(env: WebEnv) -> None:
    c = env.app.test_client()
    sn = new_sn()
    c.post("/api/v1/tasks", json=task_body(sn), headers=env.headers("operator"))
    c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={"notes": "go"},
           headers=env.headers("approver"))
    c.post(f"/api/v1/tasks/dc1/{sn}/cancel", json={"reason": "wrong disk"},
           headers=env.headers("operator"))
    c.put("/api/v1/templates/web", json={"os_type": "Ubuntu 22.04", "params": {"a": 1}},
          headers=env.headers("operator"))
    c.put("/api/v1/users/newbie", json={"role": "viewer", "password": "longenough"},
          headers=env.headers("admin"))
    items = audit_items(env, target=sn)
    assert [i["action"] for i in items] == ["task.cancel", "task.approve", "task.create"]
    cancel, approve, create = items
    assert create["before"] is None and create["after"]["status"] == "pending"
    assert create["actor"] == "operator1" and "token" in create["source"]
    assert approve["before"]["status"] == "pending" and approve["after"]["status"] == "approved"
    assert approve["detail"] == "go" and approve["actor"] == "approver1"
    assert cancel["after"]["status"] == "cancelled" and cancel["detail"] == "wrong disk"
    assert [i["target"] for i in audit_items(env, actor="admin1")] == ["newbie"]
    assert "password_hash" not in json.dumps(audit_items(env, action="user."))
    assert audit_items(env, action="template.")[0]["after"]["params"] == {"a": 1}
    oldest_first = env.app.test_client().get(
        "/api/v1/audit", query_string={"order": "asc", "target": sn},
        headers=env.headers("viewer")).get_json()["items"]
    assert [i["action"] for i in oldest_first] == ["task.create", "task.approve", "task.cancel"]
    page = env.app.test_client().get("/api/v1/audit", query_string={"limit": "2"},
                                     headers=env.headers("viewer")).get_json()
    assert len(page["items"]) == 2 and page["next_cursor"]
    rest = env.app.test_client().get(
        "/api/v1/audit", query_string={"limit": "100", "cursor": page["next_cursor"]},
        headers=env.headers("viewer")).get_json()["items"]
    assert {i["id"] for i in rest}.isdisjoint({i["id"] for i in page["items"]})
    assert len(rest) == 3


# -- session login, CSRF, rate limits ------------------------------------------------------


def test_session_login_csrf_and_origin(env: WebEnv) -> None:
    c = env.app.test_client()
    r = c.post("/login", json={"user": "operator1", "password": "wrong-password"})
    assert r.status_code == 401
    r = c.post("/login", json={"user": "operator1", "password": TEST_PASSWORD})
    assert r.status_code == 200
    csrf = r.get_json()["csrf"]
    assert c.get("/api/v1/session").get_json()["role"] == "operator"
    sn = new_sn()
    r = c.post("/api/v1/tasks", json=task_body(sn))
    assert r.status_code == 403 and r.get_json()["error"] == "csrf"
    r = c.post("/api/v1/tasks", json=task_body(sn),
               headers={"X-CSRF-Token": csrf, "Origin": "http://evil.example"})
    assert r.status_code == 403
    r = c.post("/api/v1/tasks", json=task_body(sn),
               headers={"X-CSRF-Token": csrf, "Origin": "http://localhost"})
    assert r.status_code == 201
    assert audit_items(env, target=sn)[0]["source"].startswith("console session")
    # the login form itself is CSRF-protected
    fresh = env.app.test_client()
    r = fresh.post("/login", data={"user": "operator1", "password": TEST_PASSWORD,
                                   "csrf_token": "forged"})
    assert r.status_code == 403
    page = fresh.get("/login").get_data(as_text=True)
    token = page.split('name="csrf_token" value="', 1)[1].split('"', 1)[0]
    r = fresh.post("/login", data={"user": "operator1", "password": TEST_PASSWORD,
                                   "csrf_token": token})
    assert r.status_code == 302 and r.headers["Location"].endswith("/")
    assert "Content-Security-Policy" in fresh.get("/").headers
    r = c.post("/logout", headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200
    assert c.get("/api/v1/tasks").status_code == 401


def test_login_and_mutation_rate_limits(etcd_store: Any, keys: Keys) -> None:
    env = WebEnv(etcd_store, keys, settings={"web.login_rate": 6.0, "web.mutate_rate": 40.0})
    try:
        c = env.app.test_client()
        codes = [c.post("/login", json={"user": "viewer1", "password": "nope-nope"}).status_code
                 for _ in range(6)]
        assert codes[0] == 401 and codes[-1] == 429
        r = c.post("/login", json={"user": "viewer1", "password": TEST_PASSWORD})
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        codes = [c.put(f"/api/v1/templates/t{i}", json={"os_type": "X"},
                       headers=env.headers("operator")).status_code for i in range(14)]
        assert codes[0] == 200 and 429 in codes
        assert env.context.metrics.get("web_refused_total", reason="rate_limit") >= 1
    finally:
        env.close()


# -- servers, timeline, stats, IDCs, templates ------------------------------------------------


def test_servers_inventory_timeline_stats_and_idcs(env: WebEnv) -> None:
    evil = "<img src=x onerror=alert(1)>"
    server = Server(idc="dc1", sn="srv-1", macs=["00:1a:2b:3c:4d:5f"], boot_mac="00:1a:2b:3c:4d:5f",
                    inventory={"schema": 1, "system": {"vendor": evil, "product": "R650"},
                               "cpu": {"model": "Xeon", "threads": 64},
                               "memory": {"total_bytes": 256 << 30},
                               "disks": [{"name": "sda", "size_bytes": 1 << 40}]},
                    last_seen=time.time())
    env.store.put(env.keys.server("dc1", "srv-1"), server.to_json())
    env.store.put(env.keys.timeline("dc1", "srv-1"), json.dumps(
        [{"at": 2.0, "stage": "boot script", "detail": {"arch": "x86_64"}},
         {"at": 1.0, "stage": "dhcp offer"}]).encode())
    env.store.put(env.keys.node("dc1", "node-a"), json.dumps({"address": "10.0.0.1"}).encode())
    rev = env.store.put(env.keys.lease("dc1", "srv-1"), b"alive")
    env.context.cache.wait_for_revision(rev, 5)
    c = env.app.test_client()
    items = c.get("/api/v1/servers?q=r650", headers=env.headers("viewer")).get_json()["items"]
    assert [(s["sn"], s["vendor"], s["online"]) for s in items] == [("srv-1", evil, True)]
    detail = c.get("/api/v1/servers/dc1/srv-1", headers=env.headers("viewer")).get_json()
    assert detail["server"]["inventory"]["system"]["vendor"] == evil
    timeline = c.get("/api/v1/servers/dc1/srv-1/timeline",
                     headers=env.headers("viewer")).get_json()
    assert [e["stage"] for e in timeline["entries"]] == ["dhcp offer", "boot script"]
    assert c.get("/api/v1/servers/dc1/none/timeline",
                 headers=env.headers("viewer")).status_code == 404
    idcs = c.get("/api/v1/idcs", headers=env.headers("viewer")).get_json()["items"]
    assert idcs[0]["name"] == "dc1" and idcs[0]["nodes_alive"] == 1
    assert idcs[0]["nodes"][0]["address"] == "10.0.0.1"
    # stats: one succeeded install of 600 s
    svc = TaskService(env.store, env.keys)
    sn = new_sn()
    svc.create(Task(idc="dc1", sn=sn, mac=mac_for(55), os_type="Ubuntu 22.04"), by="t")
    for target in ("approved", "booting", "installing"):
        svc.transition("dc1", sn, target, by="t")

    def backdate(task: Task) -> None:
        task.started_at = time.time() - 600

    svc.update("dc1", sn, backdate)
    stored = svc.transition("dc1", sn, "succeeded", by="t")
    env.context.cache.wait_for_revision(stored.revision, 5)
    time.sleep(2.1)   # the stats memo lives 2 s
    stats = c.get("/api/v1/stats", headers=env.headers("viewer")).get_json()
    assert stats["per_state"]["succeeded"] == 1
    assert stats["per_idc"]["dc1"]["succeeded"] == 1
    assert stats["installs_per_hour"][-1]["succeeded"] == 1
    assert 590 < stats["median_install_seconds"] < 700
    assert stats["servers_online"] == 1


def test_templates_fill_task_creation(env: WebEnv) -> None:
    c = env.app.test_client()
    r = c.put("/api/v1/templates/web-node", json={"os_type": "Debian 12", "os_version": "12",
                                                  "params": {"root_device_hints":
                                                             {"size_min_gb": 100}}},
              headers=env.headers("operator"))
    assert r.status_code == 200
    r = c.put("/api/v1/templates/bad", json={"os_type": "Plan 9"},
              headers=env.headers("operator"))
    assert r.status_code == 400          # checked against the catalog
    sn = new_sn()
    r = c.post("/api/v1/tasks", json={"idc": "dc1", "sn": sn, "mac": mac_for(77),
                                      "template": "web-node"}, headers=env.headers("operator"))
    assert r.status_code == 201, r.get_json()
    task = r.get_json()["task"]
    assert (task["os_type"], task["image"], task["template"]) == ("Debian 12", "debian-12",
                                                                  "web-node")
    assert task["params"] == {"root_device_hints": {"size_min_gb": 100}}
    names = [t["name"] for t in c.get("/api/v1/templates",
                                      headers=env.headers("viewer")).get_json()["items"]]
    assert names == ["web-node"]


# -- OpenAPI -----------------------------------------------------------------------------


def test_openapi_matches_the_routes(env: WebEnv) -> None:
    routes = api_routes(env.app)
    assert set(routes) == set(DOCS), "document every /api/v1 route in web.openapi.DOCS"
    doc = env.app.test_client().get("/api/v1/openapi.json").get_json()
    listed = {f"{m.upper()} {p}" for p, ops in doc["paths"].items() for m in ops}
    assert listed == set(routes)
    approve = doc["paths"]["/api/v1/tasks/{idc}/{sn}/approve"]["post"]
    assert approve["x-lpmos-role"] == "approver"
    assert {p["name"] for p in approve["parameters"]} == {"idc", "sn"}
    assert doc["paths"]["/api/v1/tasks"]["post"]["x-lpmos-role"] == "operator"


def test_health_and_metrics(env: WebEnv) -> None:
    c = env.app.test_client()
    health = c.get("/healthz")
    assert health.status_code == 200 and health.get_json()["status"] == "ok"
    c.get("/api/v1/tasks")   # refused: counted
    text = c.get("/metrics").get_data(as_text=True)
    assert value(text, "lpmos_web_refused_total", reason="unauthenticated") == 1


def test_demo_users_can_log_in_with_their_roles(env: WebEnv) -> None:
    from web.demo_users import ensure_demo_users

    users = ensure_demo_users(env.auth)
    assert [(u, r) for u, r, _ in users] == [("viewer", "viewer"), ("operator", "operator"),
                                             ("approver", "approver"), ("admin", "admin")]
    for user, role, password in users:
        assert len(password) >= 12
        c = env.app.test_client()
        r = c.post("/login", json={"user": user, "password": password})
        assert r.status_code == 200 and r.get_json()["role"] == role


def test_approver_clears_a_conflict_flag_with_audit(env: WebEnv) -> None:
    from lpmos.models import Server

    key = env.keys.server("dc1", "clone-1")
    env.store.put(key, Server(idc="dc1", sn="clone-1", macs=["52:54:00:0c:0c:01"],
                              conflict="mac 52:54:00:0c:0c:01 also registered by clone-2")
                  .to_json())
    c = env.app.test_client()
    url = "/api/v1/servers/dc1/clone-1/clear-conflict"
    r = c.post(url, data=json.dumps({}), headers=env.headers("approver"))
    assert r.status_code == 400 and "notes" in r.get_json()["detail"]   # say what was checked
    r = c.post(url, data=json.dumps({"notes": "checked: clone-2 was a test VM, deleted"}),
               headers=env.headers("approver"))
    assert r.status_code == 200 and r.get_json()["cleared"] is True
    assert Server.from_json(env.store.get(key).value).conflict == ""
    audit = [json.loads(kv.value) for kv in env.store.range(env.keys.audit_prefix()).items]
    record = [a for a in audit if a["action"] == "server.clear_conflict"][-1]
    assert record["target"] == "dc1/clone-1" and "also registered" in record["before"]["conflict"]
    again = c.post(url, data=json.dumps({"notes": "again"}), headers=env.headers("approver"))
    assert again.status_code == 200 and again.get_json()["cleared"] is False
    missing = c.post("/api/v1/servers/dc1/nope/clear-conflict",
                     data=json.dumps({"notes": "x"}), headers=env.headers("approver"))
    assert missing.status_code == 404


def test_a_task_for_an_image_of_another_architecture_is_refused_with_the_reason(
        env: WebEnv) -> None:
    from lpmos.models import Server

    sn = new_sn()
    rev = env.store.put(env.keys.server("dc1", sn),
                        Server(idc="dc1", sn=sn, macs=[mac_for(77)], arch="aarch64").to_json())
    env.context.cache.wait_for_revision(rev, 5)
    c = env.app.test_client()
    r = c.post("/api/v1/tasks", data=json.dumps(task_body(sn, 77)),
               headers=env.headers("operator"))
    assert r.status_code == 400, r.get_data(as_text=True)
    body = r.get_json()
    assert body["field"] == "image"
    assert "built for x86_64, and this machine is arm64 (aarch64)" in body["detail"]
    assert env.store.get(env.keys.task("dc1", sn)) is None
    # an x86_64 machine (as its inventory says) gets the same image
    rev = env.store.put(env.keys.server("dc1", sn),
                        Server(idc="dc1", sn=sn, macs=[mac_for(77)], arch="x86_64").to_json())
    env.context.cache.wait_for_revision(rev, 5)
    r = c.post("/api/v1/tasks", data=json.dumps(task_body(sn, 77)),
               headers=env.headers("operator"))
    assert r.status_code == 201, r.get_data(as_text=True)
