"""The boot HTTP API against a real etcd: boot scripts, claims, tokens,
agent API, callbacks, files, timeline, health."""

from __future__ import annotations

import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog

from lpmos.models import Task
from lpmos.power import finish, new_request
from lpmos.store import Put
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.prometheus_text import has_sample, value

MAC = "52:54:00:aa:00:01"
UUID = "4c4c4544-0042-3010-8053-b7c04f4b4d31"


@pytest.fixture
def catalog(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "images"
    root.mkdir()
    return write_catalog(root)


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path,
         catalog: tuple[Path, dict[str, bytes]]) -> Iterator[Node]:
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    (tftp / "ipxe.efi").write_bytes(b"MZ" + b"\0" * 1000)
    (tmp_path / "secret.txt").write_text("secret")
    n = start_node(etcd_server.url, keys, tmp_path / "state-a", "node-a", catalog[0],
                   tftp__root=str(tftp))
    yield n
    n.stop()


@pytest.fixture
def tasks(etcd_store: EtcdStore, keys: Keys) -> TaskService:
    return TaskService(etcd_store, keys)


def new_task(tasks: TaskService, sn: str = "SN1", mac: str = MAC, os_type: str = "Lab OS",
             approve: bool = False, **params: Any) -> Task:
    stored = tasks.create(Task(idc=IDC, sn=sn, mac=mac, os_type=os_type, params=params),
                          by="alice")
    if approve:
        stored = tasks.transition(IDC, sn, "approved", by="bob")
    return stored.task


def synced(node: Node, sn: str, status: str | None) -> None:
    def check() -> bool:
        task = node.ctx.machines.view(sn).task
        return (task.status if task else None) == status
    eventually(check)


def boot(node: Node, mac: str = MAC, **params: str) -> requests.Response:
    return requests.get(f"{node.url}/boot/{mac}.ipxe", params=params, timeout=10)


def decision_of(text: str) -> str:
    first = text.splitlines()[1]
    return first.split("(decision ")[1].split(")")[0]


# --- boot scripts -------------------------------------------------------------------------


def test_constant_boot_script_chains_to_the_machine_url(node: Node) -> None:
    r = requests.get(f"{node.url}/boot.ipxe", timeout=5)
    assert r.status_code == 200 and r.text.startswith("#!ipxe")
    assert f"{node.url}/boot/${{net0/mac}}.ipxe?uuid=${{uuid:uristring}}" in r.text


def test_app_threads_report_work_to_the_node_while_they_have_it(node: Node) -> None:
    """Boot HTTP registers its thread pool's queue with the NodeContext;
    TFTP stops busy-polling for ACKs while it is not empty (see
    ``test_boot_http_threads_are_not_starved_by_tftp_polling``)."""
    assert len(node.ctx.busy_checks) == 1 and not node.ctx.threads_busy()
    server = node.service._server
    server.in_app += 1          # as run_app does while a request is on the pool
    try:
        assert node.ctx.threads_busy()
    finally:
        server.in_app -= 1
    assert not node.ctx.threads_busy()
    # an agent's task long-poll holds a pool thread but waits without the GIL:
    # not work (discovered machines idle in long-polls all day)
    reg = register(node, "LP-1", "52:54:00:00:09:01", "99999999-1111-1111-1111-111111111111")
    token = reg.json()["token"]
    url = f"{node.url}/agent/v1/task"
    first = requests.get(url, params={"sn": "LP-1"}, headers=auth(token), timeout=5).json()
    answers: list[int] = []
    poll = threading.Thread(target=lambda: answers.append(requests.get(
        url, params={"sn": "LP-1", "wait": 3, "revision": first["revision"]},
        headers=auth(token), timeout=10).status_code))
    poll.start()
    try:
        deadline = time.monotonic() + 5
        while node.service.boot.parked == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert node.service.boot.parked == 1 and server.in_app == 1
        assert not node.ctx.threads_busy()
    finally:
        poll.join(10)
    assert answers == [200] and node.service.boot.parked == 0


def test_percent_encoded_mac_as_ipxe_sends_it(node: Node) -> None:
    """iPXE expands ``${net0/mac}`` in a URL path as ``52%3A54%3A...``: the
    same machine, the same answer as with plain colons."""
    mac = "52:54:00:bb:01:02"
    encoded = requests.get(f"{node.url}/boot/{mac.replace(':', '%3A')}.ipxe?uuid={UUID}",
                           timeout=5)
    plain = boot(node, mac, uuid=UUID)
    assert encoded.status_code == plain.status_code == 200, encoded.text
    assert decision_of(encoded.text) == decision_of(plain.text) == "discovery"
    assert encoded.text == plain.text


def test_unknown_machine_discovers_with_no_etcd_request(node: Node) -> None:
    node.store.calls.clear()
    for i in range(20):
        r = boot(node, f"52:54:00:bb:00:{i:02x}", uuid=UUID, arch="x86_64", platform="pcbios")
        assert r.status_code == 200
        assert decision_of(r.text) == "discovery"
        assert "kernel --name vmlinuz " + node.url + "/images/live/vmlinuz" in r.text
    assert node.store.calls == []
    assert node.ctx.metrics.get("http_boot_script_etcd_requests_total",
                                decision="discovery") == 0
    assert node.ctx.metrics.get("http_boot_scripts_total", decision="discovery") == 20


def test_discovery_off_boots_the_local_disk(etcd_server: Any, keys: Keys, tmp_path: Path,
                                            catalog: tuple[Path, dict[str, bytes]]) -> None:
    n = start_node(etcd_server.url, keys, tmp_path / "s", "node-x", catalog[0],
                   http__discovery="off")
    try:
        r = boot(n, platform="efi")
        assert decision_of(r.text) == "localboot"
        assert "sanboot --no-describe --drive 0x80" in r.text
    finally:
        n.stop()


def test_bad_mac_is_refused_and_counted(node: Node) -> None:
    r = requests.get(f"{node.url}/boot/not-a-mac.ipxe", timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "bad_mac"
    assert node.ctx.metrics.get("http_requests_refused_total", reason="bad_mac") == 1
    assert requests.get(f"{node.url}/boot/{MAC}.txt", timeout=5).status_code == 404


def test_task_lifecycle_drives_the_boot_script(node: Node, tasks: TaskService) -> None:
    new_task(tasks)
    synced(node, "SN1", "pending")
    assert decision_of(boot(node).text) == "discovery"
    tasks.transition(IDC, "SN1", "approved", by="bob")
    synced(node, "SN1", "approved")
    node.store.calls.clear()
    r = boot(node, platform="pcbios")
    assert decision_of(r.text) == "claim"
    assert "lpmos.mode=install" in r.text
    assert node.store.calls.count("commit") == 1      # the CAS claim
    stored = tasks.get(IDC, "SN1")
    assert stored is not None and stored.task.status == "booting"
    assert stored.task.claimed_by == "node-a"
    assert [(h.from_status, h.to_status) for h in stored.task.history][-1] == \
        ("approved", "booting")
    synced(node, "SN1", "booting")
    assert decision_of(boot(node).text) == "continue"
    tasks.transition(IDC, "SN1", "cancelled", by="bob")
    synced(node, "SN1", "cancelled")
    node.store.calls.clear()
    assert decision_of(boot(node).text) == "localboot"
    assert node.store.calls == []


def test_lookup_by_uuid_when_the_mac_is_unknown(node: Node, tasks: TaskService) -> None:
    r = requests.post(f"{node.url}/agent/v1/register", json={
        "sn": "SRV-9", "uuid": UUID, "macs": [MAC], "boot_mac": MAC, "arch": "x86_64",
        "inventory": {}, "agent_version": "t"}, timeout=10)
    assert r.status_code == 200
    new_task(tasks, sn="SRV-9", approve=True)
    synced(node, "SRV-9", "approved")
    r = boot(node, "52:54:00:cc:cc:cc", uuid=UUID)
    assert decision_of(r.text) == "claim"


def test_install_fails_closed_when_etcd_is_unreachable(private_etcd: Any, keys: Keys,
                                                       tmp_path: Path,
                                                       catalog: tuple[Path, dict[str, bytes]]
                                                       ) -> None:
    store = EtcdStore([private_etcd.url], timeout=1.0)
    try:
        tasks = TaskService(store, keys)
        new_task(tasks, approve=True)
        n = start_node(private_etcd.url, keys, tmp_path / "s", "node-f", catalog[0],
                       etcd_timeout=0.5)
        try:
            synced(n, "SN1", "approved")
            private_etcd.stop()                      # SIGSTOP: etcd hangs
            try:
                started = time.monotonic()
                r = boot(n)
                assert time.monotonic() - started < 5
                assert r.status_code == 200 and decision_of(r.text) == "wait"
                assert "etcd unavailable" in r.text
                # non-destructive answers keep coming from the cache
                assert decision_of(boot(n, "52:54:00:dd:00:01").text) == "discovery"
                h = requests.get(f"{n.url}/healthz", timeout=10)
                assert h.status_code in (200, 503)
            finally:
                private_etcd.cont()
            assert tasks.get(IDC, "SN1").task.status == "approved"  # type: ignore[union-attr]
        finally:
            n.stop()
    finally:
        store.close()


def test_two_nodes_claiming_one_task_exactly_one_installs(
        etcd_server: Any, keys: Keys, tmp_path: Path, tasks: TaskService,
        catalog: tuple[Path, dict[str, bytes]]) -> None:
    a = start_node(etcd_server.url, keys, tmp_path / "a", "node-a", catalog[0])
    b = start_node(etcd_server.url, keys, tmp_path / "b", "node-b", catalog[0])
    try:
        for round_ in range(5):
            sn, mac = f"RACE-{round_}", f"52:54:00:ee:00:{round_:02x}"
            new_task(tasks, sn=sn, mac=mac, os_type="Rocky Linux 9", approve=True)
            synced(a, sn, "approved")
            synced(b, sn, "approved")
            barrier = threading.Barrier(2)
            answers: dict[str, str] = {}

            def fetch(n: Node, mac: str = mac) -> None:
                barrier.wait()
                answers[n.ctx.node_name] = boot(n, mac).text

            threads = [threading.Thread(target=fetch, args=(n,)) for n in (a, b)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(15)
            decisions = sorted(decision_of(t) for t in answers.values())
            assert decisions == ["claim", "wait"], answers
            winner = next(k for k, v in answers.items() if decision_of(v) == "claim")
            stored = tasks.get(IDC, sn)
            assert stored is not None and stored.task.claimed_by == winner
            assert [h.to_status for h in stored.task.history].count("booting") == 1
            assert "inst.ks=" in answers[winner]
    finally:
        a.stop()
        b.stop()


# --- tokens, configs, callbacks -------------------------------------------------------------


def register(node: Node, sn: str = "SN1", mac: str = MAC, uuid: str = UUID,
             token: str | None = None, boot_id: str = "") -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    body = {"sn": sn, "uuid": uuid, "macs": [mac], "boot_mac": mac, "arch": "x86_64",
            "inventory": {"schema": 1, "system": {"serial": sn}}, "agent_version": "test"}
    if boot_id:
        body["boot_id"] = boot_id
    return requests.post(f"{node.url}/agent/v1/register", headers=headers, json=body,
                         timeout=10)


def test_token_checks_401_403(node: Node) -> None:
    r1 = register(node, "M-ONE", "52:54:00:00:01:01", "11111111-1111-1111-1111-111111111111")
    r2 = register(node, "M-TWO", "52:54:00:00:01:02", "22222222-2222-2222-2222-222222222222")
    t1, t2 = r1.json()["token"], r2.json()["token"]
    assert t1 and t2 and t1 != t2
    url = f"{node.url}/agent/v1/heartbeat"
    body = {"sn": "M-ONE", "state": "idle"}
    assert requests.post(url, json=body, timeout=5).status_code == 401
    r = requests.post(url, json=body, headers={"Authorization": "Bearer nope-" + "x" * 20},
                      timeout=5)
    assert r.status_code == 401 and r.json()["error"] == "token_invalid"
    r = requests.post(url, json=body, headers={"Authorization": f"Bearer {t2}"}, timeout=5)
    assert r.status_code == 403 and r.json()["error"] == "token_other_machine"
    r = requests.post(url, json=body, headers={"Authorization": f"Bearer {t1}"}, timeout=5)
    assert r.status_code == 200 and r.json()["task_status"] is None
    for path in ("/config/M-ONE/user-data", "/callback/M-ONE"):
        method = requests.post if path.startswith("/callback") else requests.get
        assert method(node.url + path, timeout=5).status_code == 401
        assert method(node.url + path, params={"token": t2}, timeout=5).status_code == 403
    assert requests.get(f"{node.url}/config/M-ONE/t/{t2}/user-data", timeout=5).status_code \
        == 403
    # the token is stored hashed, never in clear
    raw = node.store.inner.get(node.ctx.keys.machine_token(IDC, "M-ONE"))
    assert raw is not None and t1.encode() not in raw.value
    assert json.loads(raw.value)["sha256"] == hashlib.sha256(t1.encode()).hexdigest()


def test_register_again_without_the_token_is_409(node: Node) -> None:
    token = register(node).json()["token"]
    assert register(node).status_code == 409
    again = register(node, token=token)
    assert again.status_code == 200 and again.json()["token"] is None


def test_register_retried_by_the_same_boot_gets_a_new_token(node: Node) -> None:
    """A registration whose answer was lost is retried without a token: the
    same boot (same kernel boot id) is re-issued one and the first token
    dies; another boot id, or none, still gets 409."""
    boot = "0f6b2e1a-5c7d-4e2f-9a3b-1c2d3e4f5a6b"
    first = register(node, boot_id=boot).json()["token"]
    assert register(node).status_code == 409
    assert register(node, boot_id="1" * 32).status_code == 409
    retried = register(node, boot_id=boot)
    assert retried.status_code == 200
    second = retried.json()["token"]
    assert second and second != first
    url = f"{node.url}/agent/v1/heartbeat"
    body = {"sn": "SN1", "state": "idle"}
    ok = requests.post(url, json=body, headers={"Authorization": f"Bearer {second}"}, timeout=5)
    assert ok.status_code == 200
    deadline = time.monotonic() + 10
    while True:    # the old token is refused once the node has seen the new one
        old = requests.post(url, json=body, headers={"Authorization": f"Bearer {first}"},
                            timeout=5)
        if old.status_code in (401, 403) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert old.status_code in (401, 403)


def test_duplicate_mac_with_another_uuid_is_flagged_and_never_installed(
        node: Node, tasks: TaskService) -> None:
    first = register(node, "CLONE-A", MAC, UUID)
    assert first.status_code == 200
    clone = register(node, "CLONE-B", MAC, "99999999-9999-9999-9999-999999999999",
                     token=first.json()["token"])
    assert clone.status_code == 200
    raw = node.store.inner.get(node.ctx.keys.server(IDC, "CLONE-A"))
    assert raw is not None and "uuid" in json.loads(raw.value)["conflict"]
    new_task(tasks, sn="CLONE-A", approve=True)
    synced(node, "CLONE-A", "approved")
    r = boot(node)
    assert decision_of(r.text) == "wait" and "conflict" in r.text
    assert tasks.get(IDC, "CLONE-A").task.status == "approved"  # type: ignore[union-attr]


def test_installer_mode_config_and_callbacks(node: Node, tasks: TaskService) -> None:
    node.service.boot.tokens.revoke_grace = 1.0
    new_task(tasks, os_type="Rocky Linux 9", approve=True, hostname="db-1")
    synced(node, "SN1", "approved")
    script = boot(node).text
    ks_url = next(w for w in script.split() if w.startswith("inst.ks="))[len("inst.ks="):]
    token = ks_url.split("/t/")[1].split("/")[0]
    ks = requests.get(ks_url, timeout=5)
    assert ks.status_code == 200 and "network --bootproto=dhcp" in ks.text
    assert "--hostname=db-1" in ks.text
    assert requests.get(f"{node.url}/config/SN1/ks.cfg", params={"token": token},
                        timeout=5).status_code == 200
    assert requests.get(f"{node.url}/config/SN1/user-data", params={"token": token},
                        timeout=5).status_code == 404
    cb = f"{node.url}/callback/SN1?token={token}"
    body = {"event": "installer", "status": "installing", "message": "pre", "percent": 5,
            "seq": 1}
    r = requests.post(cb, json=body, timeout=10)
    assert r.status_code == 200 and r.json() == {"acked": ["installer:1"],
                                                 "task_status": "installing"}
    # the Ubuntu autoinstall webhook shape is accepted too
    hook = {"event_type": "start", "origin": "curtin", "name": "cmd-install/stage-partitioning",
            "description": "configuring storage", "timestamp": time.time()}
    assert requests.post(cb, json=hook, timeout=10).status_code == 200
    done = {"event": "installer", "status": "succeeded", "message": "post", "seq": 3}
    assert requests.post(cb, json=done, timeout=10).json()["task_status"] == "succeeded"
    # repeated: idempotent
    again = requests.post(cb, json=done, timeout=10)
    assert again.status_code == 200 and again.json()["acked"] == ["installer:3"]
    stored = tasks.get(IDC, "SN1")
    assert stored is not None and stored.task.status == "succeeded"
    assert [h.to_status for h in stored.task.history].count("succeeded") == 1
    assert any("configuring storage" in line for line in stored.task.logs)
    synced(node, "SN1", "succeeded")
    assert decision_of(boot(node).text) == "localboot"
    # the token is revoked once the task ends (after a short grace)
    eventually(lambda: requests.post(cb, json=done, timeout=5).status_code == 401)


# --- the agent API ----------------------------------------------------------------------------


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_agent_register_poll_install_events_firstboot(node: Node, tasks: TaskService) -> None:
    assert decision_of(boot(node).text) == "discovery"
    reg = register(node, sn="To be filled by O.E.M.")
    assert reg.status_code == 200
    info = reg.json()
    sn, token = info["sn"], info["token"]
    assert sn == "mac-" + MAC.replace(":", "") and token
    assert info["idc"] == IDC and info["task"] is None and info["heartbeat_interval"] > 0
    assert abs(info["server_time"] - time.time()) < 5
    # heartbeat makes the liveness lease
    r = requests.post(f"{node.url}/agent/v1/heartbeat", json={"sn": sn, "state": "idle"},
                      headers=auth(token), timeout=5)
    assert r.status_code == 200
    lease = node.store.inner.get(node.ctx.keys.lease(IDC, sn))
    assert lease is not None and lease.lease != 0
    # long poll: no task; then a task appears while we wait
    url = f"{node.url}/agent/v1/task"
    first = requests.get(url, params={"sn": sn}, headers=auth(token), timeout=5).json()
    assert first["action"] == "none" and first["task"] is None

    def create_later() -> None:
        time.sleep(0.5)
        new_task(tasks, sn=sn, root_device_hints={"size_min_gb": 1})

    threading.Thread(target=create_later).start()
    started = time.monotonic()
    polled = requests.get(url, params={"sn": sn, "wait": 10, "revision": first["revision"]},
                          headers=auth(token), timeout=20).json()
    assert time.monotonic() - started < 8
    assert polled["action"] == "wait" and polled["task"]["status"] == "pending"
    # approve: the poll claims it and hands out the install
    tasks.transition(IDC, sn, "approved", by="bob")
    synced(node, sn, "approved")
    answer = requests.get(url, params={"sn": sn}, headers=auth(token), timeout=10).json()
    assert answer["action"] == "install", answer
    spec = answer["install"]
    assert spec["mode"] == "image" and spec["image"] == "lab-os"
    assert spec["image_url"] == f"{node.url}/images/lab-os/disk.img"
    assert spec["size"] == 1 << 20 and len(spec["sha256"]) == 64
    assert spec["root_device_hints"] == {"size_min_gb": 1}
    assert token in spec["seed"]["user-data"] and "lpmos-report" in spec["seed"]["user-data"]
    assert tasks.get(IDC, sn).task.status == "booting"  # type: ignore[union-attr]
    # the disk image needs the token
    assert requests.get(spec["image_url"], timeout=5).status_code == 401
    img = requests.get(spec["image_url"], headers=auth(token), timeout=10)
    assert img.status_code == 200 and hashlib.sha256(img.content).hexdigest() == spec["sha256"]
    # events: state, progress; repeated ones change nothing
    events = [{"source": "agent", "seq": 1, "kind": "state", "status": "installing",
               "message": "writing"},
              {"source": "agent", "seq": 2, "kind": "progress", "step": "write",
               "percent": 40.0, "bytes_done": 400, "bytes_total": 1000, "rate": 10.0}]
    ev_url = f"{node.url}/agent/v1/events"
    r = requests.post(ev_url, json={"sn": sn, "events": events}, headers=auth(token), timeout=10)
    assert r.status_code == 200
    assert r.json() == {"acked": ["agent:1", "agent:2"], "task_status": "installing"}
    before = tasks.get(IDC, sn)
    r = requests.post(ev_url, json={"sn": sn, "events": events}, headers=auth(token), timeout=10)
    assert r.json()["acked"] == ["agent:1", "agent:2"]
    after = tasks.get(IDC, sn)
    assert before is not None and after is not None and after.revision == before.revision
    assert after.task.progress.percent == 40.0 and after.task.progress.bytes_done == 400
    # the agent reports the reboot; the next boot goes to the disk
    reboot_ev = [{"source": "agent", "seq": 3, "kind": "progress", "step": "rebooting",
                  "percent": 100.0}]
    requests.post(ev_url, json={"sn": sn, "events": reboot_ev}, headers=auth(token), timeout=10)
    eventually(lambda: node.ctx.machines.view(sn).task.progress.step == "rebooting")  # type: ignore[union-attr]
    assert decision_of(boot(node).text) == "localboot"
    # first boot of the installed system
    fb = requests.post(f"{node.url}/callback/{sn}", headers=auth(token), timeout=10,
                       json={"event": "firstboot", "status": "succeeded", "message": "up"})
    assert fb.status_code == 200 and fb.json()["task_status"] == "succeeded"
    assert tasks.get(IDC, sn).task.status == "succeeded"  # type: ignore[union-attr]


def test_a_running_agent_waits_for_the_power_cycle_its_approval_queued(
        node: Node, tasks: TaskService, keys: Keys) -> None:
    """An approval with a BMC queues PXE + a power cycle in the same
    transaction; the agent already running in discovery does not start the
    install that cycle would cut off.  Once the cycle is done (or failed) an
    agent's poll claims as before."""
    info = register(node).json()
    sn, token = info["sn"], info["token"]
    new_task(tasks, sn=sn)
    req = new_request(IDC, sn, "provision", by="bob", now=time.time(), task_attempt=1)
    key = keys.power_request(IDC, sn, req.id)
    tasks.transition(IDC, sn, "approved", by="bob", extra=lambda _t: [Put(key, req.to_json())])
    synced(node, sn, "approved")
    url = f"{node.url}/agent/v1/task"
    answer = requests.get(url, params={"sn": sn}, headers=auth(token), timeout=10).json()
    assert answer["action"] == "wait" and answer["install"] is None, answer
    assert tasks.get(IDC, sn).task.status == "approved"  # type: ignore[union-attr]
    for step in req.steps:
        step.state = "done"
    finish(req, time.time())
    tasks.store.put(key, req.to_json())
    answer = requests.get(url, params={"sn": sn}, headers=auth(token), timeout=10).json()
    assert answer["action"] == "install", answer
    assert tasks.get(IDC, sn).task.status == "booting"  # type: ignore[union-attr]


def test_events_are_validated_and_bounded(node: Node, tasks: TaskService) -> None:
    token = register(node).json()["token"]
    new_task(tasks)
    url = f"{node.url}/agent/v1/events"
    bad = {"sn": "SN1", "events": [{"source": "agent", "seq": -1}]}
    r = requests.post(url, json=bad, headers=auth(token), timeout=5)
    assert r.status_code == 400 and r.json()["error"] == "bad_event"
    many = {"sn": "SN1", "events": [{"source": "agent", "seq": i} for i in range(501)]}
    assert requests.post(url, json=many, headers=auth(token), timeout=5).status_code == 400
    nested = "[" * 100000 + "]" * 100000
    r = requests.post(url, data=nested, headers={**auth(token), "Content-Type": _json()},
                      timeout=10)
    assert r.status_code == 400
    huge = b'{"sn": "SN1", "events": [], "x": "' + b"a" * (2 << 20) + b'"}'
    r = requests.post(url, data=huge, headers={**auth(token), "Content-Type": _json()},
                      timeout=10)
    assert r.status_code == 413


def _json() -> str:
    return "application/json"


def test_event_storm_is_coalesced(node: Node, tasks: TaskService) -> None:
    token = register(node).json()["token"]
    new_task(tasks, approve=True)
    tasks.transition(IDC, "SN1", "booting", by="x")
    url = f"{node.url}/agent/v1/events"
    errors: list[int] = []

    def sender(source: str) -> None:
        with requests.Session() as s:
            for seq in range(1, 26):
                ev = [{"source": source, "seq": seq, "kind": "progress", "percent": float(seq),
                       "message": f"{source} {seq}"}]
                r = s.post(url, json={"sn": "SN1", "events": ev}, headers=auth(token),
                           timeout=15)
                if r.status_code != 200:
                    errors.append(r.status_code)

    start_rev = tasks.get(IDC, "SN1").revision  # type: ignore[union-attr]
    threads = [threading.Thread(target=sender, args=(f"src{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    stored = tasks.get(IDC, "SN1")
    assert stored is not None
    assert stored.task.event_seq == {f"src{i}": 25 for i in range(6)}
    writes = node.ctx.metrics.get("http_events_etcd_writes_total")
    assert writes < 150          # 150 events, fewer writes
    assert stored.revision > start_rev


# --- files ---------------------------------------------------------------------------------


def test_images_range_and_etag(node: Node, catalog: tuple[Path, dict[str, bytes]]) -> None:
    data = catalog[1]["live/vmlinuz"]
    url = f"{node.url}/images/live/vmlinuz"
    full = requests.get(url, timeout=10)
    assert full.status_code == 200 and full.content == data
    assert full.headers["Accept-Ranges"] == "bytes"
    etag = full.headers["ETag"]
    assert requests.get(url, headers={"If-None-Match": etag}, timeout=5).status_code == 304
    part = requests.get(url, headers={"Range": "bytes=100-199"}, timeout=5)
    assert part.status_code == 206 and part.content == data[100:200]
    assert part.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    tail = requests.get(url, headers={"Range": "bytes=-10"}, timeout=5)
    assert tail.status_code == 206 and tail.content == data[-10:]
    openended = requests.get(url, headers={"Range": f"bytes={len(data) - 5}-"}, timeout=5)
    assert openended.content == data[-5:]
    bad = requests.get(url, headers={"Range": f"bytes={len(data) + 5}-"}, timeout=5)
    assert bad.status_code == 416 and bad.headers["Content-Range"] == f"bytes */{len(data)}"
    stale = requests.get(url, headers={"Range": "bytes=0-9", "If-Range": '"other"'}, timeout=5)
    assert stale.status_code == 200 and stale.content == data
    for path in ("/images/live/catalog.toml", "/images/nope/vmlinuz",
                 "/images/live/..%2Fcatalog.toml", "/images/lab-os/vmlinuz"):
        assert requests.get(node.url + path, timeout=5).status_code == 404


def test_ipxe_binaries_from_the_tftp_root_only(node: Node) -> None:
    r = requests.get(f"{node.url}/ipxe/ipxe.efi", timeout=5)
    assert r.status_code == 200 and r.content.startswith(b"MZ")
    for path in ("/ipxe/..%2Fsecret.txt", "/ipxe/../secret.txt", "/ipxe/.hidden",
                 "/ipxe/missing.efi"):
        assert requests.get(node.url + path, timeout=5).status_code == 404


# --- timeline, health, limits ---------------------------------------------------------------


def test_timeline_of_a_simulated_boot(node: Node) -> None:
    mac = "52:54:00:77:00:01"
    node.ctx.timeline.record(mac, "dhcp answer", {"mac": mac, "ip": "10.77.0.50",
                                                  "boot_file": "undionly.kpxe"})
    node.ctx.timeline.record("ip:10.77.0.50", "tftp file sent", {"file": "undionly.kpxe"})
    assert decision_of(boot(node, mac).text) == "discovery"
    time.sleep(0.5)   # flushed while the SN is still unknown: kept in memory
    token = register(node, "TL-1", mac, "33333333-3333-3333-3333-333333333333").json()["token"]
    assert token

    def stages() -> list[str]:
        return [e["stage"] for e in node.timeline.read("TL-1")]

    eventually(lambda: len(stages()) >= 4, timeout=10)
    got = stages()
    assert got[:4] == ["dhcp answer", "tftp file sent", "boot script", "agent registered"]
    entries = node.timeline.read("TL-1")
    assert entries[2]["detail"]["decision"] == "discovery"
    assert all(e["node"] == "node-a" for e in entries)


def test_healthz_and_metrics(node: Node) -> None:
    boot(node)
    h = requests.get(f"{node.url}/healthz", timeout=5)
    assert h.status_code == 200
    body = h.json()
    assert body["status"] == "ok" and body["etcd"]["reachable"] is True
    assert body["cache"]["staleness_seconds"] < 5
    m = requests.get(f"{node.url}/metrics", timeout=5)
    assert m.status_code == 200
    assert value(m.text, "lpmos_http_boot_scripts_total", decision="discovery") == 1
    assert value(m.text, "lpmos_http_boot_script_seconds_count") == 1
    assert has_sample(m.text, "lpmos_http_boot_script_seconds_bucket", le="+Inf")
    # the server's own gauges: this client's connection is open; /metrics itself
    # runs on the app's threads (boot scripts are answered inline)
    assert value(m.text, "lpmos_http_connections_open") >= 1
    assert value(m.text, "lpmos_http_requests_in_app") == 1


@pytest.mark.slow
def test_slow_client_is_cut_off(etcd_server: Any, keys: Keys, tmp_path: Path,
                                catalog: tuple[Path, dict[str, bytes]]) -> None:
    n = start_node(etcd_server.url, keys, tmp_path / "s", "node-t", catalog[0],
                   http__timeout="2")
    try:
        with socket.create_connection(("127.0.0.1", n.service.port), timeout=15) as sock:
            sock.sendall(b"GET /boot.ipxe HTTP/1.1\r\nHost: x\r\n")   # never finishes
            started = time.monotonic()
            data = b""
            while chunk := sock.recv(4096):          # 408, then closed by the server
                data += chunk
            assert data.startswith(b"HTTP/1.1 408 "), data
            assert b'"request_timeout"' in data and b"Connection: close" in data
            assert time.monotonic() - started < 12
        big = {"X-Big": "a" * 20000}
        r = requests.get(f"{n.url}/boot.ipxe", headers=big, timeout=5)
        assert r.status_code in (400, 431)
    finally:
        n.stop()


# --- lpmos render ------------------------------------------------------------------------------


def test_lpmos_render_previews_a_task(etcd_server: Any, keys: Keys, tmp_path: Path,
                                      tasks: TaskService, capsys: pytest.CaptureFixture[str],
                                      catalog: tuple[Path, dict[str, bytes]]) -> None:
    from lpmos.cli import main

    new_task(tasks, sn="R-1", os_type="Rocky Linux 9", approve=True, hostname="r1",
             timezone="UTC")
    common = ["--etcd-endpoints", etcd_server.url, "--etcd-prefix", keys.prefix,
              "--catalog", str(catalog[0]), "--state-dir", str(tmp_path),
              "--advertise-url", "http://10.0.0.1:8081"]
    assert main(["render", "--task", f"{IDC}/R-1", "--template", "ks.cfg", *common]) == 0
    out = capsys.readouterr().out
    assert "network --bootproto=dhcp" in out and "--hostname=r1" in out
    assert "PREVIEW-TOKEN-NOT-VALID" in out
    assert main(["render", "--task", f"{IDC}/R-1", *common]) == 0
    out = capsys.readouterr().out
    assert "(decision claim)" in out and "inst.ks=http://10.0.0.1:8081/config/R-1/t/" in out
    assert tasks.get(IDC, "R-1").task.status == "approved"  # type: ignore[union-attr]
    # a refused value names the template
    tasks.update(IDC, "R-1", lambda t: t.params.update(timezone="UTC\nreboot"))
    assert main(["render", "--task", f"{IDC}/R-1", "--template", "ks.cfg", *common]) == 1
    err = capsys.readouterr().err
    assert "kickstart/rhel9.ks.j2" in err and "newline" in err
    assert main(["render", "--task", f"{IDC}/NOPE", *common]) == 1
    capsys.readouterr()
    # a name that is neither a path, 'boot' nor a config name says what would be
    assert main(["render", "--task", f"{IDC}/R-1", "--template", "nope.j2", *common]) == 1
    err = capsys.readouterr().err
    assert "'nope.j2' is not a template path" in err and "ks.cfg" in err, err


def test_an_arm64_machine_is_never_sent_an_x86_64_image(node: Node, tasks: TaskService) -> None:
    """iPXE says which architecture it runs on (``${buildarch}``): an approved
    task whose image is built for x86_64 is not claimed by an arm64 boot, the
    script says why, and nothing is written; the same machine booting as
    x86_64 (BIOS undionly.kpxe is an i386 build) claims it."""
    new_task(tasks, sn="ARCH1", mac="52:54:00:a6:40:01", os_type="Rocky Linux 9", approve=True)
    synced(node, "ARCH1", "approved")
    node.store.calls.clear()
    r = boot(node, "52:54:00:a6:40:01", arch="arm64", platform="efi")
    assert decision_of(r.text) == "wait"
    assert "built for x86_64, and this machine is arm64" in r.text
    assert "inst.ks=" not in r.text
    assert node.store.calls == []                       # no claim, no write
    stored = tasks.get(IDC, "ARCH1")
    assert stored is not None and stored.task.status == "approved"
    r = boot(node, "52:54:00:a6:40:01", arch="i386", platform="pcbios")
    assert decision_of(r.text) == "claim" and "inst.ks=" in r.text
