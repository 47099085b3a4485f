"""GRUB's configs (Secure Boot machines boot shim, then Debian's signed
GRUB) against a real etcd: the constant ``grub.cfg``, the per-machine
``<mac>.cfg`` from the same decision table as iPXE's scripts (over HTTP for
a look, over TFTP as GRUB fetches it, the install claim included), the
kernel and initrd over TFTP, refusals that never touch the store, and task
values that cannot become GRUB commands."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http import MAC, decision_of, new_task, register, synced
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog
from test_tftp_clients import fetch_with_curl

from bootsvc.settings import NODE_SETTINGS
from bootsvc.tftp.service import TftpService
from bootsvc.tftp.settings import SETTINGS as TFTP_SETTINGS
from lpmos import testing
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.models import Task
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService

#: an installer whose kernel and initrd the node has (GRUB loads only from the node)
ROCKY_LOCAL = testing.Installer("rocky-9-site", "Rocky Linux 9 site", "rhel", "9",
                                kernel="rocky-site/vmlinuz", initrd="rocky-site/initrd.img",
                                kernel_args="inst.repo=http://mirror.site.example/rocky/9/")


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "images"
    root.mkdir()
    (root / "rocky-site").mkdir()
    (root / "rocky-site" / "vmlinuz").write_bytes(b"k" * 1000)
    (root / "rocky-site" / "initrd.img").write_bytes(b"i" * 1000)
    catalog, _ = testing.write_catalog(root, installers=(testing.ROCKY_9, ROCKY_LOCAL))
    n = start_node(etcd_server.url, keys, tmp_path / "state", "node-g", catalog)
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
    assert 'source "$prefix/${net_default_mac}.cfg"' in text
    assert "while [ 1 = 1 ]; do" in text and "sleep 5" in text
    assert "set timeout=0" in text and "menuentry" not in text


def test_unknown_machine_gets_the_discovery_config_from_the_cache(node: Node) -> None:
    node.store.calls.clear()
    r = grub(node, f"{MAC}.cfg")
    assert r.status_code == 200, r.text
    assert grub_decision(r.text) == "discovery"
    lines = r.text.splitlines()
    linux = next(line for line in lines if line.startswith("linux "))
    assert linux.startswith("linux '/images/live/vmlinuz' ")
    assert f"'lpmos.server={node.url}'" in linux and "lpmos.mode=discovery" in linux
    assert f"'BOOTIF=01-{MAC.replace(':', '-')}'" in linux
    assert "initrd '/images/live/initrd.img'" in lines
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
    assert linux.startswith("linux '/images/rocky-9-site/vmlinuz' ")

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
    """The catalog's Rocky entry names URLs: Debian's signed GRUB has no HTTP
    client under Secure Boot, so the machine waits and the log says why (the
    operator gives the entry local files, which the node serves over TFTP)."""
    mac = "52:54:00:aa:66:03"
    tasks.create(Task(idc=IDC, sn="TLS-1", mac=mac, os_type="Rocky Linux 9"), by="alice")
    tasks.transition(IDC, "TLS-1", "approved", by="bob")
    synced(node, "TLS-1", "approved")
    r = grub(node, f"{mac}.cfg")
    assert grub_decision(r.text) == "wait" and "could not be rendered" in r.text


def test_grub_fetches_its_configs_and_the_live_image_over_tftp(
        node: Node, tasks: TaskService, tmp_path: Path) -> None:
    """The node's TFTP service attached to the boot backend, with curl as
    the TFTP client: the constant config, a discovery config from the cache,
    an install config that needs the etcd claim (made on a thread while the
    loop goes on), the live kernel; a disk image and unknown names are not
    served."""
    config = resolve(settings_by_key([COMMON, NODE_SETTINGS, TFTP_SETTINGS]), flags={
        "state_dir": str(tmp_path / "tftp-state"), "tftp__port": "0",
        "regional__listen": "127.0.0.1"}, environ={}, config_file=None)
    ctx = replace(node.ctx, config=config)
    service = TftpService(ctx)
    service.attach(node.service.boot)
    mac = "52:54:00:aa:55:01"
    new_task(tasks, sn="TF-1", mac=mac, os_type="Lab OS", approve=True)
    synced(node, "TF-1", "approved")
    names = ["grub/grub.cfg", "grub/52:54:00:aa:55:02.cfg", f"grub/{mac}.cfg",
             "images/live/vmlinuz", "images/lab-os/disk.img", "images/nope/vmlinuz"]
    got = fetch_with_curl(service, names, tmp_path, together=True, max_time=15)
    assert b"while [ 1 = 1 ]" in got["grub/grub.cfg"][1]
    assert grub_decision(got["grub/52:54:00:aa:55:02.cfg"][1].decode()) == "discovery"
    install = got[f"grub/{mac}.cfg"][1].decode()
    assert grub_decision(install) == "claim" and "lpmos.mode=install" in install
    stored = tasks.get(IDC, "TF-1")
    assert stored is not None and stored.task.status == "booting"     # claimed
    live = node.service.boot.catalog.local_path(node.service.boot.live.kernel)
    assert got["images/live/vmlinuz"] == (0, live.read_bytes())
    assert got["images/lab-os/disk.img"][0] != 0          # disk images: HTTP with a token
    assert got["images/nope/vmlinuz"][0] != 0


def test_loaders_over_http_have_content_length_and_range(etcd_server: Any, keys: Keys,
                                                         tmp_path: Path) -> None:
    """What UEFI HTTP boot fetches: a loader of the TFTP root, whole with
    its Content-Length, or a byte range (firmware resumes a broken download)."""
    root = tmp_path / "images"
    root.mkdir()
    catalog, _ = write_catalog(root)
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    shim = Path("/usr/lib/shim/shimx64.efi.signed").read_bytes()
    (tftp / "shimx64.efi").write_bytes(shim)
    n = start_node(etcd_server.url, keys, tmp_path / "s4", "node-l", catalog,
                   tftp__root=str(tftp))
    try:
        whole = requests.get(f"{n.url}/ipxe/shimx64.efi", timeout=10)
        assert whole.status_code == 200 and whole.content == shim
        assert whole.headers["Content-Length"] == str(len(shim))
        assert whole.headers["Accept-Ranges"] == "bytes"
        part = requests.get(f"{n.url}/ipxe/shimx64.efi", headers={"Range": "bytes=100-1123"},
                            timeout=10)
        assert part.status_code == 206 and part.content == shim[100:1124]
        assert part.headers["Content-Length"] == "1024"
        assert part.headers["Content-Range"] == f"bytes 100-1123/{len(shim)}"
        tail = requests.get(f"{n.url}/ipxe/shimx64.efi", headers={"Range": "bytes=-10"},
                            timeout=10)
        assert tail.status_code == 206 and tail.content == shim[-10:]
        beyond = requests.get(f"{n.url}/ipxe/shimx64.efi",
                              headers={"Range": f"bytes={len(shim)}-"}, timeout=10)
        assert beyond.status_code == 416
    finally:
        n.stop()
