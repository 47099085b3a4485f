"""Our TFTP server against real clients nobody here wrote: curl, atftp and
tftp-hpa's tftp.  Every fetched file's sha256 must equal the source's."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from bootsvc.context import MemoryTimeline, NodeContext
from bootsvc.settings import NODE_SETTINGS
from bootsvc.tftp.service import TftpService
from bootsvc.tftp.settings import SETTINGS
from bootsvc.tftp.testing import ThreadedTftpServer
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.metrics import Registry
from tests.prometheus_text import value as metric_value

SIZES = {"empty": 0, "s511": 511, "s512": 512, "s513": 513, "m1": 1024 * 1024}
BIG = 32 * 1024 * 1024
#: just over 65535 blocks of 512 bytes: the block number must roll over
ROLLOVER = 65536 * 512 + 1000

pytestmark = pytest.mark.skipif(
    not all(shutil.which(c) for c in ("curl", "atftp", "tftp")),
    reason="needs curl, atftp and tftp-hpa")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tftproot")
    rng = os.urandom
    for name, size in SIZES.items():
        (root / name).write_bytes(rng(size))
    (root / "big").write_bytes(rng(BIG))
    (root / "rollover").write_bytes(rng(ROLLOVER))
    (root / "text.txt").write_bytes(b"line one\nline two\r\nend\n")
    (root / "sub").mkdir()
    (root / "sub" / "nested.bin").write_bytes(rng(3000))
    return root


@pytest.fixture(scope="module")
def server(root):
    transfers: list[dict] = []
    with ThreadedTftpServer(root, host="127.0.0.1", port=0, metrics=Registry(),
                            on_transfer=transfers.append, max_sessions=400,
                            max_sessions_per_client=400, timeout=0.5) as srv:
        srv.transfers = transfers
        yield srv


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)


def curl(port: int, name: str, out: Path, blksize: int | None = None) -> None:
    cmd = ["curl", "-sS", "--max-time", "60", "-o", str(out)]
    if blksize:
        cmd += ["--tftp-blksize", str(blksize)]
    result = run(cmd + [f"tftp://127.0.0.1:{port}/{name}"])
    assert result.returncode == 0, result.stderr


def atftp(port: int, name: str, out: Path, blksize: int | None = None,
          windowsize: int | None = None) -> None:
    cmd = ["atftp"]
    if blksize:
        cmd += ["--option", f"blksize {blksize}"]
    if windowsize:
        cmd += ["--option", f"windowsize {windowsize}"]
    result = run(cmd + ["-g", "-r", name, "-l", str(out), "127.0.0.1", str(port)])
    assert result.returncode == 0, result.stderr


def tftp_hpa(port: int, name: str, out: Path, mode: str = "binary",
             blksize: int | None = None) -> None:
    cmd = ["tftp", "127.0.0.1", str(port), "-m", mode]
    if blksize:
        cmd[1:1] = ["-B", str(blksize)]
    result = run(cmd + ["-c", "get", name, str(out)])
    assert result.returncode == 0 and b"Error" not in result.stderr + result.stdout, \
        result.stderr + result.stdout


CLIENTS = {
    "curl": lambda port, name, out: curl(port, name, out),
    "curl-1468": lambda port, name, out: curl(port, name, out, blksize=1468),
    "atftp": lambda port, name, out: atftp(port, name, out),
    "atftp-1468-w16": lambda port, name, out: atftp(port, name, out, 1468, 16),
    "atftp-512-w4": lambda port, name, out: atftp(port, name, out, 512, 4),
    "tftp-hpa": lambda port, name, out: tftp_hpa(port, name, out),
}


@pytest.mark.parametrize("client", sorted(CLIENTS))
@pytest.mark.parametrize("name", sorted(SIZES))
def test_fetch_sha256_equal_small_sizes(server, root, tmp_path, client, name):
    if client.startswith("curl") and name == "empty":
        pytest.skip("curl 7.88 fails every empty TFTP download (getpeername errno 107), "
                    "against tftpd-hpa too")
    out = tmp_path / "out"
    CLIENTS[client](server.port, name, out)
    assert sha(out.read_bytes()) == sha((root / name).read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("client", ["curl-1468", "atftp-1468-w16", "tftp-hpa"])
def test_fetch_sha256_equal_32mib(server, root, tmp_path, client):
    out = tmp_path / "out"
    CLIENTS[client](server.port, "big", out)
    assert sha(out.read_bytes()) == sha((root / "big").read_bytes())


@pytest.mark.slow
@pytest.mark.parametrize("client", ["curl", "atftp-512-w4"])
def test_fetch_block_number_rollover_at_blksize_512(server, root, tmp_path, client):
    out = tmp_path / "out"
    CLIENTS[client](server.port, "rollover", out)
    assert out.stat().st_size == ROLLOVER
    assert sha(out.read_bytes()) == sha((root / "rollover").read_bytes())


def test_fetch_subdirectory_with_backslash_name(server, root, tmp_path):
    out = tmp_path / "out"
    atftp(server.port, "sub\\nested.bin", out)
    assert out.read_bytes() == (root / "sub" / "nested.bin").read_bytes()


def test_netascii_mode_round_trips_through_tftp_hpa(server, root, tmp_path):
    out = tmp_path / "out"
    tftp_hpa(server.port, "text.txt", out, mode="ascii")
    # the client converts CR LF back to LF (and CR NUL to CR)
    assert out.read_bytes() == (root / "text.txt").read_bytes()


def test_missing_file_gets_error_from_every_client(server, tmp_path):
    out = tmp_path / "out"
    result = run(["curl", "-sS", "--max-time", "10", "-o", str(out),
                  f"tftp://127.0.0.1:{server.port}/nope"])
    assert result.returncode != 0
    result = run(["atftp", "-g", "-r", "nope", "-l", str(out), "127.0.0.1", str(server.port)])
    assert b"not found" in (result.stderr + result.stdout).lower()


@pytest.mark.slow
def test_200_concurrent_curl_clients_all_succeed(server, root, tmp_path):
    expected = sha((root / "m1").read_bytes())
    procs = []
    for i in range(200):
        out = tmp_path / f"out{i}"
        cmd = ["curl", "-sS", "--max-time", "120", "--tftp-blksize", "1468", "-o", str(out),
               f"tftp://127.0.0.1:{server.port}/m1"]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL,
                                       stderr=subprocess.PIPE), out))
    failures = []
    for proc, out in procs:
        _, err = proc.communicate(timeout=150)
        if proc.returncode != 0 or sha(out.read_bytes()) != expected:
            failures.append((proc.returncode, err[-200:]))
    assert failures == []


def test_transfer_records_and_metrics(server, root, tmp_path):
    before = len(server.transfers)
    curl(server.port, "s513", tmp_path / "out")
    deadline = time.monotonic() + 5
    while len(server.transfers) == before and time.monotonic() < deadline:
        time.sleep(0.01)     # recorded when the last ACK arrives
    record = server.transfers[before]
    assert record["file"] == "s513" and record["status"] == "ok"
    assert record["bytes"] == 513 and record["client"] == "127.0.0.1"
    assert server.metrics.get("tftp_sessions_total", status="ok") >= 1
    assert metric_value(server.metrics.render(), "lpmos_tftp_transfer_seconds_count") >= 1


# --- the node's service ------------------------------------------------------


def node_tftp(tmp_path: Path, advertise_url: str) -> tuple[NodeContext, MemoryTimeline]:
    """A node context for a TFTP service on a free port of 127.0.0.1."""
    config = resolve(settings_by_key([COMMON, NODE_SETTINGS, SETTINGS]), flags={
        "state_dir": str(tmp_path), "tftp__port": "0", "regional__listen": "127.0.0.1",
        "tftp__timeout": "0.5"}, environ={}, config_file=None)
    timeline = MemoryTimeline()
    ctx = NodeContext(config=config, idc="dc1", node_name="n1", store=None, keys=None,
                      cache=None, machines=None, metrics=Registry(), timeline=timeline,
                      advertise_url=advertise_url, server_ip="192.0.2.10")
    return ctx, timeline


def fetch_with_curl(service: TftpService, names: list[str], out: Path, *,
                    together: bool = False, max_time: int = 10) -> dict[str, tuple[int, bytes]]:
    """Start ``service``, fetch each of ``names`` with curl (one after
    another, or all ``together``), stop it: name -> (curl's exit status, the
    bytes it wrote)."""
    got: dict[str, tuple[int, bytes]] = {}
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(service.start())

        async def fetch(name: str) -> None:
            dest = out / name.replace("/", "_")
            proc = await asyncio.create_subprocess_exec(
                "curl", "-sS", "--max-time", str(max_time), "-o", str(dest),
                f"tftp://127.0.0.1:{service.port}/{name}", stderr=asyncio.subprocess.DEVNULL)
            code = await proc.wait()
            got[name] = (code, dest.read_bytes() if dest.exists() else b"")

        async def fetch_all() -> None:
            if together:
                await asyncio.gather(*(fetch(n) for n in names))
            else:
                for n in names:
                    await fetch(n)
        loop.run_until_complete(fetch_all())
        loop.run_until_complete(service.stop())
    finally:
        loop.close()
    return got


def test_service_prepares_root_serves_ipxe_and_boot_script(tmp_path):
    if not Path("/usr/lib/ipxe/ipxe.efi").exists():
        pytest.skip("Debian's ipxe package is not installed")
    ctx, timeline = node_tftp(tmp_path, "http://192.0.2.10:8081")
    service = TftpService(ctx)
    assert service.server.threads_busy is not None and not service.server.threads_busy()
    ctx.busy_checks.append(lambda: True)        # boot HTTP's pool has work
    assert service.server.threads_busy()
    ctx.busy_checks.clear()
    got = fetch_with_curl(service, ["ipxe.efi", "boot.ipxe"], tmp_path)
    assert got["ipxe.efi"] == (0, Path("/usr/lib/ipxe/ipxe.efi").read_bytes())
    code, script = got["boot.ipxe"]
    assert code == 0 and script.decode().startswith("#!ipxe\n")
    assert "chain --autofree --replace http://192.0.2.10:8081/boot.ipxe" in script.decode()
    stages = timeline.entries("ip:127.0.0.1")
    assert [e["detail"]["file"] for e in stages] == ["ipxe.efi", "boot.ipxe"]
    assert [e["stage"] for e in stages] == ["loader ipxe", "tftp"]
    assert all(e["detail"]["status"] == "ok" for e in stages)
    assert ctx.metrics.get("tftp_sessions_total", status="ok") == 2


def test_service_serves_the_secure_boot_chain_and_grub_config(tmp_path):
    """What a Secure Boot machine fetches over TFTP, as real clients: the
    signed shim, the signed GRUB network image under the name shim loads,
    and GRUB's constant config; each is its own timeline stage."""
    shim = Path("/usr/lib/shim/shimx64.efi.signed")
    grub = Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed")
    assert shim.is_file() and grub.is_file(), "scripts/setup.sh installs shim-signed, " \
        "grub-efi-amd64-signed"
    ctx, timeline = node_tftp(tmp_path, "http://192.0.2.10")
    got = fetch_with_curl(TftpService(ctx), [
        "shimx64.efi", "grubx64.efi", "grub/grub.cfg",
        "grub/x86_64-efi/grub.cfg"], tmp_path)      # GRUB's probe: a plain "not found"
    assert got["shimx64.efi"] == (0, shim.read_bytes())
    assert got["grubx64.efi"] == (0, grub.read_bytes())
    assert got["grub/grub.cfg"][0] == 0
    assert 'source "$prefix/${net_default_mac}.cfg"' in got["grub/grub.cfg"][1].decode()
    assert got["grub/x86_64-efi/grub.cfg"][0] != 0
    stages = [e["stage"] for e in timeline.entries("ip:127.0.0.1")]
    assert stages[:3] == ["loader shim", "loader grub", "grub.cfg"]
