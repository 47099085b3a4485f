"""The node's sendfile path for catalog files (bootsvc.http.file_fastpath)
against a real node on a real etcd, with real HTTP clients: what it sends
(whole, ranges, HEAD, 304/416, If-Range), what it refuses (through the
Flask route, unchanged), and what it frees (a client that goes away or
stops reading leaves no open file behind)."""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import Node, eventually, start_node

from lpmos import testing
from lpmos.store.keys import Keys

DISK = 24 << 20         # larger than loopback's socket buffers, so a transfer takes turns
MAC = "52:54:00:aa:10:01"
UUID = "4c4c4544-0042-3010-8053-b7c04f4b4d99"


@pytest.fixture
def catalog(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    root = tmp_path / "images"
    root.mkdir()
    written = testing.write_catalog(root, disk_name="lab-os", disk_bytes=DISK,
                                    live_bytes=(200_000, 300_000), installers=())
    return written.path, written.files


def _node(etcd_server: Any, keys: Keys, tmp_path: Path, catalog: tuple[Path, dict[str, bytes]],
          **flags: str) -> Node:
    return start_node(etcd_server.url, keys, tmp_path / "state", "node-f", catalog[0], **flags)


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path,
         catalog: tuple[Path, dict[str, bytes]]) -> Iterator[Node]:
    n = _node(etcd_server, keys, tmp_path, catalog)
    yield n
    n.stop()


@pytest.fixture
def token(node: Node) -> str:
    body = {"sn": "FILES-1", "uuid": UUID, "macs": [MAC], "boot_mac": MAC, "arch": "x86_64",
            "inventory": {"schema": 1, "system": {"serial": "FILES-1"}},
            "agent_version": "test"}
    r = requests.post(f"{node.url}/agent/v1/register", json=body, timeout=10)
    assert r.status_code == 200
    return str(r.json()["token"])


def disk_url(node: Node) -> str:
    return f"{node.url}/images/lab-os/disk.img"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def transfers(node: Node, outcome: str, kind: str = "disk_image") -> float:
    return node.ctx.metrics.get("http_file_transfers_total", kind=kind, outcome=outcome)


def counted(node: Node, outcome: str, want: float, kind: str = "disk_image") -> None:
    """The transfer is counted once its last byte left (the client may read it first)."""
    eventually(lambda: transfers(node, outcome, kind) == want, timeout=20)


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_whole_disk_image_by_sendfile(node: Node, token: str,
                                      catalog: tuple[Path, dict[str, bytes]]) -> None:
    data = catalog[1]["lab-os/disk.img"]
    r = requests.get(disk_url(node), headers=auth(token), timeout=30)
    assert r.status_code == 200 and len(r.content) == DISK
    assert hashlib.sha256(r.content).hexdigest() == hashlib.sha256(data).hexdigest()
    assert r.headers["ETag"] == '"' + hashlib.sha256(data).hexdigest() + '"'
    assert r.headers["Accept-Ranges"] == "bytes"
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert r.headers["Content-Length"] == str(DISK)
    # sent by the sendfile path, with the route's own records
    counted(node, "complete", 1)
    assert node.ctx.metrics.get("http_file_sent_bytes_total", kind="disk_image") == DISK
    assert node.ctx.metrics.get("http_files_total", kind="disk_image", status="200") == 1
    # the token may come in the query too, as the route reads it
    r = requests.get(disk_url(node), params={"token": token}, timeout=30)
    assert r.status_code == 200 and r.content == data


def test_kernel_by_sendfile_with_a_timeline_entry(node: Node,
                                                  catalog: tuple[Path, dict[str, bytes]]
                                                  ) -> None:
    mac = "52:54:00:aa:10:77"
    node.ctx.timeline.record(mac, "dhcp answer", {"mac": mac, "ip": "127.0.0.1",
                                                  "boot_file": "ipxe.efi"})
    data = catalog[1]["live/vmlinuz"]
    r = requests.get(f"{node.url}/images/live/vmlinuz", headers={"Range": "bytes=0-99"},
                     timeout=10)
    assert r.status_code == 206 and r.content == data[:100]
    counted(node, "complete", 1, kind="kernel")
    r = requests.get(f"{node.url}/images/live/initrd.img", timeout=10)
    assert r.status_code == 200 and r.content == catalog[1]["live/initrd.img"]
    counted(node, "complete", 1, kind="initrd")
    body = {"sn": "FILES-T", "uuid": UUID, "macs": [mac], "boot_mac": mac, "arch": "x86_64",
            "inventory": {}, "agent_version": "test"}
    assert requests.post(f"{node.url}/agent/v1/register", json=body, timeout=10).ok

    def stages() -> list[str]:
        return [e["stage"] for e in node.timeline.read("FILES-T")]

    eventually(lambda: "agent registered" in stages(), timeout=10)
    assert stages()[:3] == ["dhcp answer", "kernel fetched", "initrd fetched"], stages()
    kernel = node.timeline.read("FILES-T")[1]["detail"]
    assert kernel == {"image": "live", "file": "vmlinuz", "range": "bytes=0-99",
                      "ip": "127.0.0.1"}


def test_ranges_206_416_and_if_range(node: Node, token: str,
                                     catalog: tuple[Path, dict[str, bytes]]) -> None:
    data = catalog[1]["lab-os/disk.img"]
    url, h = disk_url(node), auth(token)
    mid = requests.get(url, headers={**h, "Range": "bytes=1000-1999"}, timeout=10)
    assert mid.status_code == 206 and mid.content == data[1000:2000]
    assert mid.headers["Content-Range"] == f"bytes 1000-1999/{DISK}"
    assert mid.headers["Content-Length"] == "1000"
    resume = requests.get(url, headers={**h, "Range": f"bytes={DISK // 2}-"}, timeout=30)
    assert resume.status_code == 206 and resume.content == data[DISK // 2:]
    assert resume.headers["Content-Range"] == f"bytes {DISK // 2}-{DISK - 1}/{DISK}"
    tail = requests.get(url, headers={**h, "Range": "bytes=-10"}, timeout=10)
    assert tail.status_code == 206 and tail.content == data[-10:]
    clamped = requests.get(url, headers={**h, "Range": f"bytes={DISK - 5}-{DISK + 100}"},
                           timeout=10)
    assert clamped.status_code == 206 and clamped.content == data[-5:]
    for bad in (f"bytes={DISK}-", f"bytes={DISK + 5}-{DISK + 9}", "bytes=10-5"):
        r = requests.get(url, headers={**h, "Range": bad}, timeout=10)
        assert r.status_code == 416, bad
        assert r.headers["Content-Range"] == f"bytes */{DISK}" and r.content == b""
    # malformed or multi-range: ignored, the whole file (RFC 9110)
    many = requests.get(url, headers={**h, "Range": "bytes=0-1,5-6"}, timeout=30)
    assert many.status_code == 200 and len(many.content) == DISK
    etag = mid.headers["ETag"]
    stale = requests.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": '"other"'},
                         timeout=30)
    assert stale.status_code == 200 and stale.content == data
    fresh = requests.get(url, headers={**h, "Range": "bytes=0-9", "If-Range": etag},
                         timeout=10)
    assert fresh.status_code == 206 and fresh.content == data[:10]
    cached = requests.get(url, headers={**h, "If-None-Match": etag}, timeout=10)
    assert cached.status_code == 304 and cached.content == b""
    m = node.ctx.metrics
    assert m.get("http_files_total", kind="disk_image", status="416") == 3
    assert m.get("http_files_total", kind="disk_image", status="304") == 1


def test_head_sends_the_headers_only(node: Node, token: str) -> None:
    got = requests.get(disk_url(node), headers={**auth(token), "Range": "bytes=0-0"},
                       timeout=10)
    with socket.create_connection(("127.0.0.1", node.service.port), timeout=10) as sock:
        sock.sendall(f"HEAD /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {token}\r\n\r\n"
                     f"HEAD /images/live/vmlinuz HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        raw = b""
        deadline = time.monotonic() + 10
        while raw.count(b"\r\n\r\n") < 2 and time.monotonic() < deadline:
            raw += sock.recv(65536)
        sock.settimeout(0.5)
        with pytest.raises(TimeoutError):
            extra = sock.recv(65536)     # no body follows either head
            raw += extra
    first, second = raw.split(b"\r\n\r\n")[:2]
    assert first.startswith(b"HTTP/1.1 200 OK") and second.startswith(b"HTTP/1.1 200 OK")
    assert f"Content-Length: {DISK}".encode() in first
    assert f"ETag: {got.headers['ETag']}".encode() in first
    assert raw.endswith(b"\r\n\r\n")


def test_refusals_go_through_the_route(node: Node, token: str) -> None:
    # no token, a wrong one: 401 from the route (counted once)
    assert requests.get(disk_url(node), timeout=10).status_code == 401
    r = requests.get(disk_url(node), headers=auth("x" * 40), timeout=10)
    assert r.status_code == 401 and r.json()["error"] == "token_invalid"
    assert node.ctx.metrics.get("http_token_refused_total", reason="invalid") == 1
    assert node.ctx.metrics.get("http_token_refused_total", reason="missing") == 1
    # nothing outside the catalog, nothing escapes the image root
    for path in ("/images/live/catalog.toml", "/images/nope/vmlinuz",
                 "/images/live/..%2Fcatalog.toml", "/images/live/../catalog.toml",
                 "/images/lab-os/vmlinuz", "/images/lab-os/%2e%2e", "/images/../catalog.toml",
                 "/images/lab-os/disk.img/x", "/images/lab-os/.disk.img"):
        r = requests.get(node.url + path, headers=auth(token), timeout=10)
        assert r.status_code == 404, path
    with socket.create_connection(("127.0.0.1", node.service.port), timeout=10) as sock:
        sock.sendall(b"GET /images/lab-os/../../catalog.toml HTTP/1.1\r\nHost: x\r\n"
                     b"Connection: close\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 404")
    assert transfers(node, "complete") == 0


def test_keep_alive_after_a_whole_download(node: Node, token: str,
                                           catalog: tuple[Path, dict[str, bytes]]) -> None:
    data = catalog[1]["lab-os/disk.img"]
    conn = http.client.HTTPConnection("127.0.0.1", node.service.port, timeout=30)
    try:
        conn.request("GET", "/images/lab-os/disk.img", headers=auth(token))
        first = conn.getresponse()
        assert first.status == 200 and first.read() == data
        sock = conn.sock
        conn.request("GET", "/images/lab-os/disk.img",
                     headers={**auth(token), "Range": "bytes=5-9"})
        second = conn.getresponse()
        assert second.status == 206 and second.read() == data[5:10]
        conn.request("GET", "/boot.ipxe")
        third = conn.getresponse()
        assert third.status == 200 and third.read().startswith(b"#!ipxe")
        assert conn.sock is sock        # all on the one connection
    finally:
        conn.close()
    # pipelined: two bodies back to back, in order
    with socket.create_connection(("127.0.0.1", node.service.port), timeout=30) as s:
        s.sendall(f"GET /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {token}\r\nRange: bytes=0-3\r\n\r\n"
                  f"GET /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {token}\r\nRange: bytes=-4\r\n"
                  f"Connection: close\r\n\r\n".encode())
        raw = b""
        while chunk := s.recv(65536):
            raw += chunk
    one, rest = raw.split(b"\r\n\r\n", 1)
    assert one.startswith(b"HTTP/1.1 206") and rest[:4] == data[:4]
    two, body = rest[4:].split(b"\r\n\r\n", 1)
    assert two.startswith(b"HTTP/1.1 206") and b"Connection: close" in two
    assert body == data[-4:]


def test_disconnect_mid_transfer_frees_everything(node: Node, token: str) -> None:
    requests.get(f"{node.url}/healthz", timeout=10)     # the node's own fds settle first
    baseline = open_fds()
    for i in range(20):
        s = socket.create_connection(("127.0.0.1", node.service.port), timeout=10)
        s.sendall(f"GET /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {token}\r\n\r\n".encode())
        got = 0
        while got < (1 << 20) * (1 + i % 3):
            got += len(s.recv(1 << 20))
        if i % 2:       # a reset, or an orderly close with unread data
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        s.close()
    counted(node, "disconnect", 20)
    eventually(lambda: open_fds() <= baseline, timeout=10)
    assert len(node.service._server.conns) <= 1  # type: ignore[union-attr]
    sent = node.ctx.metrics.get("http_file_sent_bytes_total", kind="disk_image")
    assert 20 << 20 <= sent < 20 * DISK
    # and the node still serves
    r = requests.get(disk_url(node), headers={**auth(token), "Range": "bytes=0-0"}, timeout=10)
    assert r.status_code == 206


@pytest.mark.slow
def test_client_that_stops_reading_is_dropped(etcd_server: Any, keys: Keys, tmp_path: Path,
                                              catalog: tuple[Path, dict[str, bytes]]) -> None:
    n = _node(etcd_server, keys, tmp_path, catalog, http__timeout="2")
    try:
        body = {"sn": "FILES-2", "uuid": UUID, "macs": [MAC], "boot_mac": MAC,
                "arch": "x86_64", "inventory": {}, "agent_version": "test"}
        tok = requests.post(f"{n.url}/agent/v1/register", json=body, timeout=10).json()["token"]
        baseline = open_fds()
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.connect(("127.0.0.1", n.service.port))
        s.sendall(f"GET /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {tok}\r\n\r\n".encode())
        s.settimeout(10)
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        started = time.monotonic()          # and never reads again
        eventually(lambda: transfers(n, "timeout") == 1, timeout=15)
        took = time.monotonic() - started
        assert 1.5 < took < 8, took
        assert n.ctx.metrics.get("http_requests_refused_total", reason="send_timeout") == 1
        eventually(lambda: open_fds() <= baseline + 1, timeout=5)   # only our socket
        s.settimeout(5)
        received = 0
        with pytest.raises(ConnectionResetError):
            while chunk := s.recv(1 << 20):     # what was buffered, then the reset
                received += len(chunk)
            raise ConnectionResetError("closed")    # an orderly close counts too
        assert received < DISK
        s.close()
    finally:
        n.stop()


def test_stopping_the_node_mid_transfer_closes_its_files(etcd_server: Any, keys: Keys,
                                                         tmp_path: Path,
                                                         catalog: tuple[Path, dict[str, bytes]]
                                                         ) -> None:
    n = _node(etcd_server, keys, tmp_path, catalog)
    stopped = False
    try:
        body = {"sn": "FILES-3", "uuid": UUID, "macs": [MAC], "boot_mac": MAC,
                "arch": "x86_64", "inventory": {}, "agent_version": "test"}
        tok = requests.post(f"{n.url}/agent/v1/register", json=body, timeout=10).json()["token"]
        image = catalog[0].parent / "lab-os" / "disk.img"

        def image_open() -> int:
            fds = Path("/proc/self/fd")
            count = 0
            for fd in fds.iterdir():
                with contextlib.suppress(OSError):
                    count += os.readlink(fd) == str(image.resolve())
            return count

        assert image_open() == 0
        s = socket.create_connection(("127.0.0.1", n.service.port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(f"GET /images/lab-os/disk.img HTTP/1.1\r\nHost: x\r\n"
                  f"Authorization: Bearer {tok}\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        assert image_open() >= 1            # the transfer holds the file (and a dup)
        n.stop()
        stopped = True
        assert transfers(n, "shutdown") == 1
        assert image_open() == 0
        s.close()
    finally:
        if not stopped:
            n.stop()
