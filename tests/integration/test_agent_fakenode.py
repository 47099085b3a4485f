"""A small regional node for the agent's tests, following agent_api.md.

It implements the agent side of the contract faithfully enough to exercise
the agent end to end: registration with per-machine tokens (hashed, 409 on a
foreign token), heartbeats, the long-poll task endpoint, events applied with
:meth:`lpmos.tasks.TaskService.apply_events` (acking duplicates too) and the
disk image with Range / If-Range / ETag.  It runs over any
:class:`lpmos.store.Store` (the in-memory double or a real etcd) and can be
stopped and restarted on the same port, or told to cut an image download.

The tests at the bottom check the fake itself against the contract, so a
passing agent test means something.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from lpmos.models import ProgressEvent, Task, ValidationError
from lpmos.store import Store, range_all
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore
from lpmos.tasks import TaskService

FINAL = {"succeeded", "failed", "cancelled", "rejected"}


@dataclass
class FakeNode:
    store: Store
    keys: Keys
    idc: str = "dc1"
    image_path: Path | None = None
    image_sha256: str = ""
    seed: dict[str, str] = field(default_factory=lambda: {
        "user-data": "#cloud-config\nhostname: lab\n", "meta-data": "instance-id: i-1\n",
        "network-config": "version: 2\n"})
    hints: dict[str, Any] = field(default_factory=dict)
    heartbeat_interval: float = 1.0
    # fault injection
    cut_image_after: int | None = None     # close the image stream after this many bytes, once
    image_rate: float | None = None        # bytes per second of the image stream
    port: int = 0

    def __post_init__(self) -> None:
        self.tasks = TaskService(self.store, self.keys)
        self.tokens: dict[str, str] = {}          # sn -> sha256(token)
        self.applied: list[str] = []              # event ids in the order they were applied
        self.acked_requests: list[list[str]] = []
        self.heartbeats = 0
        self.registrations: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None
        self.thread: threading.Thread | None = None
        self.image_requests: list[str | None] = []   # Range header of each image GET

    # -- lifecycle
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeNode:
        node = self

        class Handler(_Handler):
            fake = node

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self.server = server
        self.thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                       daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        """Stop accepting and drop the listening socket (open streams end too)."""
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    # -- tasks
    def add_task(self, sn: str, mac: str, *, status: str = "booting") -> None:
        self.tasks.create(Task(idc=self.idc, sn=sn, mac=mac, os_type="lab", image="lab"),
                          by="test")
        self.tasks.transition(self.idc, sn, "approved", by="test")
        if status in ("booting", "installing"):
            self.tasks.transition(self.idc, sn, "booting", by="node")

    def task(self, sn: str) -> Task | None:
        stored = self.tasks.get(self.idc, sn)
        return stored.task if stored else None

    def sn_for(self, body: dict[str, Any]) -> str:
        macs = [str(m).lower() for m in body.get("macs") or []]
        for kv in range_all(self.store, self.keys.idc(self.idc)).items:
            parsed = self.keys.parse(kv.key)
            if parsed and parsed.kind == "task":
                task = Task.from_json(kv.value)
                if task.mac in macs:
                    return task.sn
        sn = str(body.get("sn") or "")
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", sn):
            return sn
        return "mac-" + str(body.get("boot_mac", "")).replace(":", "")


class _Handler(BaseHTTPRequestHandler):
    fake: FakeNode
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    # -- helpers
    def send_json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, status: int, error: str, detail: str = "") -> None:
        self.send_json(status, {"error": error, "detail": detail})

    def body(self) -> dict[str, Any]:
        length = int(self.headers.get("Content-Length") or 0)
        if length > 1024 * 1024:
            raise ValueError("body too large")
        data = json.loads(self.rfile.read(length) or b"{}")
        if not isinstance(data, dict):
            raise ValueError("not an object")
        return data

    def token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        if auth.startswith("Bearer "):
            return auth[7:]
        q = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
        return q.get("token", [None])[0]

    def authorize(self, sn: str) -> bool:
        token = self.token()
        if not token:
            self.error(401, "token required")
            return False
        digest = hashlib.sha256(token.encode()).hexdigest()
        with self.fake.lock:
            stored = self.fake.tokens.get(sn)
            owner = next((s for s, d in self.fake.tokens.items()
                          if hmac.compare_digest(d, digest)), None)
        if stored is not None and hmac.compare_digest(stored, digest):
            return True
        if owner is not None:
            self.error(403, "token of another machine")
        else:
            self.error(401, "invalid token")
        return False

    # -- routes
    def do_POST(self) -> None:
        path = urllib.parse.urlsplit(self.path).path
        try:
            body = self.body()
        except ValueError as exc:
            self.error(400, "bad body", str(exc))
            return
        if path == "/agent/v1/register":
            self.register(body)
        elif path == "/agent/v1/heartbeat":
            if self.authorize(str(body.get("sn"))):
                with self.fake.lock:
                    self.fake.heartbeats += 1
                self.send_json(200, {"server_time": time.time(), "task_status": None})
        elif path == "/agent/v1/events":
            self.events(body)
        else:
            self.error(404, "not found")

    def register(self, body: dict[str, Any]) -> None:
        fake = self.fake
        sn = fake.sn_for(body)
        token = self.token()
        new_token = None
        with fake.lock:
            fake.registrations.append(body)
            stored = fake.tokens.get(sn)
            if stored is not None:
                if not token or not hmac.compare_digest(
                        stored, hashlib.sha256(token.encode()).hexdigest()):
                    self.error(409, "token conflict", "machine already holds another token")
                    return
            else:
                new_token = secrets.token_urlsafe(24)
                fake.tokens[sn] = hashlib.sha256(new_token.encode()).hexdigest()
        stored_task = fake.tasks.get(fake.idc, sn)
        self.send_json(200, {"sn": sn, "idc": fake.idc, "token": new_token,
                             "server_time": time.time(),
                             "heartbeat_interval": fake.heartbeat_interval,
                             "task": stored_task.task.to_dict() if stored_task else None})

    def events(self, body: dict[str, Any]) -> None:
        sn = str(body.get("sn"))
        if not self.authorize(sn):
            return
        raw = body.get("events")
        if not isinstance(raw, list) or len(raw) > 500:
            self.error(400, "events: a list of at most 500")
            return
        try:
            events = [ProgressEvent.from_dict(e) for e in raw]
        except ValidationError as exc:
            self.error(400, "bad event", str(exc))
            return
        fake = self.fake
        with fake.lock:
            stored, applied = fake.tasks.apply_events(fake.idc, sn, events, by="agent")
            fake.applied.extend(applied)
            ids = [e.event_id for e in events]
            fake.acked_requests.append(ids)
        self.send_json(200, {"acked": ids, "task_status": stored.task.status})

    def do_GET(self) -> None:
        parts = urllib.parse.urlsplit(self.path)
        q = {k: v[0] for k, v in urllib.parse.parse_qs(parts.query).items()}
        if parts.path == "/agent/v1/task":
            self.task_poll(q)
        elif parts.path.startswith("/images/"):
            self.image()
        elif parts.path == "/healthz":
            self.send_json(200, {"ok": True})
        else:
            self.error(404, "not found")

    def answer_for(self, sn: str) -> dict[str, Any]:
        fake = self.fake
        stored = fake.tasks.get(fake.idc, sn)
        if stored is None:
            return {"revision": 0, "task": None, "action": "none", "install": None}
        status = stored.task.status
        # like the real node: once the agent reported the "rebooting" step, no more installs
        action = ("install" if status in ("booting", "installing")
                  and stored.task.progress.step != "rebooting"
                  else "done" if status in FINAL else "wait")
        install = None
        if action == "install":
            assert fake.image_path is not None
            install = {"mode": "image", "image": "lab",
                       "image_url": f"{fake.url}/images/lab/{fake.image_path.name}",
                       "sha256": fake.image_sha256, "size": fake.image_path.stat().st_size,
                       "root_device_hints": fake.hints, "seed": fake.seed,
                       "allow_removable": False}
        return {"revision": stored.revision, "task": stored.task.to_dict(), "action": action,
                "install": install}

    def task_poll(self, q: dict[str, str]) -> None:
        sn = q.get("sn", "")
        if not self.authorize(sn):
            return
        wait = min(float(q.get("wait", "0")), 30.0)
        revision = int(q["revision"]) if q.get("revision", "").isdigit() else None
        end = time.monotonic() + wait
        answer = self.answer_for(sn)
        while revision is not None and answer["revision"] == revision and \
                time.monotonic() < end:
            time.sleep(0.05)
            answer = self.answer_for(sn)
        self.send_json(200, answer)

    def image(self) -> None:
        fake = self.fake
        token = self.token()
        digest = hashlib.sha256((token or "").encode()).hexdigest()
        if not token or digest not in fake.tokens.values():
            self.error(401, "token required")
            return
        assert fake.image_path is not None
        data_size = fake.image_path.stat().st_size
        etag = '"' + fake.image_sha256[:16] + '"'
        start = 0
        rng = self.headers.get("Range")
        with fake.lock:
            fake.image_requests.append(rng)
        if rng and self.headers.get("If-Range", etag) == etag:
            m = re.fullmatch(r"bytes=(\d+)-", rng)
            if m and int(m.group(1)) < data_size:
                start = int(m.group(1))
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{data_size - 1}/{data_size}")
        self.send_header("Content-Length", str(data_size - start))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        self.end_headers()
        sent = 0
        with fake.image_path.open("rb") as fh:
            fh.seek(start)
            while True:
                chunk = fh.read(64 * 1024)
                if not chunk:
                    break
                cut = fake.cut_image_after
                if cut is not None and sent + len(chunk) > cut:
                    fake.cut_image_after = None
                    self.wfile.write(chunk[:max(cut - sent, 0)])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.close()
                    return
                try:
                    self.wfile.write(chunk)
                except OSError:
                    return
                sent += len(chunk)
                if fake.image_rate:
                    time.sleep(len(chunk) / fake.image_rate)
                if fake.server is None:      # stopped: drop the stream as a dead node would
                    self.connection.close()
                    return


# --- the fake against the contract ------------------------------------------------


def _post(url: str, body: dict[str, Any], token: str | None = None) -> tuple[int, dict[str, Any]]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json",
                                          **({"Authorization": f"Bearer {token}"} if token
                                             else {})})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_fake_node_issues_token_once_and_refuses_foreign_token(keys: Keys) -> None:
    node = FakeNode(MemoryStore(), keys).start()
    try:
        body = {"sn": "SN1", "macs": ["52:54:00:00:00:01"], "boot_mac": "52:54:00:00:00:01"}
        status, answer = _post(node.url + "/agent/v1/register", body)
        assert status == 200 and answer["token"]
        status, again = _post(node.url + "/agent/v1/register", body, answer["token"])
        assert status == 200 and again["token"] is None
        status, _ = _post(node.url + "/agent/v1/register", body)
        assert status == 409
        status, _ = _post(node.url + "/agent/v1/heartbeat", {"sn": "SN1", "state": "idle"})
        assert status == 401
    finally:
        node.stop()


def test_fake_node_acks_duplicates_and_applies_once(keys: Keys) -> None:
    node = FakeNode(MemoryStore(), keys).start()
    try:
        node.add_task("SN2", "52:54:00:00:00:02")
        _, answer = _post(node.url + "/agent/v1/register",
                          {"sn": "SN2", "macs": ["52:54:00:00:00:02"]})
        events = [{"source": "agent", "seq": i, "kind": "progress", "percent": i}
                  for i in range(3)]
        for _ in range(2):
            status, acked = _post(node.url + "/agent/v1/events",
                                  {"sn": "SN2", "events": events}, answer["token"])
            assert status == 200 and acked["acked"] == ["agent:0", "agent:1", "agent:2"]
        assert node.applied == ["agent:0", "agent:1", "agent:2"]
    finally:
        node.stop()
