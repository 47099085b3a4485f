"""The release wipe on real block devices (loop devices over files): a disk
with a GPT and an ext4 file system in a partition is left with no signature
and no partition table; one that supports discard is also blkdiscarded
(its backing file's blocks are punched out), one that does not is wiped
without it, and the log line of each says which."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.wipe import read_disk_facts, wipe_disk

SIZE = 64 * 1024 * 1024

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or not all(shutil.which(t) for t in ("losetup", "sgdisk", "wipefs",
                                                           "blkdiscard", "mkfs.ext4", "blkid")),
    reason="needs root, losetup, sgdisk, wipefs, blkdiscard, mkfs.ext4 and blkid")


def sh(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), capture_output=True, text=True, timeout=60, check=False)


LOOP_CTL_ADD, LOOP_CTL_REMOVE = 0x4C80, 0x4C81
LOOP_MAJOR = 7


@contextlib.contextmanager
def private_loop() -> Iterator[Path]:
    """A loop device of the test's own (``LOOP_CTL_ADD`` of an unused
    number), removed at the end: its queue limits, which the no-discard
    test lowers and which outlive a detach, die with it."""
    fd = os.open("/dev/loop-control", os.O_RDWR)
    try:
        for number in range(240, 480):
            try:
                fcntl.ioctl(fd, LOOP_CTL_ADD, number)
                break
            except OSError as exc:
                if exc.errno != errno.EEXIST:
                    raise
        else:
            pytest.fail("no free loop device number in 240..479")
        node = Path(f"/dev/loop{number}")
        made = False
        if not node.exists():
            os.mknod(node, 0o600 | stat.S_IFBLK, os.makedev(LOOP_MAJOR, number))
            made = True
        try:
            yield node
        finally:
            if made:
                node.unlink()
            fcntl.ioctl(fd, LOOP_CTL_REMOVE, number)
    finally:
        os.close(fd)


def _partition(device: Path, n: int) -> Path:
    """The device node of partition ``n`` (made from sysfs when the
    container's /dev has no udev to make it)."""
    part = Path(f"{device}p{n}")
    dev = Path("/sys/block") / device.name / f"{device.name}p{n}" / "dev"
    for _ in range(100):
        if part.exists():
            return part
        if dev.exists():
            major, minor = (int(x) for x in dev.read_text().split(":"))
            os.mknod(part, 0o600 | stat.S_IFBLK, os.makedev(major, minor))
            return part
        time.sleep(0.05)
    pytest.fail(f"{part} did not appear")


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A 64 MiB loop device (partitions scanned) with a GPT of two
    partitions and ext4 in the first, 8 MiB of data written into it."""
    backing = tmp_path / "disk.img"
    with backing.open("wb") as fh:
        fh.truncate(SIZE)
    with private_loop() as device:
        done = sh("losetup", "--partscan", str(device), str(backing))
        assert done.returncode == 0, done.stderr
        made: list[Path] = []
        try:
            assert sh("sgdisk", "-n1:0:+24M", "-n2:0:0", str(device)).returncode == 0
            sh("partx", "-u", str(device))
            parts = [_partition(device, 1), _partition(device, 2)]
            made = [p for p in parts if p.stat().st_uid == 0 and p.parent == Path("/dev")]
            assert sh("mkfs.ext4", "-q", "-F", str(parts[0])).returncode == 0
            with open(parts[0], "r+b") as fh:           # data past the superblock
                fh.seek(4 * 1024 * 1024)
                fh.write(os.urandom(8 * 1024 * 1024))
                os.fsync(fh.fileno())
            yield device, backing
        finally:
            sh("losetup", "-d", str(device))
            for part in made:
                if part.exists() and not (Path("/sys/block") / device.name /
                                          part.name).exists():
                    part.unlink()


def _signatures(device: Path) -> str:
    listed = sh("wipefs", "--no-act", "--all", str(device))
    return listed.stdout


def _allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def test_a_gpt_disk_with_ext4_is_wiped_and_discarded(loop_disk: tuple[Path, Path]) -> None:
    device, backing = loop_disk
    assert "ext4" in sh("blkid", f"{device}p1").stdout
    assert "gpt" in sh("blkid", "-p", str(device)).stdout.lower()
    facts = read_disk_facts(device)
    assert facts.discard and facts.partitions == (f"{device}p1", f"{device}p2")
    before = _allocated(backing)
    line = wipe_disk(facts)
    assert line == (f"{device}: wiped: wipefs on 2 partition(s), wipefs on the disk, "
                    "sgdisk --zap-all, blkdiscard (the disk supports discard)")
    sh("losetup", "-d", str(device))     # what the file holds, with no device in between
    data = backing.read_bytes()
    assert data[:2 * 1024 * 1024].count(0) == 2 * 1024 * 1024       # no MBR, no GPT header
    assert b"EFI PART" not in data
    assert b"\x53\xef" not in data[1024 + 1080 - 1024: 1024 + 1082]  # no ext4 magic at 0x438
    assert sh("blkid", "-p", str(backing)).returncode != 0           # nothing found
    assert _allocated(backing) < before // 4, (before, _allocated(backing))  # punched out


def test_a_disk_without_discard_is_wiped_and_says_so(loop_disk: tuple[Path, Path]) -> None:
    device, backing = loop_disk
    queue = Path("/sys/block") / device.name / "queue" / "discard_max_bytes"
    queue.write_text("0")                # a real device that refuses BLKDISCARD
    assert sh("blkdiscard", "--force", str(device)).returncode != 0
    facts = read_disk_facts(device)
    assert not facts.discard
    line = wipe_disk(facts)
    assert line.endswith("no blkdiscard (the disk does not support discard: data blocks are "
                         "left, only signatures and partition tables are erased)")
    assert _signatures(device) == ""
    assert "Creating new GPT entries" in sh("sgdisk", "--print", str(device)).stdout
    sh("losetup", "-d", str(device))
    data = backing.read_bytes()
    assert b"EFI PART" not in data
    # the data blocks are still there: only discard or an overwrite removes them
    assert data[5 * 1024 * 1024:13 * 1024 * 1024].count(0) < 1024 * 1024
