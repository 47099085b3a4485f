"""Managed images end to end (issue #25): a real control plane and two
regional nodes in two IDCs on one real etcd.  An image uploaded with
``lpmos image add --wait`` reaches both IDCs' nodes (fetched from the
control plane with a signed request, verified), one added by URL reaches
only the IDC it is meant for, ``lpmos image show`` says so per node, and
removal frees every copy."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lpmos.catalog import parse_catalog
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from tests.integration.test_image_sync import FAST, ImageSource, node_state
from tests.reliability.support import Regional, eventually
from web.testing import LiveServer, WebEnv

REPO = Path(__file__).resolve().parents[2]
SEED = parse_catalog({"image": [
    {"name": "debian-12", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "disk_image": "debian.img"}]})


@pytest.fixture
def site(etcd_server: Any, etcd_store: EtcdStore, keys: Keys, tmp_path: Path
         ) -> Iterator[tuple[WebEnv, str, Regional, Regional]]:
    web = WebEnv(etcd_store, keys, catalog=SEED,
                 settings={"web.image_store": tmp_path / "image-store"})
    a = Regional(etcd_server.url, keys.prefix, tmp_path / "a", name="node-a",
                 flags=["--idc", "dc1", *FAST]).start()
    b = Regional(etcd_server.url, keys.prefix, tmp_path / "b", name="node-b",
                 flags=["--idc", "dc2", *FAST]).start()
    try:
        with LiveServer(web.app) as url:
            yield web, url, a, b
    finally:
        for n in (a, b):
            n.stop()
        web.close()


def lpmos(web: WebEnv, url: str, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(home))
    return subprocess.run([sys.executable, "-m", "lpmos", *args, "--url", url, "--token",
                           web.tokens["admin"]], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_an_uploaded_image_reaches_both_idcs_and_a_url_image_only_its_own(
        site: tuple[WebEnv, str, Regional, Regional], tmp_path: Path) -> None:
    web, url, a, b = site
    store, keys = web.store, web.keys
    data = os.urandom(5 * 1024 * 1024 + 123)
    src = tmp_path / "golden.raw"
    src.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    started = time.monotonic()
    r = lpmos(web, url, tmp_path, "image", "add", "golden-1", "--os-type", "Golden 1",
              "--os-family", "debian", "--file", str(src), "--wait", "--wait-timeout", "60",
              "--output", "json")
    assert r.returncode == 0, r.stderr + a.log() + b.log()
    shown = json.loads(r.stdout)
    copies = {(c["idc"], n["node"]): n["state"] for c in shown["copies"] for n in c["nodes"]}
    assert copies == {("dc1", "node-a"): "ready", ("dc2", "node-b"): "ready"}
    print(f"upload + ready on 2 nodes in {time.monotonic() - started:.1f} s")
    for node, idc in ((a, "dc1"), (b, "dc2")):
        state = node_state(store, keys, idc, node.name, "golden-1")
        assert state is not None and state.sha256 == digest and state.bytes == len(data)
        cached = node.workdir / "state" / "images" / "golden-1" / "disk.raw"
        assert hashlib.sha256(cached.read_bytes()).hexdigest() == digest

    # an image from a URL, wanted in dc2 only
    source = ImageSource()
    try:
        other = os.urandom(1024 * 1024)
        source.files["/mirror.raw"] = other
        r = lpmos(web, url, tmp_path, "image", "add", "mirror-1", "--os-type", "Mirror 1",
                  "--os-family", "ubuntu", "--from-url", source.url("/mirror.raw"),
                  "--sha256", hashlib.sha256(other).hexdigest(), "--idc", "dc2", "--wait",
                  "--wait-timeout", "60")
        assert r.returncode == 0, r.stderr
        assert "dc2" in r.stdout and "node-b" in r.stdout and "ready" in r.stdout
        assert node_state(store, keys, "dc1", "node-a", "mirror-1") is None
        assert not (a.workdir / "state" / "images" / "mirror-1").exists()
    finally:
        source.close()
    listing = lpmos(web, url, tmp_path, "image", "list").stdout
    assert "dc1 1/1, dc2 1/1" in listing and "dc2 1/1" in listing

    # removal frees every copy and the nodes' state keys
    for name in ("golden-1", "mirror-1"):
        r = lpmos(web, url, tmp_path, "image", "remove", name)
        assert r.returncode == 0, r.stderr
    eventually(lambda: not any(node_state(store, keys, idc, n.name, name)
                               for idc, n in (("dc1", a), ("dc2", b))
                               for name in ("golden-1", "mirror-1")), 20, 0.1,
               what="the nodes free their copies")
    eventually(lambda: not (a.workdir / "state" / "images" / "golden-1").exists() and
               not (b.workdir / "state" / "images" / "golden-1").exists(), 20, 0.1,
               what="the cached files are gone")
