"""The full install log, end to end on a real etcd: progress
events through a regional node's boot HTTP, the node's own log files, the
node API signed with the key from etcd, and the control plane's
``GET /api/v1/tasks/{idc}/{sn}/log`` fetching it from the node that served
the attempt."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog

from bootsvc.node import NodeRegistration
from lpmos.client import EXIT_NOT_FOUND, EXIT_UNAVAILABLE
from lpmos.models import LOG_LINES_KEPT, Task
from lpmos.nodeapi import SharedKey, sign
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from web.testing import LiveServer, WebEnv

REPO = Path(__file__).resolve().parents[2]
NODE = "node-log"
MAX_BYTES = 256 * 1024
SEQ = iter(range(1, 10**9))        # the agent's sequence numbers, increasing across attempts


@dataclass
class Lab:
    node: Node
    registration: NodeRegistration
    env: WebEnv
    tasks: TaskService
    store: EtcdStore
    keys: Keys
    state: Path

    def cp_log(self, sn: str, **params: Any) -> Any:
        return self.env.app.test_client().get(f"/api/v1/tasks/{IDC}/{sn}/log",
                                              query_string=params,
                                              headers=self.env.headers("viewer"))


@pytest.fixture
def lab(etcd_server: Any, etcd_store: EtcdStore, keys: Keys, tmp_path: Path) -> Iterator[Lab]:
    root = tmp_path / "images"
    root.mkdir()
    node = start_node(etcd_server.url, keys, tmp_path / "state", NODE, write_catalog(root)[0],
                      install_log__max_bytes=str(MAX_BYTES))
    registration = NodeRegistration(node.ctx, {"node": NODE, "idc": IDC,
                                               "advertise_url": node.url})
    registration.start()
    env = WebEnv(etcd_store, keys, settings={"web.node_timeout": 1.0})
    lab = Lab(node, registration, env, TaskService(etcd_store, keys), etcd_store, keys,
              tmp_path / "state")
    eventually(lambda: env.context.index.node(IDC, NODE) is not None)
    try:
        yield lab
    finally:
        env.close()
        registration.stop()
        node.stop()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def installing(lab: Lab, sn: str, mac: str) -> str:
    """A machine whose agent registered, whose task was approved and claimed
    by the agent's poll on our node; its token."""
    r = requests.post(f"{lab.node.url}/agent/v1/register", timeout=10, json={
        "sn": sn, "uuid": "", "macs": [mac], "boot_mac": mac, "arch": "x86_64",
        "inventory": {"schema": 1}, "agent_version": "test"})
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    if lab.tasks.get(IDC, sn) is None:
        lab.tasks.create(Task(idc=IDC, sn=sn, mac=mac, os_type="Lab OS"), by="alice")
        lab.tasks.transition(IDC, sn, "approved", by="bob")
    claim(lab, sn, token)
    return token


def claim(lab: Lab, sn: str, token: str) -> None:
    eventually(lambda: (t := lab.node.ctx.machines.view(sn).task) is not None
               and t.status == "approved")
    answer = requests.get(f"{lab.node.url}/agent/v1/task", params={"sn": sn},
                          headers=bearer(token), timeout=10).json()
    assert answer["action"] == "install", answer
    attempt = answer["task"]["attempt"]
    assert answer["task"]["attempt_nodes"][str(attempt)] == NODE
    eventually(lambda: (e := lab.env.context.index.task(IDC, sn)) is not None
               and e.task.node_of_attempt(attempt) == NODE)


def log_events(lines: list[str]) -> list[dict[str, Any]]:
    return [{"source": "agent", "seq": next(SEQ), "kind": "log", "message": line}
            for line in lines]


def post(lab: Lab, sn: str, token: str, events: list[dict[str, Any]]) -> None:
    r = requests.post(f"{lab.node.url}/agent/v1/events", json={"sn": sn, "events": events},
                      headers=bearer(token), timeout=20)
    assert r.status_code == 200, r.text
    assert r.json()["acked"] == [f"{e['source']}:{e['seq']}" for e in events]


def test_full_log_through_the_node_and_the_control_plane(lab: Lab) -> None:
    token = installing(lab, "LOG-1", "52:54:00:10:00:01")
    lines = [f"step {i:04d} of the install, with some words to make it long" for i in range(450)]
    batches = [log_events(lines[i:i + 150]) for i in range(0, 450, 150)]
    for batch in batches:
        post(lab, "LOG-1", token, batch)
    post(lab, "LOG-1", token, batches[1])           # a replay: the agent lost its ack
    post(lab, "LOG-1", token, batches[2][:10] + batches[0][-5:])
    expected = [f"[agent] {line}" for line in lines]
    stored = lab.tasks.get(IDC, "LOG-1")
    assert stored is not None and stored.task.logs == expected[-LOG_LINES_KEPT:]
    r = lab.cp_log("LOG-1")
    assert r.status_code == 200, r.get_json()
    got = r.get_json()
    assert got["lines"] == expected                 # all 450, once each, in order
    assert (got["attempt"], got["attempts"], got["node"], got["first_line"],
            got["truncated"]) == (1, 1, NODE, 0, False)
    # reading writes no audit record, and the node-API key is in no answer
    audit_before = len(lab.store.range(lab.keys.audit_prefix()).items)
    secret = SharedKey(lab.store, lab.keys).get().hex()
    assert secret not in r.get_data(as_text=True)
    assert secret not in requests.get(f"{lab.node.url}/metrics", timeout=5).text
    assert lab.cp_log("LOG-1", attempt=1).get_json()["lines"] == expected
    assert len(lab.store.range(lab.keys.audit_prefix()).items) == audit_before
    # the log route needs a viewer at least
    anonymous = lab.env.app.test_client().get(f"/api/v1/tasks/{IDC}/LOG-1/log")
    assert anonymous.status_code == 401


def test_attempts_are_kept_apart_and_selected(lab: Lab) -> None:
    token = installing(lab, "LOG-2", "52:54:00:10:00:02")
    post(lab, "LOG-2", token, log_events([f"first try {i}" for i in range(3)]))
    post(lab, "LOG-2", token, [{"source": "agent", "seq": next(SEQ), "kind": "state",
                                "status": "failed", "message": "disk not found"}])
    eventually(lambda: (e := lab.env.context.index.task(IDC, "LOG-2")) is not None
               and e.task.status == "failed")
    r = lab.env.app.test_client().post(f"/api/v1/tasks/{IDC}/LOG-2/retry",
                                       json={"notes": "disk replaced"},
                                       headers=lab.env.headers("approver"))
    assert r.status_code == 200, r.get_json()
    claim(lab, "LOG-2", token)
    post(lab, "LOG-2", token, log_events(["second try 0", "second try 1"]))
    current = lab.cp_log("LOG-2").get_json()
    assert (current["attempt"], current["attempts"]) == (2, 2)
    assert current["lines"] == ["[agent] second try 0", "[agent] second try 1"]
    first = lab.cp_log("LOG-2", attempt=1).get_json()
    assert first["lines"] == [f"[agent] first try {i}" for i in range(3)] + \
        ["[agent] disk not found"]
    for bad in (0, 3, -1):
        r = lab.cp_log("LOG-2", attempt=bad)
        assert r.status_code == 404 and r.get_json()["error"] == "no_attempt", r.get_json()
    r = lab.cp_log("LOG-2", attempt="two")
    assert r.status_code == 400 and "attempt" in r.get_json()["detail"]
    r = lab.cp_log("NO-SUCH-TASK")
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"
    # a task approved but never claimed: no node keeps a log of it
    lab.tasks.create(Task(idc=IDC, sn="LOG-UNCLAIMED", mac="52:54:00:10:00:09",
                          os_type="Lab OS"), by="alice")
    eventually(lambda: lab.env.context.index.task(IDC, "LOG-UNCLAIMED") is not None)
    assert lab.cp_log("LOG-UNCLAIMED").get_json()["error"] == "no_attempt"
    lab.tasks.transition(IDC, "LOG-UNCLAIMED", "approved", by="bob")
    eventually(lambda: (e := lab.env.context.index.task(IDC, "LOG-UNCLAIMED")) is not None
               and e.task.attempt == 1)
    r = lab.cp_log("LOG-UNCLAIMED")
    assert r.status_code == 404 and r.get_json()["error"] == "no_log"


def test_the_cli_prints_each_attempts_log_from_the_node(lab: Lab, tmp_path: Path) -> None:
    """``lpmos task log`` as an operator runs it, in a subprocess against the
    control plane over HTTP, which fetches the log from the node that served
    the attempt."""
    token = installing(lab, "LOG-CLI", "52:54:00:10:00:0c")
    post(lab, "LOG-CLI", token, log_events(["partitioning /dev/vda", "writing image 40 %"]))
    post(lab, "LOG-CLI", token, [{"source": "agent", "seq": next(SEQ), "kind": "state",
                                  "status": "failed", "message": "checksum mismatch"}])
    eventually(lambda: (e := lab.env.context.index.task(IDC, "LOG-CLI")) is not None
               and e.task.status == "failed")
    r = lab.env.app.test_client().post(f"/api/v1/tasks/{IDC}/LOG-CLI/retry", json={},
                                       headers=lab.env.headers("approver"))
    assert r.status_code == 200, r.get_json()
    claim(lab, "LOG-CLI", token)
    post(lab, "LOG-CLI", token, log_events(["second attempt: writing image"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path), LPMOS_CLIENT_CONFIG=str(tmp_path / "p"))
    with LiveServer(lab.env.app) as url:
        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run([sys.executable, "-m", "lpmos", "task", "log", *args,
                                   "--url", url, "--token", lab.env.tokens["viewer"]],
                                  cwd=REPO, env=env, capture_output=True, text=True,
                                  timeout=60)
        current = cli(f"{IDC}/LOG-CLI")
        assert current.returncode == 0, current.stderr
        assert current.stdout == "[agent] second attempt: writing image\n"
        assert f"attempt 2 of 2, from node {NODE}" in current.stderr
        first = cli(f"{IDC}/LOG-CLI", "--attempt", "1")
        assert first.returncode == 0, first.stderr
        assert first.stdout.splitlines() == ["[agent] partitioning /dev/vda",
                                             "[agent] writing image 40 %",
                                             "[agent] checksum mismatch"]
        as_json = cli(f"{IDC}/LOG-CLI", "--attempt", "1", "--output", "json")
        assert json.loads(as_json.stdout)["lines"] == first.stdout.splitlines()
        missing = cli(f"{IDC}/LOG-CLI", "--attempt", "3")
        assert missing.returncode == EXIT_NOT_FOUND and "attempt" in missing.stderr
        lab.registration.stop()                         # the node that has the log is gone
        eventually(lambda: lab.env.context.index.node(IDC, NODE) is None)
        gone = cli(f"{IDC}/LOG-CLI")
        assert gone.returncode == EXIT_UNAVAILABLE, (gone.returncode, gone.stderr)
        assert NODE in gone.stderr


def test_the_bound_per_attempt_holds_and_says_what_it_dropped(lab: Lab) -> None:
    token = installing(lab, "LOG-3", "52:54:00:10:00:03")
    total = 3000
    lines = [f"{i:05d} " + "x" * 200 for i in range(total)]
    for i in range(0, total, 500):
        post(lab, "LOG-3", token, log_events(lines[i:i + 500]))
    folder = lab.state / "logs" / NODE / "LOG-3"
    on_disk = sum(p.stat().st_size for p in folder.iterdir())
    assert MAX_BYTES // 2 < on_disk <= MAX_BYTES + 4096, on_disk
    got = lab.cp_log("LOG-3").get_json()
    assert got["truncated"] and got["first_line"] > 0
    assert got["first_line"] + len(got["lines"]) == total     # nothing lost in the middle
    assert got["lines"] == [f"[agent] {line}" for line in lines[got["first_line"]:]]


def test_the_node_api_refuses_anyone_but_the_control_plane(lab: Lab) -> None:
    token = installing(lab, "LOG-4", "52:54:00:10:00:04")
    post(lab, "LOG-4", token, log_events(["hello"]))
    key = SharedKey(lab.store, lab.keys).get()
    target = "/node/v1/logs/LOG-4?attempt=1"
    url = lab.node.url + target

    def get(auth: str | None) -> requests.Response:
        return requests.get(url, headers={"Authorization": auth} if auth else {}, timeout=5)

    now = time.time()
    for auth in (None, f"Bearer {token}", sign(b"k" * 32, "GET", target, now),
                 sign(key, "GET", "/node/v1/logs/LOG-4?attempt=2", now),
                 sign(key, "GET", target, now - 3600), "LPMOS-HMAC t=1,sig=zz"):
        r = get(auth)
        assert r.status_code == 401 and r.json()["error"] == "unauthorized", (auth, r.text)
        assert "hello" not in r.text
    r = get(sign(key, "GET", target, now))
    assert r.status_code == 200 and r.json()["lines"] == ["[agent] hello"]
    assert get(sign(key, "GET", "/node/v1/logs/LOG-4?attempt=7", now)).status_code == 401
    missing = requests.get(lab.node.url + "/node/v1/logs/LOG-4?attempt=7", timeout=5,
                           headers={"Authorization": sign(key, "GET", "/node/v1/logs/LOG-4"
                                                          "?attempt=7", now)})
    assert missing.status_code == 404 and missing.json()["error"] == "no_log"


def _served_by(lab: Lab, sn: str, node: str, mac: str) -> None:
    lab.tasks.create(Task(idc=IDC, sn=sn, mac=mac, os_type="Lab OS"), by="alice")
    lab.tasks.transition(IDC, sn, "approved", by="bob")
    lab.tasks.transition(IDC, sn, "booting", by=f"node:{node}",
                         mutate=lambda t: t.served_by(node))
    eventually(lambda: (e := lab.env.context.index.task(IDC, sn)) is not None
               and e.task.node_of_attempt(1) == node)


def _register_fake_node(lab: Lab, name: str, url: str) -> None:
    lab.store.put(lab.keys.node(IDC, name), json.dumps({"node": name,
                                                        "advertise_url": url}).encode())
    eventually(lambda: lab.env.context.index.node(IDC, name) is not None)


def timed(lab: Lab, sn: str) -> tuple[Any, float]:
    started = time.monotonic()
    r = lab.cp_log(sn)
    return r, time.monotonic() - started


def test_a_node_that_is_down_or_hangs_is_a_quick_5xx(lab: Lab) -> None:
    # registered, but its port is closed: 503 at once
    _served_by(lab, "LOG-5", "node-closed", "52:54:00:10:00:05")
    _register_fake_node(lab, "node-closed", f"http://127.0.0.1:{free_port()}")
    r, took = timed(lab, "LOG-5")
    assert r.status_code == 503 and r.get_json()["error"] == "node_unavailable", r.get_json()
    assert took < 1.0 and "node-closed" in r.get_json()["detail"]
    # registered, accepts the connection and never answers: 504 after --node-timeout (1 s)
    hung = socket.socket()
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    try:
        _served_by(lab, "LOG-6", "node-hung", "52:54:00:10:00:06")
        _register_fake_node(lab, "node-hung", f"http://127.0.0.1:{hung.getsockname()[1]}")
        r, took = timed(lab, "LOG-6")
        assert r.status_code == 504 and r.get_json()["error"] == "node_timeout", r.get_json()
        assert 0.9 < took < 2.5, took
    finally:
        hung.close()
    # the real node stops: its registration goes with its lease, 503 without a call
    token = installing(lab, "LOG-7", "52:54:00:10:00:07")
    post(lab, "LOG-7", token, log_events(["before the node stopped"]))
    assert lab.cp_log("LOG-7").status_code == 200
    lab.registration.stop()                          # revokes the node's lease
    eventually(lambda: lab.env.context.index.node(IDC, NODE) is None)
    r, took = timed(lab, "LOG-7")
    assert r.status_code == 503 and r.get_json()["error"] == "node_unavailable", r.get_json()
    assert took < 1.0 and "not registered" in r.get_json()["detail"]
