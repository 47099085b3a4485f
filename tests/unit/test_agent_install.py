"""Install: the pure decisions as tables, the streaming writer against an
in-memory source with faults, and the seed written with mtools."""

from __future__ import annotations

import hashlib
import io
import itertools
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.client import Backoff, NodeError, Unreachable
from agent.install import (
    GIB,
    SYNC_EVERY,
    InstallError,
    NoSuitableDisk,
    ProgressThrottle,
    RootDeviceHints,
    build_progress,
    decide_resume,
    decide_sync,
    decide_target_disk,
    install_image,
    open_target,
    parse_install,
    parse_root_device_hints,
    write_image,
    write_seed,
)
from agent.seed_partition import SEED_BYTES
from lpmos.testing import write_cloud_like_disk

DISKS = [
    {"name": "nvme0n1", "size_bytes": 960 * GIB, "model": "SAMSUNG MZQL2", "serial": "S1",
     "rotational": False, "removable": False,
     "by_path": "/dev/disk/by-path/pci-0000:03:00.0-nvme-1"},
    {"name": "sda", "size_bytes": 480 * GIB, "model": "MTFDDAK480TDS", "serial": "S2",
     "rotational": False, "removable": False},
    {"name": "sdb", "size_bytes": 4000 * GIB, "model": "ST4000NM000A", "serial": "S3",
     "rotational": True, "removable": False},
    {"name": "sdc", "size_bytes": 30 * GIB, "model": "Ultra Fit", "rotational": False,
     "removable": True},
]


@pytest.mark.parametrize(("hints", "allow", "image", "chosen"), [
    ({}, False, 10 * GIB, "sda"),                                # smallest fixed disk that fits
    ({}, True, 10 * GIB, "sdc"),                                 # removable allowed: smallest
    ({"rotational": True}, False, GIB, "sdb"),
    ({"size_min_gb": 500}, False, GIB, "nvme0n1"),
    ({"model": "st4000nm000a"}, False, GIB, "sdb"),              # case-blind
    ({"serial": "S1"}, False, GIB, "nvme0n1"),
    ({"by_path": "pci-0000:03:00.0-nvme-1"}, False, GIB, "nvme0n1"),
    ({"name": "/dev/sdb"}, False, GIB, "sdb"),
    ({}, False, 600 * GIB, "nvme0n1"),                          # sda too small for the image
])
def test_decide_target_disk(hints: dict, allow: bool, image: int, chosen: str) -> None:
    disk = decide_target_disk(DISKS, parse_root_device_hints(hints), image_size=image,
                              allow_removable=allow)
    assert disk["name"] == chosen


def test_decide_target_disk_refusals_name_reasons() -> None:
    with pytest.raises(NoSuitableDisk) as info:
        decide_target_disk(DISKS, RootDeviceHints(name="sdc"), image_size=GIB)
    assert info.value.reasons["sdc"] == "removable (allow_removable is off)"
    assert info.value.reasons["sda"] == "name is not sdc"
    with pytest.raises(NoSuitableDisk, match="smaller than the image"):
        decide_target_disk(DISKS, RootDeviceHints(), image_size=5000 * GIB)
    with pytest.raises(NoSuitableDisk, match="no disks found"):
        decide_target_disk([], RootDeviceHints(), image_size=1)


@pytest.mark.parametrize("hints", [{"size": 5}, {"rotational": "yes"}, {"size_min_gb": -1},
                                   {"model": 7}, "sda"])
def test_bad_hints_refused(hints: object) -> None:
    with pytest.raises(InstallError):
        parse_root_device_hints(hints)


GOOD = {"mode": "image", "image": "lab", "image_url": "http://n/images/lab/disk.img",
        "sha256": "a" * 64, "size": 10, "root_device_hints": {"rotational": False},
        "seed": {"user-data": "u", "meta-data": "m", "network-config": "n"},
        "allow_removable": False}


def test_parse_install_ok() -> None:
    spec = parse_install(GOOD)
    assert spec.hints == RootDeviceHints(rotational=False) and spec.size == 10
    assert spec.seed == {"user-data": "u", "meta-data": "m", "network-config": "n"}


@pytest.mark.parametrize(("change", "match"), [
    ({"mode": "installer"}, "not supported"),
    ({"image_url": "file:///etc/shadow"}, "image_url"),
    ({"sha256": "xyz"}, "sha256"),
    ({"size": 0}, "size"),
    ({"size": True}, "size"),
    ({"seed": {"user-data": "u"}}, "meta-data"),
    ({"seed": {"user-data": "u", "meta-data": 3}}, "meta-data"),
])
def test_parse_install_refuses(change: dict, match: str) -> None:
    with pytest.raises(InstallError, match=match):
        parse_install({**GOOD, **change})


def test_progress_throttle_every_2_percent_or_2_seconds() -> None:
    t = ProgressThrottle(total=1000)
    assert t.due(0, 0.0)
    t.mark(0, 0.0)
    assert not t.due(19, 1.0)
    assert t.due(20, 1.0)              # 2 %
    t.mark(20, 1.0)
    assert not t.due(21, 2.9)
    assert t.due(21, 3.0)              # 2 s
    assert t.mark(21, 3.0) == pytest.approx(0.5)
    assert t.due(1000, 3.0)            # always at the end
    t.mark(1000, 3.0)
    assert not t.due(1000, 10.0)


MIB = 1024 * 1024


@pytest.mark.parametrize(("done", "size", "rate", "event"), [
    (0, 30 * MIB, 0.0, {"percent": 0.0, "bytes_done": 0, "rate": 0.0,
                        "message": "0 of 30 MiB at 0.0 MiB/s"}),
    (15 * MIB, 30 * MIB, 12.5 * MIB, {"percent": 47.5, "bytes_done": 15 * MIB,
                                      "rate": 13107200.0,
                                      "message": "15 of 30 MiB at 12.5 MiB/s"}),
    (30 * MIB, 30 * MIB, 1234.56, {"percent": 95.0, "bytes_done": 30 * MIB, "rate": 1234.6,
                                   "message": "30 of 30 MiB at 0.0 MiB/s"}),
    (1, 3, 0.0, {"percent": 31.67, "bytes_done": 1, "rate": 0.0,
                 "message": "0 of 0 MiB at 0.0 MiB/s"}),
])
def test_build_progress(done: int, size: int, rate: float, event: dict) -> None:
    assert build_progress(done, size, rate) == {"kind": "progress", "step": "writing image",
                                                "bytes_total": size, **event}


@pytest.mark.parametrize(("start", "done", "restart"), [
    (0, 0, False),              # the first stream
    (700_000, 700_000, False),  # Range honoured
    (0, 700_000, True),         # the whole image again: start over
    (100, 700_000, None),       # a gap or an overlap: refused
    (800_000, 700_000, None),
])
def test_decide_resume(start: int, done: int, restart: bool | None) -> None:
    if restart is None:
        with pytest.raises(InstallError, match=f"resumed at {start}, expected {done}"):
            decide_resume(start, done)
    else:
        assert decide_resume(start, done) is restart


@pytest.mark.parametrize(("written", "synced", "due"), [
    (0, 0, False),
    (SYNC_EVERY - 1, 0, False),
    (SYNC_EVERY, 0, True),
    (2 * SYNC_EVERY - 1, SYNC_EVERY, False),
    (2 * SYNC_EVERY + 5, SYNC_EVERY, True),
    (10, SYNC_EVERY, False),    # restarted from 0 after a sync
])
def test_decide_sync(written: int, synced: int, due: bool) -> None:
    assert decide_sync(written, synced) is due


# --- write_image ---------------------------------------------------------------------


class MemorySource:
    """Serves ``data`` with Range; ``cuts`` lists byte counts after which a
    stream breaks; ``refuse`` raises on open; ``ignore_range`` restarts at 0."""

    def __init__(self, data: bytes, cuts: list[int] | None = None,
                 opens_fail: list[Exception] | None = None, ignore_range: bool = False) -> None:
        self.data = data
        self.cuts = list(cuts or [])
        self.opens_fail = list(opens_fail or [])
        self.ignore_range = ignore_range
        self.opened: list[int] = []

    def open(self, offset: int, etag: str | None):
        self.opened.append(offset)
        if self.opens_fail:
            raise self.opens_fail.pop(0)
        start = 0 if self.ignore_range else offset
        end = len(self.data)
        if self.cuts:
            end = min(end, start + self.cuts.pop(0))
        return io.BytesIO(self.data[start:end]), start, '"e1"'


def run_write(tmp_path: Path, source: MemorySource, data: bytes, sha: str | None = None,
              **kw: object) -> tuple[list[dict], Path]:
    events: list[dict] = []
    target = tmp_path / "disk.img"
    target.write_bytes(b"\xff" * (len(data) + 4096))      # longer stale content: truncated
    with open_target(target, size=len(data), allow_removable=False) as tgt:
        write_image(source, tgt, size=len(data), sha256=sha or hashlib.sha256(data).hexdigest(),
                    report=events.append, backoff=Backoff(0.001, 0.002), sleep=lambda s: None,
                    **kw)
    return events, target


def test_write_image_checksum_and_progress(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 123)
    events, target = run_write(tmp_path, MemorySource(data), data)
    assert target.read_bytes() == data
    assert events[0]["bytes_done"] == 0 and events[-1]["bytes_done"] == len(data)
    assert all(e["bytes_total"] == len(data) for e in events)
    assert events[-1]["percent"] == 95.0
    done = [e["bytes_done"] for e in events]
    assert done == sorted(done)
    steps = [b - a for a, b in itertools.pairwise(done)]
    assert max(steps) <= max(len(data) * 0.02, 1024 * 1024) + 1   # every 2 % (or chunk)


def test_write_image_resumes_with_range(tmp_path: Path) -> None:
    data = os.urandom(2 * 1024 * 1024)
    source = MemorySource(data, cuts=[700_000, 10])
    _events, target = run_write(tmp_path, source, data)
    assert target.read_bytes() == data
    assert source.opened == [0, 700_000, 700_010]


def test_write_image_retries_transient_open_errors(tmp_path: Path) -> None:
    data = os.urandom(100_000)
    source = MemorySource(data, opens_fail=[Unreachable("down"), NodeError(503, "busy")])
    _, target = run_write(tmp_path, source, data)
    assert target.read_bytes() == data


def test_write_image_restarts_when_range_ignored(tmp_path: Path) -> None:
    data = os.urandom(1_500_000)
    source = MemorySource(data, cuts=[1_000_000], ignore_range=True)
    _, target = run_write(tmp_path, source, data)
    assert target.read_bytes() == data
    assert source.opened == [0, 1_000_000]


def test_write_image_refused_for_good(tmp_path: Path) -> None:
    data = b"x" * 100
    with pytest.raises(InstallError, match="refused"):
        run_write(tmp_path, MemorySource(data, opens_fail=[NodeError(401, "token")]), data)


def test_write_image_sha_mismatch_fails(tmp_path: Path) -> None:
    data = b"y" * 5000
    with pytest.raises(InstallError, match="sha256 mismatch"):
        run_write(tmp_path, MemorySource(data), data, sha="0" * 64)


def test_write_image_stall_fails(tmp_path: Path) -> None:
    data = b"z" * 5000
    clock = iter(range(0, 10_000, 100))
    source = MemorySource(data, opens_fail=[Unreachable("down")] * 50)
    with pytest.raises(InstallError, match="stalled"):
        run_write(tmp_path, source, data, stall_timeout=250.0,
                  clock=lambda: float(next(clock)))


def test_write_image_larger_than_announced_fails(tmp_path: Path) -> None:
    data = b"q" * 5000
    source = MemorySource(data + b"extra")
    with pytest.raises(InstallError, match="larger"):
        run_write(tmp_path, source, data)


def test_open_target_refuses_directory(tmp_path: Path) -> None:
    with pytest.raises(InstallError, match="neither"), \
            open_target(tmp_path, size=1, allow_removable=False):
        pass


# --- the seed --------------------------------------------------------------------------

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sfdisk", "mkfs.vfat", "mcopy", "mtype")),
    reason="needs fdisk, dosfstools and mtools (scripts/setup.sh system)")


def make_image(path: Path, *, gpt: bool = True, name: str = "cidata", label: str = "CIDATA",
               size_mib: int = 8) -> int:
    """An image with a FAT seed partition at sector 6144 (3-7 MiB); returns its offset."""
    with path.open("wb") as fh:
        fh.truncate(size_mib * 1024 * 1024)
    if gpt:
        table = (f'label: gpt\nstart=2048, size=4096, name="EFI"\n'
                 f'start=6144, size=8192, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, '
                 f'name="{name}"\n')
    else:
        table = "label: dos\nstart=2048, size=4096, type=83\nstart=6144, size=8192, type=c\n"
    subprocess.run(["sfdisk", "-q", str(path)], input=table.encode(), check=True, timeout=30)
    subprocess.run(["mkfs.vfat", "-n", label, "--offset", "6144", str(path), "4096"],
                   check=True, capture_output=True, timeout=30)
    return 6144 * 512


def mtype(path: Path, offset: int, name: str) -> str:
    return subprocess.run(["mtype", "-i", f"{path}@@{offset}", f"::/{name}"], check=True,
                          capture_output=True, timeout=30,
                          env=dict(os.environ, MTOOLS_SKIP_CHECK="1")).stdout.decode()


SEED = {"user-data": "#cloud-config\nhostname: web-01\n", "meta-data": "instance-id: i-9\n",
        "network-config": "version: 2\n"}


@needs_tools
@pytest.mark.parametrize(("gpt", "name", "label"), [(True, "cidata", "OTHER"),
                                                    (False, "", "CIDATA"),
                                                    (True, "data", "cidata")])
def test_write_seed_into_image(tmp_path: Path, gpt: bool, name: str, label: str) -> None:
    image = tmp_path / "img"
    offset = make_image(image, gpt=gpt, name=name or "x", label=label)
    assert write_seed(image, SEED) == offset
    for file, text in SEED.items():
        assert mtype(image, offset, file) == text
    assert write_seed(image, {**SEED, "meta-data": "instance-id: i-10\n"}) == offset  # -o
    assert mtype(image, offset, "meta-data") == "instance-id: i-10\n"


@needs_tools
def test_write_seed_without_cidata_fails(tmp_path: Path) -> None:
    image = tmp_path / "img"
    make_image(image, name="root", label="ROOT")
    with pytest.raises(InstallError, match="no 'cidata' partition"):
        write_seed(image, SEED)


def test_write_seed_on_garbage_fails(tmp_path: Path) -> None:
    image = tmp_path / "img"
    image.write_bytes(b"\0" * 4096)
    with pytest.raises(InstallError, match="partition table"):
        write_seed(image, SEED)


# --- stock cloud images: formats, resume, seed partition, failure cleanup -------------

needs_image_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("qemu-img", "zstd", "xz", "gzip", "sfdisk", "mformat",
                                      "mcopy", "mtype")),
    reason="needs qemu-utils, zstd, xz-utils, gzip, fdisk and mtools")

CLOUD_MIB = 24
DISK = 64 * MIB


@pytest.fixture(scope="module")
def cloud(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    """A cloud-image-like raw disk (GPT: bios_grub, ESP, root last; random and
    sparse data, no cidata) and its published forms."""
    tmp = tmp_path_factory.mktemp("cloud")
    raw = tmp / "cloud.raw"
    write_cloud_like_disk(raw, size=CLOUD_MIB * MIB, esp_sectors=4096,
                          data=[(at, 700_000) for at in (3 * MIB, 7 * MIB + 4321, 15 * MIB,
                                                         20 * MIB)])
    out = {"raw": raw.read_bytes()}
    for fmt, cmd in {"qcow2": ["qemu-img", "convert", "-O", "qcow2", str(raw)],
                     "qcow2-c": ["qemu-img", "convert", "-c", "-O", "qcow2", str(raw)]}.items():
        subprocess.run([*cmd, str(tmp / fmt)], check=True, timeout=60)
        out[fmt] = (tmp / fmt).read_bytes()
    for fmt, cmd in {"raw.zst": ["zstd", "-q", "-c"], "raw.xz": ["xz", "-c", "-1"],
                     "raw.gz": ["gzip", "-c"]}.items():
        out[fmt] = subprocess.run([*cmd, str(raw)], check=True, capture_output=True,
                                  timeout=60).stdout
    return out


def install(tmp_path: Path, published: bytes, fmt: str, source: MemorySource | None = None,
            *, sha: str | None = None, disk_size: int | None = DISK,
            spec_disk_size: int | None = None, **kw: object) -> tuple[list[dict], Path, int]:
    events: list[dict] = []
    spec = parse_install({**GOOD, "size": len(published), "format": fmt.removesuffix("-c"),
                          "sha256": sha or hashlib.sha256(published).hexdigest(),
                          "disk_size": spec_disk_size, "seed": SEED})
    target = tmp_path / "disk"
    offset = install_image(source or MemorySource(published), spec, target,
                           report=events.append, allow_removable=False, disk_size=disk_size,
                           backoff=Backoff(0.001, 0.002), sleep=lambda s: None, **kw)
    return events, target, offset


FORMATS = ["raw", "qcow2", "qcow2-c", "raw.zst", "raw.xz", "raw.gz"]


def check_cloud_install(target: Path, raw: bytes, offset: int) -> None:
    written = target.read_bytes()
    assert len(written) == DISK
    # the image's partitions are the image's bytes (LBA 34 on; the GPT at 0-33 changed)
    assert written[34 * 512:len(raw) - 33 * 512] == raw[34 * 512:-33 * 512]
    assert "No errors detected" in subprocess.run(
        ["sfdisk", "--verify", str(target)], capture_output=True, timeout=30).stdout.decode()
    assert offset + SEED_BYTES <= DISK and offset >= DISK - SEED_BYTES - MIB
    for file, text in SEED.items():
        assert mtype(target, offset, file) == text


@needs_image_tools
@pytest.mark.parametrize("fmt", FORMATS)
def test_install_cloud_image_adds_the_seed(tmp_path: Path, cloud: dict[str, bytes],
                                           fmt: str) -> None:
    events, target, offset = install(tmp_path, cloud[fmt], fmt)
    check_cloud_install(target, cloud["raw"], offset)
    assert any("added one of 4 MiB" in e.get("message", "") for e in events)
    percents = [e["percent"] for e in events if e["kind"] == "progress"]
    assert percents[-2:] == [95.0, 96.0] and percents == sorted(percents)


@needs_image_tools
@pytest.mark.parametrize("fmt", FORMATS)
def test_install_resumes_mid_stream_for_every_format(tmp_path: Path, cloud: dict[str, bytes],
                                                     fmt: str) -> None:
    data = cloud[fmt]
    source = MemorySource(data, cuts=[len(data) // 3, 1000])
    events, target, offset = install(tmp_path, data, fmt, source)
    check_cloud_install(target, cloud["raw"], offset)
    assert source.opened == [0, len(data) // 3, len(data) // 3 + 1000]
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert f"resumed at byte {len(data) // 3} of {len(data)}" in logs


@needs_image_tools
@pytest.mark.parametrize("fmt", ["qcow2", "raw.zst"])
def test_install_restarts_when_range_is_ignored(tmp_path: Path, cloud: dict[str, bytes],
                                                fmt: str) -> None:
    data = cloud[fmt]
    source = MemorySource(data, cuts=[len(data) // 2], ignore_range=True)
    events, target, offset = install(tmp_path, data, fmt, source)
    check_cloud_install(target, cloud["raw"], offset)
    logs = [e["message"] for e in events if e["kind"] == "log"]
    assert any(m.startswith(f"restarting from 0 after {len(data) // 2} bytes") for m in logs)


def wiped(target: Path) -> bool:
    data = target.read_bytes()
    return data[:MIB] == bytes(MIB) and data[-MIB:] == bytes(MIB)


@needs_image_tools
@pytest.mark.parametrize(("case", "match"), [
    ("checksum", "sha256 mismatch"),
    ("truncated download", "stalled"),
    ("truncated qcow2", r"qcow2 image is truncated|inside the file"),
    ("backing file", "backing file"),
    ("bad header", "cluster_bits 30 out of range"),
    ("larger than the disk", r"the image's disk is \d+ bytes, larger than"),
    ("larger than the disk, zst", r"the image's disk is \d+ bytes, larger than"),
    ("no room for the seed", "no room for the 4 MiB cidata seed partition"),
])
def test_bad_input_fails_clearly_and_wipes(tmp_path: Path, cloud: dict[str, bytes], case: str,
                                           match: str) -> None:
    fmt, data, kw = "qcow2", cloud["qcow2"], {}
    if case == "checksum":
        kw = {"sha": "0" * 64}
    elif case == "truncated download":
        clock = iter(range(0, 100_000, 100))
        kw = {"source": MemorySource(data, cuts=[len(data) // 2] + [0] * 200),
              "stall_timeout": 250.0, "clock": lambda: float(next(clock))}
    elif case == "truncated qcow2":
        data = data[:len(data) // 2]
    elif case == "backing file":
        base = tmp_path / "base.raw"
        base.write_bytes(cloud["raw"])
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                        str(tmp_path / "over.qcow2")], check=True, timeout=30)
        data = (tmp_path / "over.qcow2").read_bytes()
    elif case == "bad header":
        data = data[:20] + (30).to_bytes(4, "big") + data[24:]
    elif case == "larger than the disk":
        kw = {"disk_size": 16 * MIB}
    elif case == "larger than the disk, zst":
        fmt, data = "raw.zst", cloud["raw.zst"]
        kw = {"disk_size": 16 * MIB}
    elif case == "no room for the seed":
        kw = {"disk_size": CLOUD_MIB * MIB + MIB}
    source = kw.pop("source", None)
    (tmp_path / "disk").write_bytes(b"\xee" * DISK)
    with pytest.raises(InstallError, match=match):
        install(tmp_path, data, fmt, source, **kw)  # type: ignore[arg-type]
    assert wiped(tmp_path / "disk")


def test_parse_install_format_and_disk_size() -> None:
    spec = parse_install({**GOOD, "format": "raw.zst", "disk_size": 2 * GIB})
    assert (spec.format, spec.disk_size, spec.known_disk_size) == ("raw.zst", 2 * GIB, 2 * GIB)
    old = parse_install(GOOD)                 # an old node: raw, the file is the disk
    assert (old.format, old.disk_size, old.known_disk_size) == ("raw", None, 10)
    with pytest.raises(InstallError, match=r"install\.format"):
        parse_install({**GOOD, "format": "vmdk"})
    with pytest.raises(InstallError, match=r"install\.disk_size"):
        parse_install({**GOOD, "disk_size": -5})
