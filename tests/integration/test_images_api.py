"""Managed images on the control plane (issue #25): ``lpmos image`` in a
subprocess and curl against a real control plane (served over HTTP on
loopback) on a real etcd.  The regional nodes' side (fetch, verify, serve)
is tested in ``test_image_sync*.py``."""

from __future__ import annotations

import hashlib
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

from lpmos.catalog import parse_catalog
from lpmos.images import NodeImageState
from lpmos.nodeapi import SharedKey, sign
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from web.testing import LiveServer, WebEnv

REPO = Path(__file__).resolve().parents[2]
SEED = parse_catalog({"image": [
    {"name": "debian-12", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "disk_image": "debian.img"}]})


@dataclass
class Plane:
    url: str
    web: WebEnv
    env: dict[str, str]
    store_dir: Path

    def cli(self, *args: str, role: str = "admin") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "lpmos", *args, "--url", self.url,
                               "--token", self.web.tokens[role]], cwd=REPO, env=self.env,
                              capture_output=True, text=True, timeout=120)

    def cli_json(self, *args: str, role: str = "admin") -> Any:
        r = self.cli(*args, "--output", "json", role=role)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def curl(self, *args: str, role: str | None = "admin") -> subprocess.CompletedProcess[bytes]:
        auth = ["-H", f"Authorization: Bearer {self.web.tokens[role]}"] if role else []
        return subprocess.run(["curl", "-sS", *auth, *args], capture_output=True, timeout=60)


@pytest.fixture
def plane(etcd_store: EtcdStore, keys: Keys, tmp_path: Path) -> Iterator[Plane]:
    store_dir = tmp_path / "image-store"
    web = WebEnv(etcd_store, keys, catalog=SEED, settings={"web.image_store": store_dir})
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env.update(PYTHONPATH=str(REPO), LPMOS_CLIENT_CONFIG=str(tmp_path / "profiles.toml"),
               HOME=str(tmp_path))
    try:
        with LiveServer(web.app) as url:
            yield Plane(url, web, env, store_dir)
    finally:
        web.close()


def blob(path: Path, size: int) -> str:
    data = os.urandom(size)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def test_upload_download_with_range_and_node_signature(plane: Plane, tmp_path: Path) -> None:
    src = tmp_path / "golden.raw"
    digest = blob(src, 3 * 1024 * 1024 + 17)
    image = plane.cli_json("image", "add", "golden-1", "--os-type", "Golden Linux 1",
                           "--os-family", "debian", "--version", "1", "--file", str(src),
                           "--idc", "dc1")
    assert image["state"] == "available" and image["source"] == "upload"
    assert image["sha256"] == digest and image["size"] == src.stat().st_size
    assert image["idcs"] == ["dc1"]
    file_url = image["files"]["disk_image"]["url"]
    assert file_url == f"{plane.url}/api/v1/images/golden-1/files/disk_image"
    stored = plane.store_dir / "golden-1" / "disk_image"
    assert stored.read_bytes() == src.read_bytes()
    assert not list(plane.store_dir.glob("golden-1/*.part"))

    # operators download with Range; a viewer may not
    r = plane.curl("-r", "1000-1999", "-D", "-", "-o", str(tmp_path / "part"), file_url,
                   role="operator")
    assert b"206" in r.stdout.split(b"\r\n", 1)[0], r.stdout
    assert (tmp_path / "part").read_bytes() == src.read_bytes()[1000:2000]
    r = plane.curl("-o", "/dev/null", "-w", "%{http_code}", file_url, role="viewer")
    assert r.stdout == b"403"
    r = plane.curl("-o", "/dev/null", "-w", "%{http_code}", file_url, role=None)
    assert r.stdout == b"401"

    # a regional node signs its request with the shared node-API key
    key = SharedKey(plane.web.store, plane.web.keys).get()
    path = "/api/v1/images/golden-1/files/disk_image"
    header = sign(key, "GET", path, time.time())
    r = plane.curl("-H", f"Authorization: {header}", "-r", "3145728-", "-o",
                   str(tmp_path / "tail"), "-w", "%{http_code}", file_url, role=None)
    assert r.stdout == b"206"
    assert (tmp_path / "tail").read_bytes() == src.read_bytes()[3145728:]
    forged = sign(b"x" * 32, "GET", path, time.time())
    r = plane.curl("-H", f"Authorization: {forged}", "-o", "/dev/null", "-w", "%{http_code}",
                   file_url, role=None)
    assert r.stdout == b"401"

    # the catalog tasks are checked against now offers it; a task may ask for it
    catalog = plane.cli_json("image", "list", role="viewer")
    assert [i["name"] for i in catalog] == ["golden-1"]
    r = plane.curl("-X", "POST", f"{plane.url}/api/v1/tasks", "-H",
                   "Content-Type: application/json", "-d", json.dumps(
                       {"idc": "dc1", "sn": "sn-golden", "mac": "02:00:00:00:00:01",
                        "os_type": "Golden Linux 1"}), role="operator")
    assert json.loads(r.stdout)["task"]["image"] == "golden-1", r.stdout
    names = [i["name"] for i in json.loads(plane.curl(f"{plane.url}/api/v1/catalog",
                                                      role="viewer").stdout)["items"]]
    assert names == ["debian-12", "golden-1"]

    # removal is refused while the task needs it, and frees the store after
    refused = plane.cli("image", "remove", "golden-1")
    assert refused.returncode != 0 and "sn-golden" in refused.stderr
    assert "active task" in refused.stderr
    assert stored.exists()
    r = plane.curl("-X", "POST", f"{plane.url}/api/v1/tasks/dc1/sn-golden/cancel", "-H",
                   "Content-Type: application/json", "-d", "{}", role="operator")
    assert json.loads(r.stdout)["task"]["status"] == "cancelled", r.stdout
    removed = plane.cli("image", "remove", "golden-1")
    assert removed.returncode == 0, removed.stderr
    assert not (plane.store_dir / "golden-1").exists()
    assert plane.web.store.get(plane.web.keys.image("golden-1")) is None

    # every change is audited, without the file's bytes
    audit = json.loads(plane.curl(f"{plane.url}/api/v1/audit?limit=50", role="viewer").stdout)
    actions = [a["action"] for a in audit["items"] if a.get("target") == "golden-1"]
    assert set(actions) >= {"image.add", "image.upload", "image.remove"}, audit["items"][:3]


def test_url_image_and_what_each_node_has(plane: Plane) -> None:
    sha = "cd" * 32
    image = plane.cli_json("image", "add", "mirror-1", "--os-type", "Mirror 1",
                           "--os-family", "ubuntu", "--from-url",
                           "http://mirror.invalid/images/mirror-1.raw.zst", "--sha256", sha)
    assert image["state"] == "available" and image["format"] == "raw.zst"
    assert image["files"]["disk_image"] == {
        "url": "http://mirror.invalid/images/mirror-1.raw.zst", "sha256": sha, "size": 0}
    # two live nodes in two IDCs report their copies under their leases
    store, keys = plane.web.store, plane.web.keys
    lease = store.grant(30)
    for idc, node in (("dc1", "n1"), ("dc2", "n2")):
        store.put(keys.node(idc, node), json.dumps(
            {"address": "127.0.0.1", "updated_at": time.time()}).encode(), lease=lease)
    store.put(keys.node_image("dc1", "n1", "mirror-1"), NodeImageState(
        "mirror-1", sha, "fetching", bytes=42, total=100).to_json(), lease=lease)
    store.put(keys.node_image("dc2", "n2", "mirror-1"), NodeImageState(
        "mirror-1", sha, "failed", reason="sha256 mismatch: got 00.. expected cd..").to_json(),
        lease=lease)
    deadline = time.monotonic() + 10
    while True:
        shown = plane.cli_json("image", "show", "mirror-1", role="viewer")
        states = {(c["idc"], n["node"]): n for c in shown["copies"] for n in c["nodes"]}
        if states.get(("dc2", "n2"), {}).get("state") == "failed" or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert states[("dc1", "n1")]["describe"] == "fetching on node n1, 42 %"
    assert states[("dc2", "n2")]["reason"].startswith("sha256 mismatch")
    text = plane.cli("image", "show", "mirror-1", role="viewer").stdout
    assert "fetching" in text and "42 %" in text and "sha256 mismatch" in text
    listing = plane.cli("image", "list", role="viewer").stdout
    assert "dc1 0/1, dc2 0/1" in listing
    store.revoke(lease)


@pytest.mark.parametrize(("args", "needle"), [
    (["--from-url", "http://x.invalid/a.raw"], "--sha256"),
    (["--from-url", "file:///etc/passwd", "--sha256", "ab" * 32], "http"),
    (["--from-url", "http://x.invalid/a.raw", "--sha256", "nothex"], "64 hex"),
    (["--from-url", "http://x.invalid/a.raw", "--sha256", "ab" * 32, "--format", "vmdk"],
     "format"),
    ([], "--file"),
])
def test_bad_additions_are_refused_and_change_nothing(plane: Plane, args: list[str],
                                                      needle: str) -> None:
    before = plane.web.store.revision()
    r = plane.cli("image", "add", "bad-1", "--os-type", "Bad", "--os-family", "lab", *args)
    assert r.returncode != 0 and needle in r.stderr, r.stderr
    assert plane.web.store.get(plane.web.keys.image("bad-1")) is None
    assert plane.web.store.revision() == before


def test_name_collisions_and_roles(plane: Plane) -> None:
    sha = "ab" * 32
    base = ["--os-type", "X", "--os-family", "lab", "--from-url", "http://x.invalid/a",
            "--sha256", sha]
    r = plane.cli("image", "add", "debian-12", *base)
    assert r.returncode == 5 and "seed catalog" in r.stderr, r.stderr
    assert plane.cli("image", "add", "twice", *base).returncode == 0
    r = plane.cli("image", "add", "twice", *base)
    assert r.returncode == 5 and "exists" in r.stderr
    r = plane.cli("image", "add", "by-operator", *base, role="operator")
    assert r.returncode != 0 and "admin" in r.stderr
    r = plane.cli("image", "show", "nope", role="viewer")
    assert r.returncode != 0 and "no managed image" in r.stderr
    r = plane.cli("image", "add", "Bad Name", *base)
    assert r.returncode != 0 and "name" in r.stderr


def _announce(plane: Plane, name: str, size: int, sha: str) -> None:
    r = plane.curl("-X", "POST", f"{plane.url}/api/v1/images", "-H",
                   "Content-Type: application/json", "-d", json.dumps({
                       "name": name, "os_type": name, "os_family": "lab", "source": "upload",
                       "files": {"disk_image": {"sha256": sha, "size": size}}}))
    assert json.loads(r.stdout)["image"]["state"] == "uploading", r.stdout


def test_bad_uploads_keep_nothing(plane: Plane, tmp_path: Path) -> None:
    src = tmp_path / "f.raw"
    digest = blob(src, 2 * 1024 * 1024)
    url = f"{plane.url}/api/v1/images/up-1/files/disk_image"
    # announced with another checksum: 422, nothing kept, still uploading
    _announce(plane, "up-1", src.stat().st_size, "0" * 64)
    r = plane.curl("-T", str(src), "-w", "\n%{http_code}", url)
    body, code = r.stdout.rsplit(b"\n", 1)
    assert code == b"422" and b"checksum_mismatch" in body and digest.encode() in body
    assert not list((plane.store_dir / "up-1").iterdir())
    record = plane.cli_json("image", "show", "up-1", role="viewer")
    assert record["state"] == "uploading" and not record["files"]["disk_image"]["url"]
    # another size than announced: refused before a byte is stored
    small = tmp_path / "small.raw"
    blob(small, 1000)
    r = plane.curl("-T", str(small), "-o", "/dev/null", "-w", "%{http_code}", url)
    assert r.stdout == b"422"
    # cut off halfway: the connection closes after half the bytes
    _announce(plane, "up-2", src.stat().st_size, digest)
    host, port = plane.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall((f"PUT /api/v1/images/up-2/files/disk_image HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {plane.web.tokens['admin']}\r\n"
                   f"Content-Length: {src.stat().st_size}\r\n\r\n").encode())
        s.sendall(src.read_bytes()[:1024 * 1024])
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    assert b"400" in answer.split(b"\r\n", 1)[0] and b"upload_cut_off" in answer, answer
    deadline = time.monotonic() + 5
    while list((plane.store_dir / "up-2").iterdir()) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not list((plane.store_dir / "up-2").iterdir())
    assert plane.cli_json("image", "show", "up-2", role="viewer")["state"] == "uploading"
    # no length: 411; a URL image takes no upload; unknown role: 404
    r = plane.curl("-X", "PUT", "-H", "Transfer-Encoding: chunked", "--data-binary", "abc",
                   "-o", "/dev/null", "-w", "%{http_code}", url.replace("up-1", "up-2"))
    assert r.stdout == b"411"
    r = plane.curl("-T", str(small), "-o", "/dev/null", "-w", "%{http_code}",
                   url.replace("disk_image", "kernel"))
    assert r.stdout == b"404"
    # the right bytes complete it, once; a second upload is refused
    r = plane.curl("-T", str(src), "-w", "\n%{http_code}", url.replace("up-1", "up-2"))
    assert r.stdout.endswith(b"200"), r.stdout
    assert plane.cli_json("image", "show", "up-2", role="viewer")["state"] == "available"
    r = plane.curl("-T", str(src), "-o", "/dev/null", "-w", "%{http_code}",
                   url.replace("up-1", "up-2"))
    assert r.stdout == b"409"


def _rss_peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def _children(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


@pytest.mark.slow
def test_upload_under_gunicorn_is_streamed(etcd_server: Any, etcd_store: EtcdStore,
                                           tmp_path: Path) -> None:
    """The production server (gunicorn, one gthread worker): a 256 MiB
    upload through ``lpmos image add`` leaves the worker's peak memory
    far below the file's size, and the stored file is the file."""
    from lpmos.auth import Auth
    from lpmos.store.embedded import free_port

    prefix = "/img-" + os.urandom(4).hex()
    auth = Auth(etcd_store, Keys(prefix))
    auth.put_user("root1", "admin", "password-123")
    token, _ = auth.create_token("root1")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LPMOS_")}
    env.update(PYTHONPATH=str(REPO), HOME=str(tmp_path))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpmos", "control-plane", "--listen", f"127.0.0.1:{port}",
         "--etcd-endpoints", etcd_server.url, "--etcd-prefix", prefix,
         "--state-dir", str(tmp_path / "state"), "--threads", "16", "--ws-max-clients", "4"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    src = tmp_path / "big.raw"
    with src.open("wb") as fh:
        chunk = os.urandom(1 << 20)
        for i in range(256):
            fh.write(chunk[:-4] + i.to_bytes(4, "big"))
    try:
        deadline = time.monotonic() + 60
        while subprocess.run(["curl", "-sf", "-o", "/dev/null", f"{base}/healthz"]
                             ).returncode != 0:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "control plane did not become healthy"
            time.sleep(0.3)
        workers = _children(proc.pid)
        assert len(workers) == 1
        before = _rss_peak_kib(workers[0])
        r = subprocess.run([sys.executable, "-m", "lpmos", "image", "add", "big-1",
                            "--os-type", "Big", "--os-family", "lab", "--file", str(src),
                            "--url", base, "--token", token, "--output", "json"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        image = json.loads(r.stdout)
        assert image["state"] == "available" and image["size"] == 256 << 20
        stored = tmp_path / "state" / "images" / "big-1" / "disk_image"
        assert stored.stat().st_size == src.stat().st_size
        assert image["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
        grown_mib = (_rss_peak_kib(workers[0]) - before) / 1024
        print(f"worker peak memory grew by {grown_mib:.1f} MiB")
        assert grown_mib < 64, f"the worker's peak memory grew by {grown_mib:.0f} MiB"
    finally:
        os.killpg(proc.pid, 15)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            proc.wait()
