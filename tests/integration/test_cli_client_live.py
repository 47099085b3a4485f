"""``lpmos login``, ``task``, ``server``, ``node``, ``audit`` and ``template``
as an operator runs them: the ``lpmos`` command in a subprocess, against a
real control plane (the app served over HTTP on loopback) on a real etcd,
with the profile file in a temporary directory."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from lpmos.client import (
    EXIT_AUTH,
    EXIT_CONFLICT,
    EXIT_INVALID,
    EXIT_NOT_FOUND,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    ApiClient,
    ApiRefused,
    ClientError,
    Unavailable,
)
from lpmos.models import Server
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from web.testing import LiveServer, WebEnv

REPO = Path(__file__).resolve().parents[2]
MAC = "00:1a:2b:3c:4d:5e"


@dataclass
class Cli:
    """``lpmos`` in a subprocess with its own profiles file."""

    env: dict[str, str]
    profiles: Path

    def __call__(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lpmos", *args], cwd=REPO, env=self.env,
                              input=stdin, capture_output=True, text=True, timeout=60)

    def json(self, *args: str) -> Any:
        r = self(*args, "--output", "json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)


@dataclass
class Plane:
    url: str
    web: WebEnv
    cli: Cli


@pytest.fixture
def plane(etcd_store: EtcdStore, keys: Keys, tmp_path: Path) -> Iterator[Plane]:
    web = WebEnv(etcd_store, keys)
    profiles = tmp_path / "home" / "lpmos" / "profiles.toml"
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("LPMOS_", "XDG_CONFIG_HOME"))}
    env.update(PYTHONPATH=str(REPO), LPMOS_CLIENT_CONFIG=str(profiles),
               HOME=str(tmp_path / "home"))
    try:
        with LiveServer(web.app) as url:
            yield Plane(url, web, Cli(env, profiles))
    finally:
        web.close()


def login(p: Plane, role: str, profile: str, *extra: str) -> None:
    r = p.cli("login", p.url, "--token", p.web.tokens[role], "--profile", profile, *extra)
    assert r.returncode == 0, r.stderr
    assert profile in r.stdout


def test_login_create_list_show_approve_and_the_exit_codes(plane: Plane) -> None:
    cli = plane.cli
    login(plane, "operator", "ops")
    login(plane, "approver", "boss")
    assert plane.cli.profiles.stat().st_mode & 0o777 == 0o600
    assert oct(plane.cli.profiles.parent.stat().st_mode & 0o777) == oct(0o700)

    r = cli("task", "create", "--idc", "dc1", "--sn", "sn-001", "--mac", MAC,
            "--os-type", "Ubuntu 22.04", "--os-version", "22.04", "--notes", "rack 12",
            "--param", "hostname=web-1")
    assert r.returncode == 0, r.stderr
    assert "created dc1/sn-001: pending" in r.stdout
    created = cli.json("task", "create", "--idc", "dc1", "--sn", "sn-002", "--mac",
                       "00:1a:2b:3c:4d:5f", "--os-type", "Ubuntu 22.04")
    assert created["task"]["status"] == "pending" and created["task"]["created_by"] == "operator1"

    # table: a header and one row per task, newest first
    r = cli("task", "list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split()[:5] == ["IDC", "SN", "MAC", "OS", "STATUS"]
    assert [line.split()[1] for line in lines[1:]] == ["sn-002", "sn-001"]
    assert "pending" in lines[2] and "rack 12" in lines[2] and MAC in lines[2]
    # json and yaml carry the API's rows; filters and --limit reach the API
    rows = cli.json("task", "list", "--search", "sn-001")
    assert [t["sn"] for t in rows] == ["sn-001"]
    r = cli("task", "list", "--output", "yaml", "--limit", "1")
    assert r.returncode == 0, r.stderr
    assert [t["sn"] for t in yaml.safe_load(r.stdout)] == ["sn-002"]
    assert "--all" in r.stderr          # told there is more
    assert [t["sn"] for t in cli.json("task", "list", "--limit", "1", "--all")] == \
        ["sn-002", "sn-001"]

    r = cli("task", "show", "dc1/sn-001")
    assert r.returncode == 0, r.stderr
    assert re.match(r"idc: +dc1\nsn: +sn-001\nmac: +\S+\nstatus: +pending\n", r.stdout)
    assert re.search(r"^params\.hostname: +web-1$", r.stdout, re.M)
    assert re.search(r"^history:\n +AT \(UTC\) +FROM +TO", r.stdout, re.M)
    shown = cli.json("task", "show", "dc1/sn-001")
    assert shown["task"]["params"] == {"hostname": "web-1"}

    # the operator may not approve: 403 is an auth failure
    r = cli("task", "approve", "dc1/sn-001")
    assert r.returncode == EXIT_AUTH, (r.returncode, r.stderr)
    assert "approver role" in r.stderr
    r = cli("task", "approve", "dc1/sn-001", "--profile", "boss", "--notes", "checked")
    assert r.returncode == 0, r.stderr
    assert "pending → approved" in r.stdout
    # approving twice is a conflict, and says why
    r = cli("task", "approve", "dc1/sn-001", "--profile", "boss")
    assert r.returncode == EXIT_CONFLICT, (r.returncode, r.stderr)
    assert "approved" in r.stderr and len(r.stderr.splitlines()) == 1
    # a stale revision is a conflict too
    revision = cli.json("task", "show", "dc1/sn-002")["revision"]
    r = cli("task", "reject", "dc1/sn-002", "--profile", "boss", "--revision",
            str(revision - 1))
    assert r.returncode == EXIT_CONFLICT, r.stderr
    r = cli("task", "reject", "dc1/sn-002", "--profile", "boss", "--notes", "wrong rack",
            "--revision", str(revision))
    assert r.returncode == 0, r.stderr
    assert "pending → rejected" in r.stdout

    cancelled = cli.json("task", "cancel", "dc1/sn-001", "--reason", "rack moved")
    assert cancelled["task"]["status"] == "cancelled"
    assert cancelled["task"]["history"][-1]["reason"] == "rack moved"
    r = cli("task", "retry", "dc1/sn-001", "--profile", "boss")
    assert r.returncode == EXIT_CONFLICT, r.stderr      # retry is for failed tasks

    # the log of a task that was never claimed: not found, with the API's reason
    r = cli("task", "log", "dc1/sn-001")
    assert r.returncode == EXIT_NOT_FOUND, r.stderr
    assert "regional node" in r.stderr

    # a missing task, a bad input, a wrong token, a malformed name
    r = cli("task", "show", "dc1/nope")
    assert r.returncode == EXIT_NOT_FOUND and "no task for dc1/nope" in r.stderr
    r = cli("task", "create", "--idc", "dc1", "--sn", "sn-003", "--mac", "not-a-mac",
            "--os-type", "Ubuntu")
    assert r.returncode == EXIT_INVALID, r.stderr
    assert "mac" in r.stderr
    r = cli("task", "list", "--token", "lpmos_wrong")
    assert r.returncode == EXIT_AUTH and "unknown or revoked" in r.stderr
    r = cli("task", "show", "sn-001")
    assert r.returncode == EXIT_USAGE and "IDC/SN" in r.stderr

    r = cli("task", "delete", "dc1/sn-002")
    assert r.returncode == 0 and "deleted dc1/sn-002" in r.stdout
    assert cli("task", "show", "dc1/sn-002").returncode == EXIT_NOT_FOUND

    # the audit log has every change with its actor
    records = cli.json("audit", "list", "--action", "task.", "--since", "1h")
    actions = [(a["action"], a["actor"]) for a in records]
    assert ("task.approve", "approver1") in actions and ("task.create", "operator1") in actions
    assert ("task.delete", "operator1") in actions
    r = cli("audit", "list", "--actor", "approver1")
    assert r.returncode == 0 and r.stdout.startswith("TIME (UTC)")
    assert "task.reject" in r.stdout and "task.create" not in r.stdout


def test_servers_nodes_and_templates(plane: Plane, etcd_store: EtcdStore, keys: Keys) -> None:
    cli = plane.cli
    login(plane, "operator", "ops")
    server = Server(idc="dc1", sn="SRV-1", macs=["52:54:00:00:00:01"],
                    boot_mac="52:54:00:00:00:01", ip="10.0.0.5", arch="x86_64",
                    first_seen=time.time(), last_seen=time.time(),
                    inventory={"schema": 1, "system": {"vendor": "QEMU", "product": "pc"},
                               "cpu": {"model": "Virtual CPU", "threads": 2}})
    etcd_store.put(keys.server("dc1", "SRV-1"), server.to_json())
    etcd_store.put(keys.node("dc1", "node-a"), json.dumps(
        {"node": "node-a", "idc": "dc1", "address": "10.0.0.1",
         "advertise_url": "http://10.0.0.1:8081", "services": ["dhcp", "tftp", "http"],
         "started_at": time.time()}).encode())
    put = plane.web.app.test_client().put("/api/v1/templates/ubuntu-web", json={
        "os_type": "Ubuntu 22.04", "os_version": "22.04", "description": "web servers",
        "params": {"hostname": "web"}}, headers=plane.web.headers("operator"))
    assert put.status_code == 200, put.get_json()

    deadline = time.monotonic() + 10
    while not cli.json("server", "list"):
        assert time.monotonic() < deadline, "the server never showed in the list"
        time.sleep(0.1)
    r = cli("server", "list")
    assert r.returncode == 0, r.stderr
    assert "SRV-1" in r.stdout and "10.0.0.5" in r.stdout and "QEMU pc" in r.stdout
    r = cli("server", "show", "dc1/SRV-1")
    assert r.returncode == 0, r.stderr
    assert re.search(r"^boot_mac: +52:54:00:00:00:01$", r.stdout, re.M)
    assert re.search(r"^  cpu\.model: +Virtual CPU$", r.stdout, re.M)
    assert cli.json("server", "show", "dc1/SRV-1")["server"]["inventory"]["cpu"]["threads"] == 2
    assert cli("server", "show", "dc1/SRV-404").returncode == EXIT_NOT_FOUND

    nodes = cli.json("node", "list")
    assert [(n["idc"], n["name"], n["alive"]) for n in nodes] == [("dc1", "node-a", True)]
    r = cli("node", "list", "--idc", "dc1")
    assert r.returncode == 0 and "http://10.0.0.1:8081" in r.stdout
    assert "dhcp, tftp, http" in r.stdout
    assert cli("node", "list", "--idc", "dc9").returncode == EXIT_NOT_FOUND

    r = cli("template", "list")
    assert r.returncode == 0 and "ubuntu-web" in r.stdout and "web servers" in r.stdout
    shown = cli.json("template", "show", "ubuntu-web")
    assert shown["params"] == {"hostname": "web"} and shown["os_type"] == "Ubuntu 22.04"
    r = cli("template", "show", "nope")
    assert r.returncode == EXIT_NOT_FOUND and "no template named nope" in r.stderr
    # a task from the template: its OS comes from it
    task = cli.json("task", "create", "--idc", "dc1", "--sn", "SRV-1", "--mac",
                    "52:54:00:00:00:01", "--template", "ubuntu-web")
    assert task["task"]["os_type"] == "Ubuntu 22.04"


def test_profiles_choose_the_control_plane(plane: Plane, tmp_path: Path) -> None:
    cli = plane.cli
    # nothing stored yet: a usage error that says what to do
    r = cli("task", "list")
    assert r.returncode == EXIT_USAGE and "lpmos login" in r.stderr
    # a wrong token is refused at login, and nothing is stored
    r = cli("login", plane.url, "--token", "lpmos_wrong")
    assert r.returncode == EXIT_AUTH and not cli.profiles.exists()
    login(plane, "viewer", "view")
    dead = f"http://127.0.0.1:{free_port()}"
    r = cli("login", dead, "--token", "whatever", "--profile", "dead", "--no-check")
    assert r.returncode == 0, r.stderr
    text = cli.profiles.read_text()
    assert 'default = "view"' in text and dead in text
    assert cli("task", "list").returncode == 0            # the default: view
    r = cli("task", "list", "--profile", "dead", "--timeout", "2")
    assert r.returncode == EXIT_UNAVAILABLE, r.stderr
    assert "cannot reach" in r.stderr and len(r.stderr.splitlines()) == 1
    r = cli("--profile", "nope", "task", "list")
    assert r.returncode == EXIT_USAGE                     # argparse: flags after the command
    r = cli("task", "--profile", "nope", "list")
    assert r.returncode == EXIT_USAGE and "no profile named 'nope'" in r.stderr
    # --url and --token without any profile
    r = cli("task", "list", "--url", plane.url, "--token", plane.web.tokens["viewer"],
            "--output", "json")
    assert r.returncode == 0 and json.loads(r.stdout) == []
    # --default moves the default
    login(plane, "admin", "root", "--default")
    assert 'default = "root"' in cli.profiles.read_text()
    assert cli.profiles.stat().st_mode & 0o777 == 0o600


def test_help_and_completion(plane: Plane, tmp_path: Path) -> None:
    cli = plane.cli
    for args in (["task"], ["task", "create"], ["task", "log"], ["webhook", "create"],
                 ["server", "show"], ["node", "list"], ["audit", "list"], ["template", "show"],
                 ["login"], ["completion"]):
        r = cli(*args, "--help")
        assert r.returncode == 0, (args, r.stderr)
        assert "exit codes:" in r.stdout and "5  conflict" in r.stdout
    r = cli("completion", "bash")
    assert r.returncode == 0, r.stderr
    script = tmp_path / "lpmos.bash"
    script.write_text(r.stdout)
    login(plane, "viewer", "view")

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        probe = (f"source {script}\nCOMP_WORDS=({' '.join(repr(w) for w in words)})\n"
                 f"COMP_CWORD={len(words) - 1}\n_lpmos\nprintf '%s\\n' \"${{COMPREPLY[@]}}\"\n")
        out = subprocess.run(["bash", "--norc", "-c", probe], capture_output=True, text=True,
                             env=cli.env, timeout=30, check=True)
        return out.stdout.split()

    assert {"task", "server", "node", "audit", "template", "webhook", "login"} <= \
        set(complete("lpmos "))
    assert complete("lpmos task ap") == ["approve"]
    assert "--revision" in complete("lpmos task approve dc1/x --")
    assert complete("lpmos task list --output y") == ["yaml"]
    assert complete("lpmos task list --profile v") == ["view"]
    assert "installing" in complete("lpmos task list --status ")


class _Answers(http.server.BaseHTTPRequestHandler):
    """503 with the API's error body, 200 that is not JSON, or no answer."""

    def do_GET(self) -> None:
        if self.path.startswith("/api/v1/slow"):
            time.sleep(3)
        status, body = (503, b'{"error": "unavailable", "detail": "etcd: down"}') \
            if self.path.startswith("/api/v1/down") else (200, b"<html>not the API</html>")
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_client_on_5xx_a_stranger_and_a_server_that_does_not_answer() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Answers)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = ApiClient(f"http://127.0.0.1:{server.server_port}", "t", timeout=0.5)
    try:
        with pytest.raises(ApiRefused) as refused:
            client.call("GET", "/down")
        assert refused.value.exit_code == EXIT_UNAVAILABLE
        assert str(refused.value) == "HTTP 503 unavailable: etcd: down"
        with pytest.raises(ClientError, match="not JSON"):
            client.call("GET", "/tasks")
        started = time.monotonic()
        with pytest.raises(Unavailable, match=r"did not answer within 0\.5 s"):
            client.call("GET", "/slow")
        assert time.monotonic() - started < 2
    finally:
        server.shutdown()
        server.server_close()


def test_webhooks_from_the_cli_reach_a_real_receiver(plane: Plane, tmp_path: Path) -> None:
    """``lpmos webhook``: create (the secret printed once), a signed delivery
    to a real receiver, the delivery log, update, delete; admins only."""
    from test_webhooks_live import Receiver

    from web.webhooks import EVENTS

    assert EVENTS == __import__("lpmos.cli_client").cli_client.WEBHOOK_EVENTS
    cli = plane.cli
    login(plane, "admin", "root")
    login(plane, "operator", "ops")
    receiver = Receiver()
    try:
        r = cli("webhook", "create", receiver.url, "--event", "task.state",
                "--description", "chat ops", "--profile", "root")
        assert r.returncode == 0, r.stderr
        secret = re.search(r"^secret: (\S+)$", r.stdout, re.M)
        assert secret is not None and "shown this once" in r.stdout
        receiver.secret = secret[1]
        ident = re.search(r"^id: +([0-9a-f]{16})$", r.stdout, re.M)
        assert ident is not None, r.stdout
        hook = ident[1]
        listed = cli.json("webhook", "list", "--profile", "root")
        assert [(w["id"], w["events"], w["enabled"]) for w in listed] == \
            [(hook, ["task.state"], True)]
        assert all("secret" not in w for w in listed)
        table = cli("webhook", "list", "--profile", "root")
        assert table.stdout.startswith("ID") and receiver.url in table.stdout

        r = cli("task", "create", "--idc", "dc1", "--sn", "sn-hook", "--mac", MAC,
                "--os-type", "Ubuntu", "--os-version", "22.04", "--profile", "ops")
        assert r.returncode == 0, r.stderr
        deadline = time.monotonic() + 10
        while not receiver.got and time.monotonic() < deadline:
            time.sleep(0.05)
        assert receiver.got and receiver.got[0]["verified"]
        assert receiver.got[0]["body"]["sn"] == "sn-hook"
        log = cli.json("webhook", "deliveries", hook, "--profile", "root")
        assert log and log[0]["outcome"] == "delivered" and log[0]["event"] == "task.state"
        shown = cli("webhook", "deliveries", hook, "--profile", "root")
        assert "delivered" in shown.stdout and shown.stdout.startswith("TIME (UTC)")

        # own secret from a file; disable; a stale revision is a conflict
        secret_file = tmp_path / "secret"
        secret_file.write_text("a-secret-of-the-operators-own\n")
        revision = cli.json("webhook", "show", hook, "--profile", "root")["webhook"]["revision"]
        updated = cli.json("webhook", "update", hook, "--disable", "--secret-file",
                           str(secret_file), "--revision", str(revision), "--profile", "root")
        assert updated["webhook"]["enabled"] is False and "secret" not in updated["webhook"]
        r = cli("webhook", "update", hook, "--enable", "--revision", str(revision),
                "--profile", "root")
        assert r.returncode == EXIT_CONFLICT, r.stderr

        # bad input: an event the API does not know, no change, a malformed id,
        # a secret too short, a file that is not there; and the roles
        r = cli("webhook", "create", receiver.url, "--event", "task.nope",
                "--profile", "root")
        assert r.returncode == EXIT_USAGE and "task.nope" in r.stderr
        r = cli("webhook", "update", hook, "--profile", "root")
        assert r.returncode == EXIT_USAGE and "nothing to change" in r.stderr
        r = cli("webhook", "show", "not-an-id", "--profile", "root")
        assert r.returncode == EXIT_USAGE and "16 hex digits" in r.stderr
        secret_file.write_text("short")
        r = cli("webhook", "create", receiver.url, "--secret-file", str(secret_file),
                "--profile", "root")
        assert r.returncode == EXIT_INVALID and "secret" in r.stderr
        r = cli("webhook", "create", receiver.url, "--secret-file",
                str(tmp_path / "missing"), "--profile", "root")
        assert r.returncode == EXIT_USAGE and "missing" in r.stderr
        r = cli("webhook", "list", "--profile", "ops")
        assert r.returncode == EXIT_AUTH, r.stderr

        r = cli("webhook", "delete", hook, "--profile", "root")
        assert r.returncode == 0 and f"deleted webhook {hook}" in r.stdout
        r = cli("webhook", "show", hook, "--profile", "root")
        assert r.returncode == EXIT_NOT_FOUND and hook in r.stderr
    finally:
        receiver.close()


def test_schedule_a_task_and_release_it_from_the_cli(plane: Plane) -> None:
    cli = plane.cli
    login(plane, "operator", "ops")
    login(plane, "approver", "boss")
    created = cli.json("task", "create", "--idc", "dc1", "--sn", "sn-sched", "--mac", MAC,
                       "--os-type", "Ubuntu 22.04", "--not-before", "2030-06-01T22:30Z",
                       "--window", "22:00-04:00")
    assert created["task"]["schedule"]["summary"] == \
        "not before 2030-06-01 22:30 UTC, window 22:00-04:00 UTC daily"
    # an operator may not reschedule (exit 3: auth); a bad window is refused (exit 4)
    r = cli("task", "schedule", "dc1/sn-sched", "--window", "01:00-02:00")
    assert r.returncode != 0 and "approver" in r.stderr, r.stderr
    r = cli("task", "schedule", "dc1/sn-sched", "--profile", "boss", "--window", "1:00")
    assert r.returncode == EXIT_INVALID and "HH:MM-HH:MM" in r.stderr, r.stderr
    # an option left out keeps its value
    r = cli("task", "schedule", "dc1/sn-sched", "--profile", "boss", "--window", "01:00-03:00")
    assert r.returncode == 0, r.stderr
    assert "not before 2030-06-01 22:30 UTC, window 01:00-03:00 UTC daily" in r.stdout
    assert "scheduled: " in r.stdout
    r = cli("task", "schedule", "dc1/sn-sched", "--profile", "boss", "--clear")
    assert r.returncode == 0 and "schedule none" in r.stdout, r.stdout
    # release: only a finished task; a pending one is a conflict
    r = cli("task", "release", "dc1/sn-sched", "--profile", "boss")
    assert r.returncode == EXIT_CONFLICT, r.stderr
    svc_task = plane.web.context.tasks
    svc_task.transition("dc1", "sn-sched", "approved", by="approver2")
    svc_task.transition("dc1", "sn-sched", "failed", by="node:n1", reason="disk")
    r = cli("task", "release", "dc1/sn-sched", "--profile", "boss", "--notes", "decommission")
    assert r.returncode == 0, r.stderr
    assert "failed → releasing (attempt 2" in r.stdout
