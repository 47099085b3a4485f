"""The seed partition added at the end of a disk (agent.seed_partition),
checked with real sfdisk --verify / sfdisk -J, blkid and mdir on files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from pathlib import Path

import pytest

from agent.partitions import find_seed_partition, parse_gpt_header
from agent.seed_partition import (
    SEED_BYTES,
    NoRoom,
    add_seed_partition,
    build_gpt_seed,
    build_mbr_seed,
)

MIB = 1024 * 1024
GUID = uuid.UUID("11111111-2222-4333-8444-555555555555")

needs_tools = pytest.mark.skipif(
    not all(shutil.which(t) for t in ("sfdisk", "blkid", "mformat", "mdir")),
    reason="needs fdisk, util-linux and mtools (scripts/setup.sh system)")

# like a distribution's cloud image: bios_grub, ESP, root as the last partition
GPT_LAYOUT = ("label: gpt\nsize=2048, type=21686148-6449-6E6F-744E-656564454649\n"
              "size=8192, type=U\ntype=L\n")
MBR_LAYOUT = "label: dos\nsize=8192, type=ef\ntype=83\n"


def make_disk(path: Path, layout: str, image_mib: int, disk_mib: int) -> None:
    with path.open("wb") as fh:
        fh.truncate(image_mib * MIB)
    subprocess.run(["sfdisk", "-q", str(path)], input=layout.encode(), check=True, timeout=30)
    with path.open("r+b") as fh:
        fh.truncate(disk_mib * MIB)          # the image written to a larger disk


def sfdisk_json(path: Path) -> dict:
    out = subprocess.run(["sfdisk", "-J", str(path)], check=True, capture_output=True,
                         timeout=30).stdout
    return json.loads(out)["partitiontable"]


def verify(path: Path) -> str:
    done = subprocess.run(["sfdisk", "--verify", str(path)], capture_output=True, timeout=30)
    return (done.stdout + done.stderr).decode()


@needs_tools
@pytest.mark.parametrize("layout", [GPT_LAYOUT, MBR_LAYOUT])
def test_seed_added_at_the_end(tmp_path: Path, layout: str) -> None:
    disk = tmp_path / "disk"
    make_disk(disk, layout, image_mib=40, disk_mib=300)
    before = sfdisk_json(disk)["partitions"]
    plan = add_seed_partition(disk, disk_bytes=300 * MIB, part_guid=GUID)
    assert "No errors detected" in verify(disk)
    table = sfdisk_json(disk)
    assert table["partitions"][:len(before)] == before        # the image's own: unchanged
    seed = table["partitions"][-1]
    assert len(table["partitions"]) == len(before) + 1
    assert seed["start"] * 512 == plan.start and seed["size"] * 512 == SEED_BYTES
    gap = 300 * MIB - (plan.start + SEED_BYTES)      # at the end, 1 MiB aligned
    assert 0 <= gap <= MIB and plan.start % MIB == 0
    if layout == GPT_LAYOUT:
        assert seed["name"] == "cidata" and seed["uuid"] == str(GUID).upper()
        assert seed["type"] == "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
        assert table["lastlba"] == (300 * MIB - 33 * 512) // 512 - 1
    else:
        assert seed["type"] == "c"
    probe = subprocess.run(["blkid", "-p", "-O", str(plan.start), "-s", "LABEL", "-o",
                            "value", str(disk)], capture_output=True, timeout=30)
    assert probe.stdout.decode().strip() == "CIDATA"
    mdir = subprocess.run(["mdir", "-i", f"{disk}@@{plan.start}", "::"], capture_output=True,
                          timeout=30, env=dict(os.environ, MTOOLS_SKIP_CHECK="1"))
    assert mdir.returncode == 0 and b"CIDATA" in mdir.stdout
    found = find_seed_partition(disk)
    assert found is not None and found[1] == plan.start


@needs_tools
def test_gpt_backup_header_moves_to_the_disk_end(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    make_disk(disk, GPT_LAYOUT, image_mib=40, disk_mib=100)
    with disk.open("rb") as fh:
        head = fh.read(2 * 512)
        header = parse_gpt_header(head[512:])
        fh.seek(header.entries_lba * 512)
        entries = fh.read(header.entries_bytes)
    plan = build_gpt_seed(head, entries, sector=512, disk_bytes=100 * MIB, part_guid=GUID)
    writes = dict(plan.writes)
    backup = parse_gpt_header(writes[100 * MIB - 512])          # CRC checked
    primary = parse_gpt_header(writes[512])
    assert backup.current_lba == primary.backup_lba == 100 * MIB // 512 - 1
    assert backup.entries_lba == backup.current_lba - 32
    assert writes[40 * MIB - 512] == bytes(512)                  # the image's old backup
    # pure: the same inputs give the same plan
    assert build_gpt_seed(head, entries, sector=512, disk_bytes=100 * MIB,
                          part_guid=GUID) == plan


@needs_tools
@pytest.mark.parametrize("layout", [GPT_LAYOUT, MBR_LAYOUT])
def test_no_room_when_the_image_fills_the_disk(tmp_path: Path, layout: str) -> None:
    disk = tmp_path / "disk"
    make_disk(disk, layout, image_mib=40, disk_mib=42)
    with pytest.raises(NoRoom, match=r"no room for the 4 MiB cidata seed partition.*"
                                     r"a disk of at least \d+ bytes"):
        add_seed_partition(disk, disk_bytes=42 * MIB)


@needs_tools
def test_no_free_mbr_slot(tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    layout = "label: dos\n" + "size=2048, type=83\n" * 4
    make_disk(disk, layout, image_mib=20, disk_mib=100)
    with disk.open("rb") as fh:
        sector0 = fh.read(512)
    with pytest.raises(NoRoom, match="four primary partition slots are used"):
        build_mbr_seed(sector0, disk_bytes=100 * MIB)
