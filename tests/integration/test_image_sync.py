"""Managed images on real regional nodes (issue #25, the node's half).

Two ``lpmos regional`` processes in two IDCs on the session's real etcd,
and an HTTP image source this test runs on loopback (``ImageSource``:
``tests/image_source.py``: Range, a rate limit, a corrupted copy, a 404,
a source that never answers).  Image records are written straight to etcd, as the control
plane writes them; the nodes' copy states are read back from etcd.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.images import ImageFile, ManagedImage, NodeImageState
from lpmos.models import Task
from lpmos.nodeapi import SharedKey
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.image_source import ImageSource
from tests.reliability.support import Regional, decision_of, eventually

MiB = 1 << 20
FAST = ["--services", "http", "--image-read-timeout", "1", "--image-connect-timeout", "1",
        "--image-fetch-retries", "1"]


@pytest.fixture
def source() -> Iterator[ImageSource]:
    src = ImageSource()
    yield src
    src.close()


def record(name: str, url: str, data: bytes, *, idcs: tuple[str, ...] = (),
           sha: str = "") -> ManagedImage:
    return ManagedImage(
        name=name, os_type=f"Golden {name}", os_family="debian", version="12", format="raw",
        files={"disk_image": ImageFile(url, sha or hashlib.sha256(data).hexdigest(),
                                       len(data))},
        source="url", state="available", idcs=idcs, created_at=time.time(),
        created_by="test")


def node_state(store: EtcdStore, keys: Keys, idc: str, node: str,
               name: str) -> NodeImageState | None:
    kv = store.get(keys.node_image(idc, node, name))
    return NodeImageState.from_json(kv.value) if kv is not None else None


def wait_state(store: EtcdStore, keys: Keys, idc: str, node: str, name: str, state: str,
               timeout: float = 30.0) -> NodeImageState:
    def check() -> NodeImageState | None:
        found = node_state(store, keys, idc, node, name)
        return found if found is not None and found.state == state else None
    return eventually(check, timeout, 0.1, what=f"{name} {state} on {node}")  # type: ignore[no-any-return]


def start(etcd_url: str, keys: Keys, work: Path, name: str, idc: str,
          *extra: str) -> Regional:
    return Regional(etcd_url, keys.prefix, work, name=name,
                    flags=["--idc", idc, *FAST, *extra]).start()


@pytest.fixture
def nodes(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[tuple[Regional, Regional]]:
    a = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1")
    b = start(etcd_server.url, keys, tmp_path / "b", "node-b", "dc2")
    yield a, b
    for n in (a, b):
        n.stop()


def test_images_reach_the_idcs_they_are_wanted_in_and_bad_ones_fail(
        nodes: tuple[Regional, Regional], source: ImageSource, etcd_store: EtcdStore,
        keys: Keys, tmp_path: Path) -> None:
    a, b = nodes
    only_dc1, everywhere, corrupt = os.urandom(MiB), os.urandom(MiB // 2), os.urandom(MiB)
    source.files.update({"/g1.raw": only_dc1, "/all.raw": everywhere})
    bad = bytearray(corrupt)
    bad[1000] ^= 0xFF
    source.files["/corrupt.raw"] = bytes(bad)
    source.hang.add("/hang.raw")
    records = [record("golden-1", source.url("/g1.raw"), only_dc1, idcs=("dc1",)),
               record("golden-all", source.url("/all.raw"), everywhere),
               record("corrupt", source.url("/corrupt.raw"), corrupt, idcs=("dc1",)),
               record("missing", source.url("/missing.raw"), b"x", idcs=("dc1",)),
               record("hang", source.url("/hang.raw"), b"y", idcs=("dc1",))]
    started = time.monotonic()
    for rec in records:
        etcd_store.put(keys.image(rec.name), rec.to_json())

    ready = wait_state(etcd_store, keys, "dc1", "node-a", "golden-1", "ready")
    assert ready.sha256 == records[0].sha256 and ready.bytes == ready.total == MiB
    wait_state(etcd_store, keys, "dc1", "node-a", "golden-all", "ready")
    wait_state(etcd_store, keys, "dc2", "node-b", "golden-all", "ready")
    # the verified bytes are offered (a disk image needs some machine's token: 401, not 404)
    assert requests.get(a.url + "/images/golden-1/disk.raw", timeout=5).status_code == 401
    cached = a.workdir / "state" / "images" / "golden-1" / "disk.raw"
    assert hashlib.sha256(cached.read_bytes()).digest() == hashlib.sha256(only_dc1).digest()
    # not wanted in dc2: no copy, no state, nothing offered
    assert node_state(etcd_store, keys, "dc2", "node-b", "golden-1") is None
    assert not (b.workdir / "state" / "images" / "golden-1").exists()
    assert requests.get(b.url + "/images/golden-1/disk.raw", timeout=5).status_code == 404

    # a corrupted byte: failed, naming both digests; the part is gone, nothing offered
    failed = wait_state(etcd_store, keys, "dc1", "node-a", "corrupt", "failed")
    actual = hashlib.sha256(bad).hexdigest()
    assert failed.reason == (f"sha256 mismatch: expected {records[2].sha256}, got {actual}")
    assert requests.get(a.url + "/images/corrupt/disk.raw", timeout=5).status_code == 404
    folder = a.workdir / "state" / "images" / "corrupt"
    assert not any(folder.glob("*")) if folder.exists() else True
    # a 404 and a source that never answers fail with their reason, in bounded time
    missing = wait_state(etcd_store, keys, "dc1", "node-a", "missing", "failed")
    assert missing.reason == f"HTTP 404 Not Found from {source.url('/missing.raw')}"
    hang = wait_state(etcd_store, keys, "dc1", "node-a", "hang", "failed")
    assert hang.reason == (f"no answer from {source.url('/hang.raw')} within 1 s "
                           "(after 2 attempts)")
    assert time.monotonic() - started < 30
    assert a.metric('lpmos_image_fetch_failures_total{reason="checksum"}') == 1
    assert a.metric('lpmos_image_fetch_failures_total{reason="http_status"}') == 1
    assert a.metric('lpmos_image_fetch_failures_total{reason="timeout"}') == 1
    assert a.metric("lpmos_image_fetch_bytes_total") >= MiB + MiB // 2
    assert a.metric("lpmos_images_ready") == 2 and b.metric("lpmos_images_ready") == 1

    # removing the record frees the copy and the node's state key
    etcd_store.delete(keys.image("golden-1"))
    eventually(lambda: node_state(etcd_store, keys, "dc1", "node-a", "golden-1") is None,
               15, what="golden-1 state deleted")
    eventually(lambda: not (a.workdir / "state" / "images" / "golden-1").exists(), 15,
               what="golden-1 copy freed")
    assert requests.get(a.url + "/images/golden-1/disk.raw", timeout=5).status_code == 404
    # the states live under the node's registration lease
    kv = etcd_store.get(keys.node_image("dc1", "node-a", "golden-all"))
    assert kv is not None and kv.lease == etcd_store.get(keys.node("dc1", "node-a")).lease != 0


def test_a_task_waits_for_its_image_then_boots_to_install(
        etcd_server: Any, source: ImageSource, etcd_store: EtcdStore, keys: Keys,
        tmp_path: Path) -> None:
    node = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1")
    try:
        data = os.urandom(8 * MiB)
        source.files["/slow.raw"] = data
        source.rate["/slow.raw"] = 2 * MiB        # about 4 s
        mac = "52:54:00:25:00:01"
        tasks = TaskService(etcd_store, keys)
        tasks.create(Task(idc="dc1", sn="IMG-1", mac=mac, os_type="Golden golden-slow",
                          image="golden-slow"), by="alice")
        tasks.transition("dc1", "IMG-1", "approved", by="bob")
        etcd_store.put(keys.image("golden-slow"),
                       record("golden-slow", source.url("/slow.raw"), data).to_json())

        def waiting() -> str:
            script = requests.get(f"{node.url}/boot/{mac}.ipxe", timeout=5).text
            return script if "image golden-slow fetching on node node-a, " in script else ""
        script = eventually(waiting, 15, 0.1, what="a wait script naming the fetch")
        assert decision_of(script) == "wait"
        assert tasks.get("dc1", "IMG-1").task.status == "approved"    # no claim
        wait_state(etcd_store, keys, "dc1", "node-a", "golden-slow", "ready", 30)

        def installing() -> str:
            text = requests.get(f"{node.url}/boot/{mac}.ipxe", timeout=5).text
            return text if decision_of(text) == "claim" else ""
        script = eventually(installing, 10, 0.2, what="the install script")
        assert "golden-slow" in script
        assert tasks.get("dc1", "IMG-1").task.status == "booting"
    finally:
        node.stop()


def test_a_node_killed_mid_fetch_resumes_with_a_range(
        etcd_server: Any, source: ImageSource, etcd_store: EtcdStore, keys: Keys,
        tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    source.files["/big.raw"] = data
    source.rate["/big.raw"] = 8 * MiB             # 8 s for the whole
    rec = record("golden-big", source.url("/big.raw"), data)
    node = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1")
    folder = node.workdir / "state" / "images" / "golden-big"
    try:
        etcd_store.put(keys.image(rec.name), rec.to_json())
        part = folder / f"disk_image.{rec.sha256[:16]}.part"
        eventually(lambda: part.exists() and part.stat().st_size >= 8 * MiB, 30, 0.05,
                   what="8 MiB downloaded")
        assert node.proc is not None
        os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait(10)
        kept = part.stat().st_size
        assert 0 < kept < len(data)
        node.start()
        wait_state(etcd_store, keys, "dc1", "node-a", "golden-big", "ready", 60)
    finally:
        node.stop()
    resumes = [int(r[6:-1]) for path, r in source.seen if path == "/big.raw" and r]
    assert resumes and resumes[0] > 0 and resumes[0] >= kept - 256 * 1024, source.seen
    got = hashlib.sha256((folder / "disk.raw").read_bytes()).hexdigest()
    assert got == rec.sha256
    assert not list(folder.glob("*.part"))
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["verified"]["disk_image"]["sha256"] == rec.sha256


def test_an_uploaded_image_is_fetched_with_a_node_signature(
        etcd_server: Any, source: ImageSource, etcd_store: EtcdStore, keys: Keys,
        tmp_path: Path) -> None:
    """source "upload": the control plane's file URL answers only a request
    signed with the node API key from etcd (lpmos.nodeapi)."""
    data = os.urandom(MiB)
    path = "/api/v1/images/golden-up/files/disk_image"
    source.files[path] = data
    source.signed[path] = SharedKey(etcd_store, keys).get()
    unsigned = requests.get(source.url(path), timeout=5)
    assert unsigned.status_code == 401 and source.refused == ["missing"]
    rec = record("golden-up", source.url(path) + "?v=1", data)
    rec = ManagedImage(**{**rec.__dict__, "source": "upload"})
    node = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1")
    try:
        etcd_store.put(keys.image(rec.name), rec.to_json())
        wait_state(etcd_store, keys, "dc1", "node-a", "golden-up", "ready")
    finally:
        node.stop()
    assert source.refused == ["missing"]          # every request of the node was signed
    assert (path + "?v=1", "") in source.seen


def test_the_cache_bound_holds_and_a_task_image_evicts_a_spare_one(
        etcd_server: Any, source: ImageSource, etcd_store: EtcdStore, keys: Keys,
        tmp_path: Path) -> None:
    """--image-cache-bytes 3 MiB: two wanted 2 MiB images do not fit; the
    second reports "cache full" until a task needs it, then it evicts the
    first (which no task needs), and an image a task needs is never evicted."""
    first, second = os.urandom(2 * MiB), os.urandom(2 * MiB)
    source.files.update({"/first.raw": first, "/second.raw": second})
    node = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1",
                 "--image-cache-bytes", str(3 * MiB))
    try:
        one = record("img-first", source.url("/first.raw"), first)
        etcd_store.put(keys.image(one.name), one.to_json())
        wait_state(etcd_store, keys, "dc1", "node-a", "img-first", "ready")
        two = record("img-second", source.url("/second.raw"), second)
        etcd_store.put(keys.image(two.name), two.to_json())
        full = wait_state(etcd_store, keys, "dc1", "node-a", "img-second", "failed")
        assert full.reason == "cache full: needs 2.0 MiB, 1.0 MiB free"
        assert node.metric("lpmos_image_cache_bytes") == 2 * MiB
        tasks = TaskService(etcd_store, keys)
        tasks.create(Task(idc="dc1", sn="IMG-2", mac="52:54:00:25:00:02",
                          os_type="Golden img-second", image="img-second"), by="alice")
        tasks.transition("dc1", "IMG-2", "approved", by="bob")
        wait_state(etcd_store, keys, "dc1", "node-a", "img-second", "ready")
        gone = node_state(etcd_store, keys, "dc1", "node-a", "img-first")
        assert gone is not None and gone.state == "failed" and \
            gone.reason.startswith("cache full: needs 2.0 MiB")
        assert node.metric('lpmos_image_evictions_total{why="evicted"}') == 1
        # the task's image stays, however long the other one waits for room
        time.sleep(2.5)
        assert node_state(etcd_store, keys, "dc1", "node-a", "img-second").state == "ready"
        assert (node.workdir / "state" / "images" / "img-second" / "disk.raw").exists()
    finally:
        node.stop()


def test_a_node_started_while_etcd_is_down_serves_its_verified_copies(
        private_etcd: Any, source: ImageSource, keys: Keys, tmp_path: Path) -> None:
    """The records are etcd's, but a verified copy keeps the record it was
    verified against: a node restarted during an etcd outage still offers
    it (an agent may be mid-install), and nothing it had not verified."""
    data = os.urandom(MiB)
    source.files["/kept.raw"] = data
    store = EtcdStore([private_etcd.url], timeout=2.0)
    rec = record("golden-kept", source.url("/kept.raw"), data)
    node = start(private_etcd.url, keys, tmp_path / "a", "node-a", "dc1")
    try:
        store.put(keys.image(rec.name), rec.to_json())
        wait_state(store, keys, "dc1", "node-a", rec.name, "ready")
        node.stop()
        store.close()
        private_etcd.kill()
        node.start()
        assert requests.get(node.url + "/healthz", timeout=5).json()["status"] == "degraded"
        assert requests.get(node.url + "/images/golden-kept/disk.raw",
                            timeout=5).status_code == 401          # offered (token needed)
        assert requests.get(node.url + "/images/golden-other/disk.raw",
                            timeout=5).status_code == 404
    finally:
        node.stop()


def test_an_installer_image_is_served_over_http_and_tftp_and_states_follow_the_lease(
        etcd_server: Any, source: ImageSource, etcd_store: EtcdStore, keys: Keys,
        tmp_path: Path) -> None:
    """An installer's kernel and initrd, both verified, through the file
    routes the seed catalog uses (HTTP, and TFTP for GRUB).  Then the
    registration's lease is revoked under the node: the node takes a new
    one and writes its image states again under it."""
    kernel, initrd = os.urandom(300_000), os.urandom(500_000)
    source.files.update({"/vmlinuz": kernel, "/initrd.img": initrd})
    rec = ManagedImage(
        name="inst-1", os_type="Debian 12 installer", os_family="debian", version="12",
        format="installer",
        files={"kernel": ImageFile(source.url("/vmlinuz"), hashlib.sha256(kernel).hexdigest(),
                                   len(kernel)),
               "initrd": ImageFile(source.url("/initrd.img"),
                                   hashlib.sha256(initrd).hexdigest(), 0)},
        source="url", state="available", created_at=time.time())
    node = start(etcd_server.url, keys, tmp_path / "a", "node-a", "dc1",
                 "--services", "tftp,http")
    try:
        etcd_store.put(keys.image(rec.name), rec.to_json())
        state = wait_state(etcd_store, keys, "dc1", "node-a", "inst-1", "ready")
        assert state.sha256 == hashlib.sha256(kernel).hexdigest()
        assert requests.get(node.url + "/images/inst-1/kernel", timeout=5).content == kernel
        assert requests.get(node.url + "/images/inst-1/initrd", timeout=5).content == initrd
        assert node.tftp("images/inst-1/initrd", tmp_path / "initrd") == initrd

        old = etcd_store.get(keys.node_image("dc1", "node-a", "inst-1"))
        assert old is not None and old.lease
        etcd_store.revoke(old.lease)
        assert etcd_store.get(keys.node_image("dc1", "node-a", "inst-1")) is None

        def again() -> bool:
            kv = etcd_store.get(keys.node_image("dc1", "node-a", "inst-1"))
            reg = etcd_store.get(keys.node("dc1", "node-a"))
            return kv is not None and reg is not None and kv.lease == reg.lease != old.lease
        eventually(again, 15, 0.2, what="the state under the new lease")
        assert NodeImageState.from_json(
            etcd_store.get(keys.node_image("dc1", "node-a", "inst-1")).value).state == "ready"
    finally:
        node.stop()
