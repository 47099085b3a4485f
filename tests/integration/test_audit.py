"""Audit records are written in the transaction of their change:
on a real etcd, a change and its record share one revision, a lost race
leaves no record, and a failure before the commit leaves neither."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from lpmos.audit import Auditor
from lpmos.models import Server, Task
from lpmos.store import Compare, Conflict, Op, Put, StoreUnavailable
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import Stored, TaskService
from web.openapi import api_routes
from web.testing import TEST_PASSWORD, WebEnv


class InjectingStore(EtcdStore):
    """The real store, with faults injected into commits that carry an
    audit record: ``race`` writes a competing change to the first compared
    key just before the commit (another approver winning in between);
    ``fail`` raises :class:`StoreUnavailable` instead of committing (etcd
    gone between building the transaction and committing it).  Records
    every plain ``put`` key, so a test can show no record bypasses a commit."""

    def __init__(self, url: str, keys: Keys) -> None:
        super().__init__([url], timeout=2.0)
        self.audit_prefix = keys.audit_prefix()
        self.race: bytes | None = None
        self.raced_revision = 0
        self.fail = False
        self.puts: list[str] = []

    def put(self, key: str, value: bytes, *, lease: int = 0) -> int:
        self.puts.append(key)
        return super().put(key, value, lease=lease)

    def commit(self, compares: Sequence[Compare], ops: Sequence[Op]) -> int:
        audited = any(isinstance(op, Put) and op.key.startswith(self.audit_prefix)
                      for op in ops)
        if audited and self.fail:
            raise StoreUnavailable("injected: etcd went away before the commit")
        if audited and self.race is not None and compares:
            competitor, self.race = self.race, None
            self.raced_revision = super().put(compares[0].key, competitor)
        return super().commit(compares, ops)


@pytest.fixture
def store(etcd_server: Any, keys: Keys) -> Iterator[InjectingStore]:
    s = InjectingStore(etcd_server.url, keys)
    yield s
    s.close()


@pytest.fixture
def env(store: InjectingStore, keys: Keys, tmp_path: Any) -> Iterator[WebEnv]:
    e = WebEnv(store, keys, settings={"web.image_store": tmp_path / "image-store"})
    yield e
    e.close()


def new_sn() -> str:
    return "sn-" + uuid.uuid4().hex[:10]


def task_body(sn: str, mac: str = "02:00:00:00:00:01") -> dict[str, Any]:
    return {"idc": "dc1", "sn": sn, "mac": mac, "os_type": "Ubuntu 22.04",
            "os_version": "22.04"}


def audit_kvs(store: EtcdStore, keys: Keys, since: int = 0) -> list[tuple[dict[str, Any], int]]:
    """Every audit record written after revision ``since``, with its revision."""
    return [(dict(json.loads(kv.value), key=kv.key), kv.mod_revision)
            for kv in store.range(keys.audit_prefix()).items if kv.mod_revision > since]


def changes_at(store: EtcdStore, root: str, revision: int) -> set[str]:
    """The keys under ``root`` written or deleted in exactly ``revision``."""
    now = {kv.key: kv.mod_revision for kv in store.range(root, revision=revision).items}
    before = {kv.key for kv in store.range(root, revision=revision - 1).items}
    return {k for k, mod in now.items() if mod == revision} | (before - set(now))


def test_every_mutating_call_commits_its_record_in_the_revision_of_its_change(
        env: WebEnv, store: InjectingStore, keys: Keys) -> None:
    c = env.app.test_client()
    svc = TaskService(store, keys)
    start = store.revision()
    sn, rejected, batch_sn = new_sn(), new_sn(), new_sn()
    store.put(keys.server("dc1", sn), Server(idc="dc1", sn=sn, macs=["02:00:00:00:00:01"],
                                             conflict="clone seen").to_json())
    calls: list[tuple[str, str, str, Any]] = [
        ("POST", "/api/v1/tasks", "operator", task_body(sn)),
        ("PUT", f"/api/v1/tasks/dc1/{sn}/schedule", "approver",
         {"not_before": "2026-01-01T00:00:00Z", "window": "22:00-04:00"}),
        ("POST", "/api/v1/tasks", "operator", task_body(rejected, "02:00:00:00:00:02")),
        ("POST", f"/api/v1/tasks/dc1/{rejected}/reject", "approver", {"notes": "wrong rack"}),
        ("POST", f"/api/v1/tasks/dc1/{sn}/approve", "approver", {"notes": "go"}),
        ("FAIL", sn, "", None),          # a node claims it, the install fails
        ("POST", f"/api/v1/tasks/dc1/{sn}/retry", "approver", {"notes": "disk replaced"}),
        ("SUCCEED", sn, "", None),       # the new attempt succeeds
        ("POST", f"/api/v1/tasks/dc1/{sn}/redeploy", "approver",
         {"notes": "reinstall", "params": {"hostname": "web-2"}}),
        ("FAIL", sn, "", None),          # the redeploy fails
        ("POST", f"/api/v1/tasks/dc1/{sn}/release", "approver", {"notes": "decommission"}),
        ("POST", f"/api/v1/tasks/dc1/{sn}/cancel", "operator", {"reason": "wrong disk"}),
        ("DELETE", f"/api/v1/tasks/dc1/{sn}", "operator", None),
        ("POST", "/api/v1/tasks/batch", "operator",
         [task_body(batch_sn, "02:00:00:00:00:03")]),
        ("PUT", "/api/v1/users/auditee", "admin", {"role": "viewer",
                                                   "password": "long-enough-1"}),
        ("POST", "/api/v1/tokens", "admin", {"user": "auditee", "label": "ci"}),
        ("PUT", "/api/v1/templates/audited", "operator", {"os_type": "Ubuntu 22.04"}),
        ("DELETE", "/api/v1/templates/audited", "operator", None),
        ("POST", f"/api/v1/servers/dc1/{sn}/clear-conflict", "approver",
         {"notes": "checked the clone"}),
        ("POST", "/api/v1/images", "admin", {"name": "audited-img", "os_type": "Audited",
                                             "os_family": "lab", "source": "upload"}),
        ("PUT", "/api/v1/images/audited-img/files/disk_image", "admin", b"x" * 4096),
        ("DELETE", "/api/v1/images/audited-img", "admin", None),
        ("PUT", f"/api/v1/servers/dc1/{sn}/bmc", "admin",
         {"driver": "redfish", "address": "192.0.2.10", "user": "root",
          "password": "bmc-secret-1"}),
        ("POST", f"/api/v1/servers/dc1/{sn}/power", "operator", {"action": "status"}),
        ("DELETE", f"/api/v1/servers/dc1/{sn}/bmc", "admin", None),
    ]
    token_id = ""
    for method, path, role, body in calls:
        if method == "FAIL":
            svc.transition("dc1", path, "booting", by="node:a")
            svc.transition("dc1", path, "failed", by="node:a", reason="disk missing")
            continue
        if method == "SUCCEED":
            svc.transition("dc1", path, "booting", by="node:a")
            svc.transition("dc1", path, "succeeded", by="node:a")
            continue
        data = body if isinstance(body, bytes) else json.dumps(body) if body is not None \
            else None
        r = c.open(path, method=method, data=data, headers=env.headers(role))
        assert r.status_code in (200, 201, 202), (path, r.get_json())
        if path == "/api/v1/tokens":
            token_id = r.get_json()["id"]
    r = c.delete(f"/api/v1/tokens/{token_id}", headers=env.headers("admin"))
    assert r.status_code == 200
    r = c.post("/api/v1/webhooks", json={"url": "http://127.0.0.1:9/hook",
                                         "events": ["task.state"]}, headers=env.headers("admin"))
    assert r.status_code == 201
    webhook_id = r.get_json()["webhook"]["id"]
    r = c.put(f"/api/v1/webhooks/{webhook_id}", json={"enabled": False},
              headers=env.headers("admin"))
    assert r.status_code == 200
    r = c.delete(f"/api/v1/webhooks/{webhook_id}", headers=env.headers("admin"))
    assert r.status_code == 200
    # one's own token needs a console session (and its CSRF token)
    session = env.app.test_client()
    r = session.post("/login", json={"user": "viewer1", "password": TEST_PASSWORD})
    assert r.status_code == 200
    r = session.post("/api/v1/session/tokens", json={"label": "mine"},
                     headers={"X-CSRF-Token": r.get_json()["csrf"]})
    assert r.status_code == 201, r.get_json()
    exercised = {f"{m} {p}" for m, p, _, _ in calls if m not in ("FAIL", "SUCCEED")} | {
        f"DELETE /api/v1/tokens/{token_id}", "POST /api/v1/webhooks",
        f"PUT /api/v1/webhooks/{webhook_id}", f"DELETE /api/v1/webhooks/{webhook_id}",
        "POST /api/v1/session/tokens"}

    records = audit_kvs(store, keys, start)
    where = {"task": keys.idc("dc1") + "machines/", "user": keys.user("auditee"),
             "token": keys.api_tokens(), "template": keys.template("audited"),
             "server": keys.server("dc1", sn), "webhook": keys.webhooks(),
             "image": keys.images(), "bmc": keys.bmc("dc1", sn),
             "power": keys.power_requests("dc1", sn)}
    for record, revision in records:
        prefix = where[record["action"].split(".")[0]]
        if record["action"].startswith("task.") and record["action"] != "task.batch_create":
            prefix = keys.task("dc1", record["target"].split("/")[1])
        changed = changes_at(store, keys.prefix + "/", revision)
        # the record and its change, and nothing else, in one revision
        assert record["key"] in changed, record
        change = changed - {record["key"]}
        assert change and all(k.startswith(prefix) for k in change), (record, changed)
    actions = sorted(r["action"] for r, _ in records)
    assert actions == sorted([
        "task.create", "task.schedule", "task.create", "task.reject", "task.approve",
        "task.retry", "task.redeploy", "task.release", "task.cancel", "task.delete",
        "task.batch_create", "user.put",
        "token.create", "token.create", "token.revoke", "template.put", "template.delete",
        "server.clear_conflict",
        "webhook.create", "webhook.update", "webhook.delete",
        "image.add", "image.upload", "image.remove", "bmc.set", "power.request",
        "bmc.delete"])
    # the API reports a record's revision (the change's); no record went
    # through a put of its own
    listed = c.get("/api/v1/audit", query_string={"target": rejected},
                   headers=env.headers("viewer")).get_json()["items"]
    reject = next(i for i in listed if i["action"] == "task.reject")
    assert reject["revision"] == svc.get("dc1", rejected).revision  # type: ignore[union-attr]
    assert reject["before"]["status"] == "pending" and reject["after"]["status"] == "rejected"
    assert not [k for k in store.puts if k.startswith(keys.audit_prefix())]
    # every mutating route of the API was exercised above
    mutating = {r for r in api_routes(env.app) if r.split(" ")[0] in ("POST", "PUT", "DELETE")}
    normalized = {_rule(e, sn, rejected, token_id, webhook_id) for e in exercised}
    assert mutating <= normalized, mutating - normalized


def _rule(call: str, *names: str) -> str:
    method, path = call.split(" ", 1)
    parts = ["{sn}" if p in names[:2] else "{token_id}" if p == names[2]
             else "{webhook_id}" if p == names[3]
             else "{idc}" if p == "dc1"
             else "{name}" if p in ("auditee", "audited", "audited-img")
             else "{role}" if p == "disk_image" else p
             for p in path.split("/")]
    return f"{method} {'/'.join(parts)}"


def test_a_lost_race_leaves_no_audit_record(env: WebEnv, store: InjectingStore,
                                            keys: Keys) -> None:
    c = env.app.test_client()
    sn = new_sn()
    created = c.post("/api/v1/tasks", json=task_body(sn), headers=env.headers("operator"))
    seen = created.get_json()["revision"]
    start = store.revision()
    # another writer changes the task between our read and our commit
    competitor = Task.from_json(store.get(keys.task("dc1", sn)).value)  # type: ignore[union-attr]
    competitor.notes = "edited concurrently"
    store.race = competitor.to_json()
    r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={"revision": seen},
               headers=env.headers("approver"))
    assert r.status_code == 409 and r.get_json()["revision"] == store.raced_revision
    assert audit_kvs(store, keys, start) == []
    assert svc_status(store, keys, sn) == "pending"
    # without a revision the write re-reads and retries: exactly one record,
    # built from the version it really replaced
    store.race = competitor.to_json()
    r = c.post(f"/api/v1/tasks/dc1/{sn}/approve", json={}, headers=env.headers("approver"))
    assert r.status_code == 200
    records = audit_kvs(store, keys, start)
    assert [(rec["action"], rev) for rec, rev in records] == \
        [("task.approve", r.get_json()["revision"])]
    assert records[0][0]["before"]["revision"] == store.raced_revision
    # a create that loses to another create: TaskExists (409), no record
    start = store.revision()
    svc = TaskService(store, keys)
    auditor = Auditor(keys, "racer")
    other = new_sn()
    store.race = Task(idc="dc1", sn=other, mac="02:00:00:00:00:09",
                      os_type="Ubuntu 22.04").to_json()
    with pytest.raises(Conflict):
        svc.create(Task(idc="dc1", sn=other, mac="02:00:00:00:00:09", os_type="Ubuntu 22.04"),
                   by="racer", audit=lambda b, a: auditor.op("task.create", other))
    assert audit_kvs(store, keys, start) == []


def svc_status(store: EtcdStore, keys: Keys, sn: str) -> str:
    stored = TaskService(store, keys).get("dc1", sn)
    assert stored is not None
    return stored.task.status


def test_a_failure_between_building_and_committing_leaves_neither(
        env: WebEnv, store: InjectingStore, keys: Keys) -> None:
    c = env.app.test_client()
    sn = new_sn()
    assert c.post("/api/v1/tasks", json=task_body(sn),
                  headers=env.headers("operator")).status_code == 201
    before = store.revision()
    store.fail = True
    try:
        for method, path, body in [
                ("POST", f"/api/v1/tasks/dc1/{sn}/approve", {}),
                ("POST", "/api/v1/tasks", task_body(new_sn(), "02:00:00:00:00:05")),
                ("PUT", "/api/v1/users/never", {"role": "viewer"}),
                ("PUT", "/api/v1/templates/never", {"os_type": "Ubuntu 22.04"})]:
            r = c.open(path, method=method, json=body,
                       headers=env.headers("admin" if "users" in path else "approver"))
            assert r.status_code == 503, (path, r.get_json())
    finally:
        store.fail = False
    assert store.revision() == before            # neither the change nor its record
    assert svc_status(store, keys, sn) == "pending"
    # the record is built, then something fails before the commit: nothing
    svc = TaskService(store, keys)
    auditor = Auditor(keys, "alice")
    built: list[Op] = []

    def broken(b: Stored | None, a: Task | None) -> Op:
        built.append(auditor.op("task.approve", f"dc1/{sn}"))
        raise RuntimeError("crash after building the record")

    with pytest.raises(RuntimeError):
        svc.transition("dc1", sn, "approved", by="alice", audit=broken)
    assert built and store.revision() == before
    assert store.get(built[0].key) is None
