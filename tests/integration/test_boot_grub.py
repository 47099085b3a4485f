"""GRUB's configs (Secure Boot machines boot shim, then Debian's signed
GRUB) against a real etcd: the constant ``/grub/grub.cfg``, the
per-machine ``/grub/<mac>.cfg`` from the same decision table as iPXE's
scripts, refusals that never touch the store, and task values that cannot
become GRUB commands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http import MAC, decision_of, new_task, register, synced
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog

from lpmos import testing
from lpmos.models import Task
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService

#: the node's URL as GRUB reaches it (port 80); the test talks to the real port
GRUB_URL = "http://127.0.0.1"
#: an installer on a site mirror GRUB can fetch from (plain http, port 80; never fetched)
ROCKY_HTTP = testing.Installer("rocky-9-site", "Rocky Linux 9 site", "rhel", "9",
                               kernel="http://mirror.site.example/rocky/9/vmlinuz",
                               initrd="http://mirror.site.example/rocky/9/initrd.img",
                               kernel_args="inst.repo=http://mirror.site.example/rocky/9/")


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "images"
    root.mkdir()
    catalog, _ = testing.write_catalog(root, installers=(testing.ROCKY_9, ROCKY_HTTP))
    n = start_node(etcd_server.url, keys, tmp_path / "state", "node-g", catalog)
    n.ctx.advertise_url = GRUB_URL
    yield n
    n.stop()


@pytest.fixture
def tasks(etcd_store: Any, keys: Keys) -> TaskService:
    return TaskService(etcd_store, keys)


def grub(node: Node, name: str) -> requests.Response:
    return requests.get(f"{node.url}/grub/{name}", timeout=10)


def grub_decision(text: str) -> str:
    return text.splitlines()[0].split("(decision '")[1].split("')")[0]


def unquoted(line: str) -> str:
    """``line`` with its single-quoted words (and GRUB's ``\\'``) removed:
    what GRUB's parser sees as syntax."""
    return re.sub(r"'[^']*'|\\'", "", line)


def test_constant_config_runs_the_machine_config_over_http_and_retries(node: Node) -> None:
    r = grub(node, "grub.cfg")
    assert r.status_code == 200
    text = r.text
    assert 'source "(http,127.0.0.1)/grub/${net_default_mac}.cfg"' in text
    assert "while [ 1 = 1 ]; do" in text and "sleep 5" in text
    assert "set timeout=0" in text and "menuentry" not in text


def test_unknown_machine_gets_the_discovery_config_from_the_cache(node: Node) -> None:
    node.store.calls.clear()
    r = grub(node, f"{MAC}.cfg")
    assert r.status_code == 200, r.text
    assert grub_decision(r.text) == "discovery"
    lines = r.text.splitlines()
    linux = next(line for line in lines if line.startswith("linux "))
    assert linux.startswith("linux '(http,127.0.0.1)/images/live/vmlinuz' ")
    assert "'lpmos.server=http://127.0.0.1'" in linux and "lpmos.mode=discovery" in linux
    assert f"'BOOTIF=01-{MAC.replace(':', '-')}'" in linux
    assert "initrd '(http,127.0.0.1)/images/live/initrd.img'" in lines
    assert "boot" in lines
    assert node.store.calls == []           # decided from the watch cache
    assert node.ctx.metrics.get("http_boot_scripts_total", decision="discovery") == 1


def test_the_same_decision_table_as_ipxe(node: Node, tasks: TaskService) -> None:
    new_task(tasks)
    synced(node, "SN1", "pending")
    assert grub_decision(grub(node, f"{MAC}.cfg").text) == "discovery"
    tasks.transition(IDC, "SN1", "approved", by="bob")
    synced(node, "SN1", "approved")
    node.store.calls.clear()
    r = grub(node, f"{MAC}.cfg")
    assert grub_decision(r.text) == "claim"
    assert "lpmos.mode=install" in r.text
    assert node.store.calls.count("commit") == 1        # the CAS claim, as for iPXE
    synced(node, "SN1", "booting")
    assert grub_decision(grub(node, f"{MAC}.cfg").text) == "continue"
    # iPXE asks the very same table
    ipxe = requests.get(f"{node.url}/boot/{MAC}.ipxe", timeout=10)
    assert decision_of(ipxe.text) == "continue"
    tasks.transition(IDC, "SN1", "cancelled", by="bob")
    synced(node, "SN1", "cancelled")
    r = grub(node, f"{MAC}.cfg")
    assert grub_decision(r.text) == "localboot"
    assert r.text.splitlines()[-1] == "exit"          # back to the firmware: the disk


def test_a_pending_machine_without_live_image_waits(etcd_server: Any, keys: Keys,
                                                   tmp_path: Path, tasks: TaskService) -> None:
    root = tmp_path / "images"
    root.mkdir()
    catalog, _ = write_catalog(root)
    n = start_node(etcd_server.url, keys, tmp_path / "s2", "node-w", catalog,
                   http__live_image="absent")
    n.ctx.advertise_url = GRUB_URL
    try:
        new_task(tasks, sn="SNW", mac="52:54:00:aa:00:09")
        synced(n, "SNW", "pending")
        r = grub(n, "52:54:00:aa:00:09.cfg")
        assert grub_decision(r.text) == "wait"
        assert any(line.startswith("sleep ") for line in r.text.splitlines())
    finally:
        n.stop()


def test_timeline_records_each_loader_step(node: Node) -> None:
    """shim and GRUB (by address, as TFTP or HTTP boot sends them), GRUB's
    config (by MAC, with the decision), the kernel and initrd (by address)
    all land on the machine's timeline once its agent registers."""
    mac, ip = "52:54:00:aa:77:01", "127.0.0.1"
    node.ctx.timeline.record(mac, "dhcp answer", {"mac": mac, "ip": ip,
                                                  "boot_file": "shimx64.efi"})
    assert grub(node, f"{mac}.cfg").status_code == 200
    for path in ("/images/live/vmlinuz", "/images/live/initrd.img"):
        assert requests.get(node.url + path, timeout=10).status_code == 200
    token = register(node, "TL-G", mac, "33333333-3333-3333-3333-333333333377").json()["token"]
    assert token

    def stages() -> list[str]:
        return [e["stage"] for e in node.timeline.read("TL-G")]

    eventually(lambda: "agent registered" in stages(), timeout=10)
    got = stages()
    assert got[:4] == ["dhcp answer", "grub config", "kernel fetched", "initrd fetched"], got
    entry = node.timeline.read("TL-G")[1]
    assert entry["detail"]["decision"] == "discovery"


@pytest.mark.parametrize("path, status, error", [
    ("not-a-mac.cfg", 400, "bad_mac"),
    ("x86_64-efi/grub.cfg", 404, "not_found"),      # GRUB's first probe: a quick no
    (f"{MAC}.ipxe", 404, "not_found"),
    (f"{MAC}", 404, "not_found"),
    ("..%2F..%2Fetc%2Fpasswd.cfg", 404, "not_found"),
    (f"{MAC}.cfg%00", 404, "not_found"),
])
def test_malformed_paths_are_refused_without_touching_the_store(
        node: Node, path: str, status: int, error: str) -> None:
    node.store.calls.clear()
    r = grub(node, path)
    assert r.status_code == status, (path, r.text)
    assert r.json()["error"] == error
    assert node.store.calls == []


HOSTILE = "x' ; reboot ; echo '${root}$(id)"


def test_task_values_cannot_become_grub_commands(node: Node, tasks: TaskService,
                                                  etcd_store: Any, keys: Keys) -> None:
    """Hostile kernel arguments and host names (as a task written straight to
    etcd could hold them, past the API's checks): every value stays inside
    one quoted GRUB word, and a line break is a word break, never a new command."""
    mac = "52:54:00:aa:66:01"
    stored = tasks.create(Task(idc=IDC, sn="EVIL-1", mac=mac, os_type="Rocky Linux 9 site",
                               params={"kernel_args": HOSTILE + " quiet",
                                       "hostname": "h'; halt; '"}), by="alice")
    assert stored.task.sn == "EVIL-1"
    tasks.transition(IDC, "EVIL-1", "approved", by="bob")
    synced(node, "EVIL-1", "approved")
    text = grub(node, f"{mac}.cfg").text
    assert grub_decision(text) == "claim", text
    for line in text.splitlines():
        syntax = unquoted(line)
        assert "$" not in syntax.replace("${", "") or line.startswith("#"), line
        assert ";" not in syntax and "reboot" not in syntax and "halt" not in syntax, line
    linux = next(line for line in text.splitlines() if line.startswith("linux "))
    # the hostile argument is one word, quote and all: 'x'\'''  (closed, escaped, reopened)
    assert "'x'\\''' ';' 'reboot'" in linux and "'quiet'" in linux
    assert linux.startswith("linux '(http,mirror.site.example)/rocky/9/vmlinuz' ")

    mac2 = "52:54:00:aa:66:02"
    tasks.create(Task(idc=IDC, sn="EVIL-2", mac=mac2, os_type="Rocky Linux 9 site",
                      params={"kernel_args": "a\nreboot\r\nhalt"}), by="alice")
    tasks.transition(IDC, "EVIL-2", "approved", by="bob")
    synced(node, "EVIL-2", "approved")
    text = grub(node, f"{mac2}.cfg").text
    assert grub_decision(text) == "claim"
    # a line break in the arguments is a word break, never a new GRUB line
    assert not any(line.startswith(("reboot", "halt")) for line in text.splitlines())
    linux = next(line for line in text.splitlines() if line.startswith("linux "))
    assert linux.endswith("'a' 'reboot' 'halt'")


def test_an_installer_grub_cannot_fetch_waits_with_the_reason(node: Node,
                                                            tasks: TaskService) -> None:
    """Rocky's official mirror is https: GRUB 2.06 has no TLS, so the machine
    waits and the log says why (an operator points the catalog at a mirror)."""
    mac = "52:54:00:aa:66:03"
    tasks.create(Task(idc=IDC, sn="TLS-1", mac=mac, os_type="Rocky Linux 9"), by="alice")
    tasks.transition(IDC, "TLS-1", "approved", by="bob")
    synced(node, "TLS-1", "approved")
    r = grub(node, f"{mac}.cfg")
    assert grub_decision(r.text) == "wait" and "could not be rendered" in r.text


def test_a_node_grub_cannot_reach_serves_no_grub_config(etcd_server: Any, keys: Keys,
                                                        tmp_path: Path) -> None:
    """On a port other than 80 (GRUB 2.06's only port) the constant config is a
    404 that says why (``lpmos regional`` refuses to start with a GRUB boot
    file then: tests/unit/test_grub.py)."""
    root = tmp_path / "images"
    root.mkdir()
    catalog, _ = write_catalog(root)
    n = start_node(etcd_server.url, keys, tmp_path / "s3", "node-p", catalog)
    try:
        r = grub(n, "grub.cfg")
        assert r.status_code == 404 and "port 80" in r.json()["detail"]
        # a machine config cannot point GRUB at this node either: it says so and waits
        r = grub(n, f"{MAC}.cfg")
        assert grub_decision(r.text) == "wait" and "could not be rendered" in r.text
    finally:
        n.stop()
