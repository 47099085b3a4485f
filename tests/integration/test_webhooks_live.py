"""Webhooks end to end: the admin API on a real etcd, and deliveries to real
HTTP receivers on 127.0.0.1 — one that records and checks signatures, one
that is down, one that is slower than the timeout, one that answers 500
before 200."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from lpmos.store.keys import Keys
from tests.prometheus_text import has_sample, value
from web.testing import WebEnv
from web.webhooks import post

SETTINGS = {"web.webhook_timeout": 0.3, "web.webhook_deadline": 2.5,
            "web.webhook_backoff": 0.05, "web.webhook_backoff_max": 0.2}


class Receiver:
    """An HTTP server on loopback answering POSTs with ``statuses`` in turn
    (then the last), after ``delay`` seconds; records what it got, and
    whether each signature verified with ``secret``."""

    def __init__(self, statuses: tuple[int, ...] = (204,), delay: float = 0.0) -> None:
        self.statuses = statuses
        self.delay = delay
        self.secret = ""
        self.got: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                expected = "sha256=" + hmac.new(receiver.secret.encode(), body,
                                                hashlib.sha256).hexdigest()
                with receiver.lock:
                    receiver.got.append({
                        "body": json.loads(body), "headers": dict(self.headers),
                        "verified": hmac.compare_digest(
                            self.headers.get("X-LPMOS-Signature", ""), expected)})
                    status = receiver.statuses[min(len(receiver.got) - 1,
                                                   len(receiver.statuses) - 1)]
                time.sleep(receiver.delay)
                try:
                    self.send_response(status)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                except OSError:
                    pass    # the sender gave up first (the slow receiver)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


def refused_url() -> str:
    """A loopback port nothing listens on (bound, then closed)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


@pytest.fixture
def env(etcd_store: Any, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys, settings=SETTINGS)
    yield e
    e.app.extensions["lpmos_webhooks"].stop()
    e.close()


def create(env: WebEnv, **body: Any) -> dict[str, Any]:
    r = env.app.test_client().post("/api/v1/webhooks", json=body, headers=env.headers("admin"))
    assert r.status_code == 201, r.get_json()
    got: dict[str, Any] = r.get_json()
    return got


def deliveries(env: WebEnv, ident: str) -> list[dict[str, Any]]:
    r = env.app.test_client().get(f"/api/v1/webhooks/{ident}/deliveries",
                                  headers=env.headers("admin"))
    assert r.status_code == 200, r.get_json()
    return list(r.get_json()["items"])


def until(pred: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def new_task(env: WebEnv) -> str:
    sn = "sn-" + uuid.uuid4().hex[:10]
    r = env.app.test_client().post("/api/v1/tasks", headers=env.headers("operator"), json={
        "idc": "dc1", "sn": sn, "mac": "02:00:00:00:00:01", "os_type": "Ubuntu 22.04",
        "os_version": "22.04"})
    assert r.status_code == 201, r.get_json()
    return sn


def test_a_dribbling_receiver_cannot_hold_a_delivery_past_its_timeout() -> None:
    """The timeout bounds the whole attempt, not each read."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    stop = threading.Event()

    def dribble() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 200 OK\r\n")
            for byte in b"X-Slow: " + b"a" * 200:
                if stop.wait(0.05):
                    return
                try:
                    conn.sendall(bytes([byte]))
                except OSError:
                    return

    t = threading.Thread(target=dribble, daemon=True)
    t.start()
    try:
        answer = post(f"http://127.0.0.1:{listener.getsockname()[1]}/", b"{}", {}, 0.3)
        assert answer.status is None and "timed out" in answer.error
        assert answer.duration < 0.8
    finally:
        stop.set()
        t.join(timeout=5)
        listener.close()


# -- management ---------------------------------------------------------------------------

ROUTES = [("GET", "/api/v1/webhooks"), ("POST", "/api/v1/webhooks"),
          ("GET", "/api/v1/webhooks/{id}"), ("PUT", "/api/v1/webhooks/{id}"),
          ("DELETE", "/api/v1/webhooks/{id}"), ("GET", "/api/v1/webhooks/{id}/deliveries")]


def test_only_admins_manage_webhooks(env: WebEnv) -> None:
    ident = create(env, url="http://127.0.0.1:9/x", events=["task.state"])["webhook"]["id"]
    c = env.app.test_client()
    body = {"url": "http://127.0.0.1:9/y", "events": ["task.state"]}
    before = env.store.revision()
    for method, path in ROUTES:
        path = path.replace("{id}", ident)
        assert c.open(path, method=method, json=body).status_code == 401, (method, path)
        for role in ("viewer", "operator", "approver"):
            r = c.open(path, method=method, json=body, headers=env.headers(role))
            assert r.status_code == 403, (method, path, role)
            assert "admin" in r.get_json()["detail"]
    assert env.store.revision() == before       # nothing written, not even audit


def test_secret_is_shown_once_and_changes_are_audited(env: WebEnv) -> None:
    c = env.app.test_client()
    admin = env.headers("admin")
    made = create(env, url="http://127.0.0.1:9/x", events=["task.state", "node.liveness"],
                  description="chat ops")
    ident, secret = made["webhook"]["id"], made["secret"]
    assert len(secret) >= 32 and "secret" not in made["webhook"]
    given = create(env, url="http://127.0.0.1:9/y", events=["task.state"], secret="z" * 20)
    assert given["secret"] == "z" * 20
    listed = c.get("/api/v1/webhooks", headers=admin).get_json()["items"]
    assert {w["id"] for w in listed} == {ident, given["webhook"]["id"]}
    one = c.get(f"/api/v1/webhooks/{ident}", headers=admin).get_json()["webhook"]
    assert one["events"] == ["task.state", "node.liveness"] and one["enabled"] is True
    r = c.put(f"/api/v1/webhooks/{ident}", json={"enabled": False, "revision": one["revision"]},
              headers=admin)
    assert r.status_code == 200 and r.get_json()["webhook"]["enabled"] is False
    r = c.put(f"/api/v1/webhooks/{ident}", json={"enabled": True, "revision": one["revision"]},
              headers=admin)
    assert r.status_code == 409                  # stale revision
    assert c.delete(f"/api/v1/webhooks/{ident}", headers=admin).status_code == 200
    assert c.get(f"/api/v1/webhooks/{ident}", headers=admin).status_code == 404
    assert c.delete(f"/api/v1/webhooks/{ident}", headers=admin).status_code == 404
    everything = json.dumps([listed, one])
    assert secret not in everything and "z" * 20 not in everything
    audit = c.get("/api/v1/audit", query_string={"action": "webhook."},
                  headers=admin).get_json()["items"]
    assert sorted(a["action"] for a in audit) == ["webhook.create", "webhook.create",
                                                  "webhook.delete", "webhook.update"]
    assert all(a["actor"] == "admin1" for a in audit)
    assert secret not in json.dumps(audit) and "z" * 20 not in json.dumps(audit)


@pytest.mark.parametrize(("body", "field"), [
    ({"url": "ftp://127.0.0.1/x", "events": ["task.state"]}, "url"),
    ({"url": "http://u:p@127.0.0.1/x", "events": ["task.state"]}, "url"),
    ({"url": "http://127.0.0.1/x", "events": []}, "events"),
    ({"url": "http://127.0.0.1/x", "events": ["task.deleted"]}, "events"),
    ({"url": "http://127.0.0.1/x", "events": ["task.state"], "secret": "short"}, "secret"),
    ({"url": "http://127.0.0.1/x", "events": ["task.state"], "enabled": 1}, "enabled"),
    ({"url": "http://127.0.0.1/x", "events": ["task.state"], "extra": 1}, "extra"),
])
def test_bad_input_is_refused_with_a_reason(env: WebEnv, body: dict[str, Any],
                                            field: str) -> None:
    before = env.store.revision()
    r = env.app.test_client().post("/api/v1/webhooks", json=body, headers=env.headers("admin"))
    assert r.status_code == 400, r.get_json()
    assert r.get_json()["field"] == field and r.get_json()["detail"]
    assert env.store.revision() == before


def test_bad_put_and_unknown_ids(env: WebEnv) -> None:
    c = env.app.test_client()
    admin = env.headers("admin")
    ident = create(env, url="http://127.0.0.1:9/x", events=["task.state"])["webhook"]["id"]
    r = c.put(f"/api/v1/webhooks/{ident}", json={"url": "gopher://x/"}, headers=admin)
    assert r.status_code == 400 and r.get_json()["field"] == "url"
    r = c.put(f"/api/v1/webhooks/{ident}", data=b"[1]", headers=admin)
    assert r.status_code == 400
    for bad in ("0" * 16, "../../_auth", "nothex"):
        assert c.get(f"/api/v1/webhooks/{bad}", headers=admin).status_code == 404
        assert c.put(f"/api/v1/webhooks/{bad}", json={"enabled": False},
                     headers=admin).status_code == 404


# -- delivery -------------------------------------------------------------------------------


def test_task_changes_reach_real_receivers(env: WebEnv) -> None:
    ok, flaky, slow = Receiver(), Receiver((500, 200)), Receiver(delay=2.0)
    try:
        hooks = {}
        for name, url in (("ok", ok.url), ("flaky", flaky.url), ("slow", slow.url),
                          ("down", refused_url())):
            made = create(env, url=url, events=["task.state"])
            hooks[name] = made["webhook"]["id"]
            for receiver in (ok, flaky, slow):
                if receiver.url == url:
                    receiver.secret = made["secret"]
        started = time.monotonic()
        sn = new_task(env)
        request_time = time.monotonic() - started
        assert request_time < 1.0            # delivery never holds the request
        r = env.app.test_client().post(f"/api/v1/tasks/dc1/{sn}/approve", json={},
                                       headers=env.headers("approver"))
        assert r.status_code == 200, r.get_json()

        # the recording receiver: both changes, signed, in order of revision
        until(lambda: len(ok.got) == 2)
        bodies = sorted((g["body"] for g in ok.got), key=lambda b: b["revision"])
        assert [(b["from"], b["to"]) for b in bodies] == [(None, "pending"),
                                                          ("pending", "approved")]
        assert all(g["verified"] for g in ok.got)
        first = ok.got[0]
        assert first["headers"]["X-LPMOS-Event"] == "task.state"
        assert len(first["headers"]["X-LPMOS-Delivery"]) == 32
        assert bodies[0]["idc"] == "dc1" and bodies[0]["sn"] == sn
        assert bodies[1]["task"]["status"] == "approved" and "logs" not in bodies[1]["task"]

        # 500 then 200: the retry succeeds, under the same delivery id
        until(lambda: sum(e["outcome"] == "delivered"
                          for e in deliveries(env, hooks["flaky"])) == 2)
        log = deliveries(env, hooks["flaky"])
        assert sorted(e["status"] for e in log) == [200, 200, 500]
        failed = next(e for e in log if e["status"] == 500)
        assert failed["outcome"] == "retrying"
        assert [e["delivery"] for e in log].count(failed["delivery"]) == 2
        assert all(g["verified"] for g in flaky.got)

        # down and slow: retried with back-off until the deadline, then given up
        until(lambda: sum(e["outcome"] == "gave_up" for e in deliveries(env, hooks["down"])) == 2)
        until(lambda: sum(e["outcome"] == "gave_up" for e in deliveries(env, hooks["slow"])) == 2)
        down = deliveries(env, hooks["down"])
        assert all(e["status"] is None and "Refused" in e["error"] for e in down)
        assert len(down) > 2                                   # it retried
        slow_log = deliveries(env, hooks["slow"])
        assert all(e["status"] is None and "timed out" in e["error"] for e in slow_log)
        assert all(e["duration"] < 1.0 for e in slow_log)      # the timeout held
        metrics = env.context.metrics
        assert metrics.get("webhook_dropped_total", reason="deadline") == 4
        assert metrics.get("webhook_deliveries_total", result="ok") == 4
        text = env.app.test_client().get("/metrics").get_data(as_text=True)
        assert value(text, "lpmos_webhook_deliveries_total", result="ok") == 4
        assert has_sample(text, "lpmos_webhook_queue_length")
    finally:
        for receiver in (ok, flaky, slow):
            receiver.close()


def test_node_liveness_and_disabled_webhooks(env: WebEnv, keys: Keys) -> None:
    nodes, tasks, off = Receiver(), Receiver(), Receiver()
    try:
        for r, events, enabled in ((nodes, ["node.liveness"], True),
                                   (tasks, ["task.state"], True),
                                   (off, ["task.state", "node.liveness"], False)):
            r.secret = create(env, url=r.url, events=events, enabled=enabled)["secret"]
        lease = env.store.grant(30)
        key = keys.node("dc1", "boot-1")
        env.store.put(key, json.dumps({"address": "10.0.0.5", "version": "t"}).encode(),
                      lease=lease)
        env.store.put(key, json.dumps({"address": "10.0.0.5", "version": "t",
                                       "counters": {"dhcp": 1}}).encode(), lease=lease)
        env.store.revoke(lease)          # the node's lease ends: its key goes
        until(lambda: len(nodes.got) == 2)
        got = sorted((g["body"] for g in nodes.got), key=lambda b: b["revision"])
        assert [(b["node"], b["from"], b["to"]) for b in got] == [("boot-1", "down", "up"),
                                                                   ("boot-1", "up", "down")]
        assert got[0]["registration"] == {"address": "10.0.0.5", "version": "t"}
        assert all(g["verified"] and g["headers"]["X-LPMOS-Event"] == "node.liveness"
                   for g in nodes.got)
        new_task(env)
        until(lambda: len(tasks.got) == 1)
        time.sleep(0.3)
        assert off.got == [] and len(nodes.got) == 2
    finally:
        for r in (nodes, tasks, off):
            r.close()
