"""Boot HTTP checks the machine token before the request.

Every machine-facing route that needs a machine token answers a request
with a bad body (or query, or path) by its token first: none or an unknown
one → 401, another machine's → 403; only the right machine's token gets to
hear what is wrong with the request (400 with a reason, or the route's own
4xx).  A real etcd and a real node's HTTP service; refusals change nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, Node, start_node, write_catalog

from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService

SN_A, MAC_A = "AUTH-A", "52:54:00:a7:00:0a"
SN_B, MAC_B = "AUTH-B", "52:54:00:a7:00:0b"
UNKNOWN = "u" * 43

#: (method, path, body, status and error for the right machine's token); ``{tok}``
#: is the token when it travels in the path.  Every row is a request that
#: names machine A (so B's token is "another machine's") and is bad.
BAD_NAMING_A: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/agent/v1/heartbeat", {"sn": SN_A, "state": ["idle"]}, 400, "bad_request"),
    ("GET", f"/agent/v1/task?sn={SN_A}&wait=soon", None, 400, "bad_request"),
    ("POST", "/agent/v1/events", {"sn": SN_A, "events": "not a list"}, 400, "bad_request"),
    ("POST", "/agent/v1/events", {"sn": SN_A, "events": [{"source": "agent", "seq": -1}]},
     400, "bad_event"),
    ("POST", f"/callback/{SN_A}", b"{not json", 400, "bad_json"),
    ("POST", f"/callback/{SN_A}", [1, 2], 400, "bad_event"),
    # GET routes have no body; a malformed config name is the route's 404
    ("GET", f"/config/{SN_A}/Not_A_Name!", None, 404, "not_found"),
    ("GET", f"/config/{SN_A}/t/{{tok}}/Not_A_Name!", None, 404, "not_found"),
]

#: requests so bad they name no machine: the token still comes first (401
#: for none or an unknown one); any machine's valid token hears the 400
BAD_NAMING_NONE: list[tuple[str, str, Any, str]] = [
    ("POST", "/agent/v1/heartbeat", {"state": "idle"}, "bad_sn"),     # no token, no sn: 401
    ("POST", "/agent/v1/events", {"events": []}, "bad_sn"),
    ("POST", "/agent/v1/events", b"not json at all", "bad_json"),
    ("POST", "/agent/v1/heartbeat", [SN_A], "bad_request"),
    ("GET", "/agent/v1/task?wait=5", None, "bad_sn"),
    ("GET", "/agent/v1/task?sn=-not-an-sn", None, "bad_sn"),
    ("POST", "/callback/-not-an-sn", {"event": "firstboot", "status": "succeeded"}, "bad_sn"),
    ("GET", "/config/-not-an-sn/user-data", None, "bad_sn"),
]

#: the app's routes that need no machine token, each with why; every other
#: route must be in the tables above (the guard test compares)
NO_MACHINE_TOKEN = {
    "/boot.ipxe", "/boot/<path:name>", "/healthz", "/metrics", "/ipxe/<file>",
    "/grub/grub.cfg", "/grub/<path:name>",   # GRUB configs: the same decision as /boot
    "/static/<path:filename>",
    "/agent/v1/register",            # optional: the token when the machine holds one
    "/images/<name>/<file>",         # any machine's token for disk images (test below)
    "/node/v1/logs/<sn>",            # the control plane's signature (test_install_log.py)
}


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "images"
    root.mkdir()
    n = start_node(etcd_server.url, keys, tmp_path / "state", "node-auth",
                   write_catalog(root)[0])
    yield n
    n.stop()


@pytest.fixture
def tokens(node: Node, etcd_store: EtcdStore, keys: Keys) -> dict[str, str]:
    """Machines A and B registered (their tokens); A has a booting task."""
    out = {}
    for sn, mac in ((SN_A, MAC_A), (SN_B, MAC_B)):
        r = requests.post(f"{node.url}/agent/v1/register", timeout=10, json={
            "sn": sn, "uuid": "", "macs": [mac], "boot_mac": mac, "arch": "x86_64",
            "inventory": {"schema": 1}, "agent_version": "test"})
        assert r.status_code == 200, r.text
        out[sn] = r.json()["token"]
    tasks = TaskService(etcd_store, keys)
    tasks.create(Task(idc=IDC, sn=SN_A, mac=MAC_A, os_type="Lab OS"), by="alice")
    for status in ("approved", "booting"):
        tasks.transition(IDC, SN_A, status, by="bob")
    return out


def send(node: Node, method: str, path: str, body: Any, token: str) -> requests.Response:
    in_path = "{tok}" in path
    url = node.url + path.replace("{tok}", token or "x" * 20)
    headers = {"Authorization": f"Bearer {token}"} if token and not in_path else {}
    if isinstance(body, bytes):
        return requests.request(method, url, data=body, timeout=10,
                                headers={**headers, "Content-Type": "application/json"})
    return requests.request(method, url, json=body, headers=headers, timeout=10)


def test_every_route_needing_a_machine_token_is_in_the_tables(node: Node) -> None:
    app = node.service.app
    rules = {r.rule for r in app.url_map.iter_rules()}
    covered = {p.split("?")[0].replace(SN_A, "<sn>").replace("{tok}", "<token>")
               .replace("Not_A_Name!", "<name>") for _, p, *_ in BAD_NAMING_A}
    assert rules - NO_MACHINE_TOKEN == covered, (rules - NO_MACHINE_TOKEN) ^ covered


@pytest.mark.parametrize(("method", "path", "body", "status", "error"), BAD_NAMING_A)
def test_token_is_judged_before_the_body(node: Node, tokens: dict[str, str],
                                         etcd_store: EtcdStore, keys: Keys, method: str,
                                         path: str, body: Any, status: int,
                                         error: str) -> None:
    task_key = keys.task(IDC, SN_A)
    before = etcd_store.get(task_key)
    in_path = "{tok}" in path
    for label, token, want, word in (
            ("no token", "", 401, "token_invalid" if in_path else "token_missing"),
            ("unknown token", UNKNOWN, 401, "token_invalid"),
            ("another machine's token", tokens[SN_B], 403, "token_other_machine"),
            ("the machine's token", tokens[SN_A], status, error)):
        r = send(node, method, path, body, token)
        assert r.status_code == want, (label, r.status_code, r.text)
        answer = r.json()
        assert answer["error"] == word and answer["detail"], (label, answer)
    after = etcd_store.get(task_key)
    assert before is not None and after is not None
    assert after.mod_revision == before.mod_revision          # refusals change nothing


@pytest.mark.parametrize(("method", "path", "body", "error"), BAD_NAMING_NONE)
def test_a_request_naming_no_machine_still_needs_a_token(node: Node, tokens: dict[str, str],
                                                         method: str, path: str, body: Any,
                                                         error: str) -> None:
    assert send(node, method, path, body, "").json()["error"] == "token_missing"
    r = send(node, method, path, body, UNKNOWN)
    assert r.status_code == 401 and r.json()["error"] == "token_invalid", r.text
    for token in (tokens[SN_A], tokens[SN_B]):      # any machine: now the request is judged
        r = send(node, method, path, body, token)
        assert r.status_code == 400 and r.json()["error"] == error, r.text


def test_disk_images_need_any_machine_token(node: Node, tokens: dict[str, str]) -> None:
    """Documented: a disk image is no one machine's secret, so any valid
    machine token fetches it (no 403); none or an unknown one is 401."""
    url = f"{node.url}/images/lab-os/disk.img"
    assert requests.get(url, timeout=10).json()["error"] == "token_missing"
    r = requests.get(url, headers={"Authorization": f"Bearer {UNKNOWN}"}, timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "token_invalid"
    r = requests.get(url, headers={"Authorization": f"Bearer {tokens[SN_B]}"},
                     timeout=10)
    assert r.status_code == 200 and len(r.content) == 1 << 20
