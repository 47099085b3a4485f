"""A NoCloud seed partition added at the end of a disk whose image has none.

Stock cloud images carry no ``cidata`` partition.  The agent adds one of
:data:`SEED_BYTES` at the very end of the target disk, so that cloud-init's
growpart can still grow the image's last partition into the free space
between them, labelled ``cidata`` (GPT name, FAT label ``CIDATA``: what
cloud-init's NoCloud looks for).  The image's own partitions are never
changed.

* GPT: the backup header and entry array move to the disk's last sectors,
  the primary header's alternate LBA and last usable LBA follow, the seed
  entry (Microsoft basic data) takes the first free slot, every CRC is
  recomputed, the protective MBR is stretched to the disk, and the stale
  backup header at the image's old end is zeroed.
* MBR: a primary partition of type 0x0c in a free slot (below 2 TiB, the
  most an MBR can address).

:func:`build_gpt_seed` and :func:`build_mbr_seed` are pure: bytes in, a
:class:`SeedPlan` (the partition and the sectors to write) out, or
:class:`NoRoom` / :class:`MalformedTable` saying why.  :func:`add_seed_partition`
reads the target, writes the plan and formats the FAT with ``mformat``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.partitions import (
    MBR_PROTECTIVE,
    SECTOR_SIZES,
    MalformedTable,
    Partition,
    parse_gpt_entries,
    parse_gpt_header,
    parse_mbr,
)

SEED_BYTES = 4 * 1024 * 1024
ALIGN_BYTES = 1024 * 1024
BASIC_DATA = uuid.UUID("ebd0a0a2-b9e5-4433-87c0-68b6b72699c7")
SEED_NAME = "cidata"
FAT_LABEL = "CIDATA"
MBR_FAT32_LBA = 0x0C
MBR_MAX_SECTORS = 1 << 32
CHS_LBA = b"\xfe\xff\xff"          # "use the LBA fields" (cylinder 1023, head 254, sector 63)
MFORMAT_TIMEOUT = 60.0
ENTRIES_MAX_BYTES = 4 * 1024 * 1024


class NoRoom(ValueError):
    """The seed partition does not fit; says what would."""


@dataclass(frozen=True)
class SeedPlan:
    scheme: str                       # "gpt" or "mbr"
    start: int                        # byte offset of the seed partition
    size: int                         # its bytes
    writes: tuple[tuple[int, bytes], ...]   # (byte offset, bytes) to write, in order


def _align_down(value: int, align: int) -> int:
    return value // align * align


def _no_room(last_end: int, usable_end: int, needed: int, what: str) -> NoRoom:
    return NoRoom(f"no room for the {SEED_BYTES >> 20} MiB cidata seed partition: the image's "
                  f"last partition ends at byte {last_end} and {what} ends at byte "
                  f"{usable_end}; use a disk of at least {needed} bytes, or an image with "
                  f"a cidata partition")


# --- GPT ---------------------------------------------------------------------------


def _header_bytes(raw: bytes, *, current: int, backup: int, last_usable: int,
                  entries_lba: int, entries_crc: int, sector: int) -> bytes:
    """``raw`` (a valid GPT header) with new positions and both CRCs."""
    (size,) = struct.unpack_from("<I", raw, 12)
    block = bytearray(raw[:size])
    struct.pack_into("<QQ", block, 24, current, backup)
    struct.pack_into("<Q", block, 48, last_usable)
    struct.pack_into("<Q", block, 72, entries_lba)
    struct.pack_into("<I", block, 88, entries_crc)
    block[16:20] = b"\x00\x00\x00\x00"
    struct.pack_into("<I", block, 16, zlib.crc32(block) & 0xFFFFFFFF)
    return bytes(block) + bytes(sector - size)


def build_gpt_entry(*, first: int, last: int, part_guid: uuid.UUID, entry_size: int) -> bytes:
    """One GPT entry: basic data, ``cidata``, LBAs ``first``..``last``."""
    name = SEED_NAME.encode("utf-16-le")
    entry = (BASIC_DATA.bytes_le + part_guid.bytes_le + struct.pack("<QQQ", first, last, 0)
             + name + bytes(72 - len(name)))
    return entry + bytes(entry_size - len(entry))


def _protective_mbr(sector0: bytes, disk_sectors: int) -> bytes | None:
    """The protective MBR stretched over the disk, or None when it is not
    the plain single-entry kind (a hybrid MBR is left alone)."""
    mbr = bytearray(sector0[:512])
    types = [mbr[446 + 16 * i + 4] for i in range(4)]
    if types[0] != MBR_PROTECTIVE or any(types[1:]):
        return None
    if struct.unpack_from("<I", mbr, 446 + 8)[0] != 1:
        return None
    mbr[446 + 5:446 + 8] = CHS_LBA
    struct.pack_into("<I", mbr, 446 + 12, min(disk_sectors - 1, MBR_MAX_SECTORS - 1))
    return bytes(mbr)


def build_gpt_seed(head: bytes, entries: bytes, *, sector: int, disk_bytes: int,
                   part_guid: uuid.UUID) -> SeedPlan:
    """The plan that adds the seed partition to the GPT disk of
    ``disk_bytes`` whose first two sectors are ``head`` and whose primary
    entry array is ``entries``."""
    header = parse_gpt_header(head[sector:2 * sector])
    if header.current_lba != 1:
        raise MalformedTable(f"GPT header says it is at LBA {header.current_lba}, not 1")
    parts = parse_gpt_entries(entries, header)
    table = bytearray(entries[:header.entries_bytes])
    disk_sectors = disk_bytes // sector
    array_sectors = -(-header.entries_bytes // sector)
    backup_lba = disk_sectors - 1
    backup_entries = backup_lba - array_sectors
    last_usable = backup_entries - 1
    seed_sectors = SEED_BYTES // sector
    align = ALIGN_BYTES // sector
    start = _align_down(last_usable + 1 - seed_sectors, align)
    last_end = max((p.start_lba + p.sectors for p in parts),
                   default=header.entries_lba + array_sectors)
    last_end = max(last_end, header.first_usable)
    if start < last_end or start <= header.entries_lba + array_sectors:
        needed = ((-(-last_end // align)) * align + seed_sectors + array_sectors + 1) * sector
        raise _no_room(last_end * sector, (last_usable + 1) * sector, needed,
                       "the disk's usable space")
    used = {p.number for p in parts}
    free = next((i for i in range(header.entries_count) if i + 1 not in used), None)
    if free is None:
        raise NoRoom(f"no room for the cidata seed partition: all {header.entries_count} "
                     f"GPT entries are used")
    at = free * header.entry_size
    table[at:at + header.entry_size] = build_gpt_entry(
        first=start, last=start + seed_sectors - 1, part_guid=part_guid,
        entry_size=header.entry_size)
    crc = zlib.crc32(table) & 0xFFFFFFFF
    raw = head[sector:2 * sector]
    primary = _header_bytes(raw, current=1, backup=backup_lba, last_usable=last_usable,
                            entries_lba=header.entries_lba, entries_crc=crc, sector=sector)
    backup = _header_bytes(raw, current=backup_lba, backup=1, last_usable=last_usable,
                           entries_lba=backup_entries, entries_crc=crc, sector=sector)
    writes: list[tuple[int, bytes]] = []
    old_backup = header.backup_lba
    if old_backup != backup_lba and last_end <= old_backup < disk_sectors:
        writes.append((old_backup * sector, bytes(sector)))     # the image's stale backup
    mbr = _protective_mbr(head, disk_sectors)
    if mbr is not None:
        writes.append((0, mbr))
    padded = bytes(table) + bytes(array_sectors * sector - len(table))
    writes += [(header.entries_lba * sector, padded), (backup_entries * sector, padded),
               (backup_lba * sector, backup), (sector, primary)]
    return SeedPlan("gpt", start * sector, SEED_BYTES, tuple(writes))


# --- MBR ---------------------------------------------------------------------------


def build_mbr_seed(sector0: bytes, *, disk_bytes: int) -> SeedPlan:
    """The plan that adds the seed as a primary partition (type 0x0c) in a
    free slot of the MBR ``sector0``, at the end of the disk (or of the
    first 2 TiB)."""
    parts: list[Partition] = parse_mbr(sector0)
    mbr = bytearray(sector0[:512])
    free = next((i for i in range(4) if mbr[446 + 16 * i + 4] == 0), None)
    if free is None:
        raise NoRoom("no room for the cidata seed partition: the MBR's four primary "
                     "partition slots are used")
    limit = min(disk_bytes // 512, MBR_MAX_SECTORS)
    seed_sectors = SEED_BYTES // 512
    start = _align_down(limit - seed_sectors, ALIGN_BYTES // 512)
    last_end = max((p.start_lba + p.sectors for p in parts), default=1)
    if start < last_end or start < 1:
        needed = (-(-last_end // 2048) * 2048 + seed_sectors) * 512
        raise _no_room(last_end * 512, limit * 512, needed, "the disk")
    entry = (b"\x00" + CHS_LBA + bytes([MBR_FAT32_LBA]) + CHS_LBA
             + struct.pack("<II", start, seed_sectors))
    mbr[446 + 16 * free:446 + 16 * (free + 1)] = entry
    return SeedPlan("mbr", start * 512, SEED_BYTES, ((0, bytes(mbr)),))


def decide_seed_plan(head: bytes, read_at: Callable[[int, int], bytes], *, disk_bytes: int,
                     part_guid: uuid.UUID) -> SeedPlan:
    """The plan for the image whose first bytes are ``head`` (at least 8 KiB):
    GPT when the MBR is protective, else MBR."""
    parts = parse_mbr(head[:512])
    if not any(p.type == f"{MBR_PROTECTIVE:#04x}" for p in parts):
        return build_mbr_seed(head[:512], disk_bytes=disk_bytes)
    errors = []
    for sector in SECTOR_SIZES:
        try:
            header = parse_gpt_header(head[sector:2 * sector] if len(head) >= 2 * sector
                                      else read_at(sector, sector))
        except MalformedTable as exc:
            errors.append(f"{sector}-byte sectors: {exc}")
            continue
        if header.entries_bytes > ENTRIES_MAX_BYTES:
            raise MalformedTable("GPT entry array too large")
        entries = read_at(header.entries_lba * sector, header.entries_bytes)
        both = head[:2 * sector] if len(head) >= 2 * sector else \
            head[:sector] + read_at(sector, sector)
        return build_gpt_seed(both, entries, sector=sector, disk_bytes=disk_bytes,
                              part_guid=part_guid)
    raise MalformedTable("protective MBR but no valid GPT (" + "; ".join(errors) + ")")


# --- on the target -----------------------------------------------------------------


def mformat_command(image: Path, plan: SeedPlan, serial: str) -> list[str]:
    """``mformat`` of the seed's FAT into ``image``, a file holding just the
    partition (no mount), as the lab image's build formats its own (64
    heads, 32 sectors; the partition's start as hidden sectors)."""
    return ["mformat", "-i", str(image), "-T", str(plan.size // 512),
            "-h", "64", "-s", "32", "-H", str(plan.start // 512), "-v", FAT_LABEL,
            "-N", serial, "::"]


def write_plan(fd: int, plan: SeedPlan) -> None:
    """Write the plan's sectors (the primary header last) and flush."""
    for offset, data in plan.writes:
        _pwrite_all(fd, data, offset)
    os.fsync(fd)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def add_seed_partition(target: Path, *, disk_bytes: int,
                       part_guid: uuid.UUID | None = None,
                       fill: Callable[[Path], None] | None = None) -> SeedPlan:
    """Add the seed partition to the disk (or disk file) ``target`` of
    ``disk_bytes``, formatted FAT (label CIDATA) and filled by ``fill``.
    Raises :class:`NoRoom`, :class:`MalformedTable`, ``OSError`` or
    ``RuntimeError`` (mformat failed).

    The file system is made in a temporary file of the partition's size
    (``mformat``, then ``fill(path)`` copies the seed files in) and written
    to the partition in one piece: mtools refuses an ``@@offset`` past what
    it takes for the size of a block device (``st_size`` is 0: "Offset
    bigger than base image"), and the seed partition sits at the disk's end."""
    part_guid = part_guid or uuid.uuid4()
    fd = os.open(target, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        def read_at(offset: int, length: int) -> bytes:
            return os.pread(fd, length, offset)

        plan = decide_seed_plan(read_at(0, 8192), read_at, disk_bytes=disk_bytes,
                                part_guid=part_guid)
        with tempfile.TemporaryDirectory(prefix="lpmos-cidata-") as tmp:
            fat = Path(tmp) / "cidata.img"
            with fat.open("wb") as fh:
                fh.truncate(plan.size)
            format_fat(fat, plan, part_guid.hex[:8])
            if fill is not None:
                fill(fat)
            write_plan(fd, plan)
            _write_file_at(fd, fat, plan.start)
        os.fsync(fd)
    finally:
        os.close(fd)
    return plan


def format_fat(image: Path, plan: SeedPlan, serial: str) -> None:
    """``mformat`` the seed's FAT into ``image`` (a file of the partition's
    size), with the partition's start as its hidden sectors."""
    mformat = shutil.which("mformat")
    if mformat is None:
        raise RuntimeError("mformat not found: install the mtools package in the live image")
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1")
    cmd = [mformat, *mformat_command(image, plan, serial)[1:]]
    try:
        done = subprocess.run(cmd, capture_output=True, timeout=MFORMAT_TIMEOUT, env=env,
                              check=False)
    except subprocess.TimeoutExpired:
        raise RuntimeError("mformat of the seed partition timed out") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()[:300]
        raise RuntimeError(f"mformat of the seed partition failed: {err}")


def _write_file_at(fd: int, path: Path, offset: int) -> None:
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            _pwrite_all(fd, chunk, offset)
            offset += len(chunk)
