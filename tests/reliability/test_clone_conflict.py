"""RELIABILITY "duplicate MAC / cloned VM (same MAC, other UUID) → flagged as a
conflict, no install served to either".

tests/integration/test_boot_http.py already proves the simplest case (the
clone registers with the original's token; the boot script waits).  This
adds what it leaves out, on the real ``lpmos regional`` process:

* the clone as it really arrives — it boots (which resets the machine's
  token), its agent registers without any token — and then *neither* agent
  gets an install through the task long-poll, and neither boot script
  (original UUID or clone UUID) is an install;
* the clone booting after the task was already approved, before any agent
  of it registered: the boot script carries the clone's UUID, which differs
  from the registered one; it must not be handed the install.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.models import Server, Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import IDC, Regional, auth, decision_of, eventually, register

MAC = "52:54:00:c1:00:01"
UUID_A = "c1c1c1c1-0000-4000-8000-00000000000a"
UUID_B = "c1c1c1c1-0000-4000-8000-00000000000b"


def boot(node: Regional, uuid: str) -> requests.Response:
    return requests.get(f"{node.url}/boot/{MAC}.ipxe", params={"uuid": uuid}, timeout=30)


def server(store: EtcdStore, keys: Keys, sn: str) -> Server:
    kv = store.get(keys.server(IDC, sn))
    assert kv is not None
    return Server.from_json(kv.value)


def poll(node: Regional, sn: str, token: str) -> requests.Response:
    return requests.get(f"{node.url}/agent/v1/task", params={"sn": sn}, headers=auth(token),
                        timeout=30)


@pytest.mark.slow
def test_clone_that_boots_and_registers_gets_no_install_nor_does_the_original(
        etcd_server: Any, keys: Keys, regional_factory: Callable[..., Regional]) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tasks = TaskService(store, keys)
    node = regional_factory(etcd_server.url, keys.prefix).start(wait_for=("ok",))
    try:
        assert decision_of(boot(node, UUID_A).text) == "discovery"
        first = register(node.url, "VM-A", MAC, UUID_A)
        assert first.status_code == 200 and first.json()["sn"] == "VM-A"
        token_a = first.json()["token"]
        # the clone network-boots (a new boot resets the machine's token) ...
        assert decision_of(boot(node, UUID_B).text) == "discovery"
        # ... and its agent registers with its own UUID and serial, without a token
        clone = eventually(lambda: (r := register(node.url, "VM-B", MAC, UUID_B))
                           .status_code == 200 and r, what="the clone's registration")
        assert clone.json()["sn"] == "VM-A"              # the MAC is the identity
        token_b = clone.json()["token"]
        assert token_b and token_b != token_a
        flagged = server(store, keys, "VM-A")
        assert UUID_B in flagged.conflict and UUID_A in flagged.conflict
        # the operator approves an install for the machine
        tasks.create(Task(idc=IDC, sn="VM-A", mac=MAC, os_type="Lab OS"), by="alice")
        tasks.transition(IDC, "VM-A", "approved", by="bob")
        eventually(lambda: requests.post(
            f"{node.url}/agent/v1/heartbeat", json={"sn": "VM-A", "state": "idle"},
            headers=auth(token_b), timeout=10).json()["task_status"] == "approved",
            what="the approval in the node's cache")
        # neither agent gets the install through its long-poll
        answer = poll(node, "VM-A", token_b)
        assert answer.status_code == 200
        assert answer.json()["action"] == "wait" and answer.json()["install"] is None
        assert poll(node, "VM-A", token_a).status_code == 401       # the reset token
        assert register(node.url, "VM-A", MAC, UUID_A, token=token_a).status_code == 409
        # neither boot script is an install
        for uuid in (UUID_A, UUID_B, ""):
            r = boot(node, uuid)
            assert decision_of(r.text) == "wait" and "conflict" in r.text, r.text
            assert "lpmos.mode=install" not in r.text
        stored = tasks.get(IDC, "VM-A")
        assert stored is not None and stored.task.status == "approved"
        assert node.metric('lpmos_http_boot_scripts_total{decision="wait"}') >= 3
        assert node.metric("lpmos_http_register_conflicts_total") >= 1
    finally:
        node.stop()
        store.close()


@pytest.mark.slow
def test_clone_booting_after_the_approval_is_not_installed(
        etcd_server: Any, keys: Keys, regional_factory: Callable[..., Regional]) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tasks = TaskService(store, keys)
    node = regional_factory(etcd_server.url, keys.prefix).start(wait_for=("ok",))
    try:
        assert register(node.url, "VM-C", MAC, UUID_A).status_code == 200
        # installer mode: the install is served by the boot script, not the agent poll
        tasks.create(Task(idc=IDC, sn="VM-C", mac=MAC, os_type="Rocky Linux 9"), by="alice")
        tasks.transition(IDC, "VM-C", "approved", by="bob")
        # the clone (same MAC, other UUID) boots first
        r = eventually(lambda: (r := boot(node, UUID_B)).status_code == 200
                       and decision_of(r.text) != "discovery" and r,
                       what="the approval in the node's cache")
        assert decision_of(r.text) == "wait", r.text
        assert "inst.ks=" not in r.text and "conflict" in r.text
        stored = tasks.get(IDC, "VM-C")
        assert stored is not None and stored.task.status == "approved"
        flagged = server(store, keys, "VM-C")
        assert UUID_B in flagged.conflict, flagged
        # and from now on the original is not installed either
        eventually(lambda: "conflict" in boot(node, UUID_A).text,
                   what="the conflict in the node's cache")
        r = boot(node, UUID_A)
        assert decision_of(r.text) == "wait" and "inst.ks=" not in r.text
        stored = tasks.get(IDC, "VM-C")
        assert stored is not None and stored.task.status == "approved"
        raw = json.loads(store.get(keys.task(IDC, "VM-C")).value)  # type: ignore[union-attr]
        assert raw["claimed_by"] == ""
    finally:
        node.stop()
        store.close()


def test_ipxe_script_path_of_the_clone_fixture_is_sane(tmp_path: Path) -> None:
    """The helpers above build the URL iPXE asks for (MAC in the path, UUID in
    the query), as templates/ipxe/boot.ipxe.j2 makes it."""
    text = (Path(__file__).resolve().parents[2] / "templates" / "ipxe" / "boot.ipxe.j2") \
        .read_text()
    assert "/boot/${net0/mac}.ipxe?uuid=${uuid:uristring}" in text
