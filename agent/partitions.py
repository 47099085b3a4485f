"""Partition tables (MBR, GPT) and FAT volume labels, decoded by hand.

Pure ``parse_*`` functions take bytes and return typed records or raise
:class:`MalformedTable` naming the reason; ``read_partitions`` is the only
function here that touches a file.  Used to find the cloud-init NoCloud
partition ("cidata") in an image written to a disk or a file.

Limits (bounded on purpose): at most 1024 GPT entries of 128-4096 bytes;
MBR primary partitions only (a seed partition in an extended/logical chain
is not looked for); logical sector sizes of 512 and 4096 bytes are probed.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

GPT_SIGNATURE = b"EFI PART"
MBR_PROTECTIVE = 0xEE
MBR_EXTENDED = frozenset({0x05, 0x0F, 0x85})
GPT_ENTRIES_MAX = 1024
SECTOR_SIZES = (512, 4096)


class MalformedTable(ValueError):
    """A partition table or boot sector that cannot be trusted; says why."""


@dataclass(frozen=True)
class Partition:
    number: int            # 1-based, as the kernel numbers them
    start_lba: int
    sectors: int
    type: str              # MBR: "0x0c"; GPT: type GUID
    name: str = ""         # GPT partition name (empty for MBR)

    def offset(self, sector_size: int) -> int:
        return self.start_lba * sector_size

    def size(self, sector_size: int) -> int:
        return self.sectors * sector_size


@dataclass(frozen=True)
class GptHeader:
    current_lba: int
    backup_lba: int
    first_usable: int
    last_usable: int
    disk_guid: str
    entries_lba: int
    entries_count: int
    entry_size: int
    entries_crc: int

    @property
    def entries_bytes(self) -> int:
        return self.entries_count * self.entry_size


def parse_mbr(sector: bytes) -> list[Partition]:
    """Primary partitions of an MBR (sector 0).  A protective MBR (GPT disk)
    yields one partition of type ``0xee``."""
    if len(sector) < 512:
        raise MalformedTable("MBR shorter than 512 bytes")
    if sector[510:512] != b"\x55\xaa":
        raise MalformedTable("no MBR boot signature 55aa")
    out = []
    for i in range(4):
        entry = sector[446 + 16 * i: 446 + 16 * (i + 1)]
        status, ptype = entry[0], entry[4]
        start, count = struct.unpack_from("<II", entry, 8)
        if ptype == 0 or count == 0:
            continue
        if status not in (0x00, 0x80):
            raise MalformedTable(f"MBR entry {i + 1} has status byte {status:#04x}")
        out.append(Partition(i + 1, start, count, f"{ptype:#04x}"))
    return out


def parse_gpt_header(block: bytes) -> GptHeader:
    """The GPT header at LBA 1 (``block`` is that logical sector)."""
    if len(block) < 92 or block[:8] != GPT_SIGNATURE:
        raise MalformedTable("no GPT signature 'EFI PART'")
    (size,) = struct.unpack_from("<I", block, 12)
    if not 92 <= size <= len(block):
        raise MalformedTable(f"GPT header size {size} out of range")
    (crc,) = struct.unpack_from("<I", block, 16)
    zeroed = block[:16] + b"\x00\x00\x00\x00" + block[20:size]
    if zlib.crc32(zeroed) & 0xFFFFFFFF != crc:
        raise MalformedTable("GPT header CRC32 mismatch")
    current, backup, first, last = struct.unpack_from("<QQQQ", block, 24)
    guid = str(uuid.UUID(bytes_le=bytes(block[56:72])))
    entries_lba, count, entry_size, entries_crc = struct.unpack_from("<QIII", block, 72)
    if not 0 < count <= GPT_ENTRIES_MAX:
        raise MalformedTable(f"GPT entry count {count} out of range 1..{GPT_ENTRIES_MAX}")
    if entry_size < 128 or entry_size > 4096 or entry_size % 8:
        raise MalformedTable(f"GPT entry size {entry_size} out of range")
    if entries_lba < 2:
        raise MalformedTable(f"GPT entries at LBA {entries_lba} overlap the header")
    return GptHeader(current, backup, first, last, guid, entries_lba, count, entry_size,
                     entries_crc)


def parse_gpt_entries(data: bytes, header: GptHeader) -> list[Partition]:
    """The used entries of a GPT partition array (checked against its CRC32)."""
    if len(data) < header.entries_bytes:
        raise MalformedTable("GPT entry array truncated")
    data = data[:header.entries_bytes]
    if zlib.crc32(data) & 0xFFFFFFFF != header.entries_crc:
        raise MalformedTable("GPT entry array CRC32 mismatch")
    out = []
    for i in range(header.entries_count):
        entry = data[i * header.entry_size:(i + 1) * header.entry_size]
        type_guid = bytes(entry[:16])
        if type_guid == b"\x00" * 16:
            continue
        first, last = struct.unpack_from("<QQ", entry, 32)
        if last < first:
            raise MalformedTable(f"GPT entry {i + 1} ends before it starts")
        name = bytes(entry[56:128]).decode("utf-16-le", errors="replace").split("\x00", 1)[0]
        out.append(Partition(i + 1, first, last - first + 1,
                             str(uuid.UUID(bytes_le=type_guid)), name))
    return out


def parse_fat_label(boot_sector: bytes) -> str | None:
    """The volume label in a FAT12/16/32 boot sector, or None if the sector is
    not FAT or carries no label.  (mkfs.vfat -n writes it here and in the
    root directory; this reads the boot sector.)"""
    if len(boot_sector) < 512 or boot_sector[510:512] != b"\x55\xaa":
        return None
    (bytes_per_sector,) = struct.unpack_from("<H", boot_sector, 11)
    if bytes_per_sector not in (512, 1024, 2048, 4096):
        return None
    (sectors_per_fat16,) = struct.unpack_from("<H", boot_sector, 22)
    if sectors_per_fat16 == 0:          # FAT32: extended BPB at 64
        sig_at, label_at, type_at = 66, 71, 82
    else:
        sig_at, label_at, type_at = 38, 43, 54
    if boot_sector[sig_at] not in (0x28, 0x29):
        return None
    if not boot_sector[type_at:type_at + 3] == b"FAT":
        return None
    if boot_sector[sig_at] == 0x28:
        return None                      # old extended BPB: no label field
    label = boot_sector[label_at:label_at + 11].decode("ascii", errors="replace").rstrip(" \x00")
    return None if not label or label == "NO NAME" else label


@dataclass(frozen=True)
class Table:
    scheme: str                 # "gpt" or "mbr"
    sector_size: int
    partitions: list[Partition]


def parse_table(head: bytes, read_at: Callable[[int, int], bytes]) -> Table:
    """The partition table of an image whose first bytes are ``head``;
    ``read_at(offset, length)`` fetches more (the GPT entry array)."""
    mbr = parse_mbr(head[:512])
    if any(p.type == f"{MBR_PROTECTIVE:#04x}" for p in mbr):
        errors = []
        for sector in SECTOR_SIZES:
            try:
                header = parse_gpt_header(head[sector:sector * 2] if len(head) >= sector * 2
                                          else read_at(sector, sector))
            except MalformedTable as exc:
                errors.append(f"{sector}-byte sectors: {exc}")
                continue
            entries = read_at(header.entries_lba * sector, header.entries_bytes)
            return Table("gpt", sector, parse_gpt_entries(entries, header))
        raise MalformedTable("protective MBR but no valid GPT (" + "; ".join(errors) + ")")
    return Table("mbr", 512, mbr)


class ReadAt:
    """Reads ``length`` bytes at ``offset`` of a file (bounded)."""

    LIMIT = 4 * 1024 * 1024

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, offset: int, length: int) -> bytes:
        if length > self.LIMIT:
            raise MalformedTable(f"refusing to read {length} bytes of table")
        with self.path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)


def read_partitions(path: Path) -> Table:
    reader = ReadAt(path)
    return parse_table(reader(0, 8192), reader)


SEED_LABELS = frozenset({"cidata", "CIDATA"})


def decide_seed_partition(table: Table, fat_labels: dict[int, str | None]) -> Partition | None:
    """The NoCloud seed partition: GPT name ``cidata`` (any case) first, else
    a FAT label ``cidata``/``CIDATA`` (cloud-init matches these two)."""
    for part in table.partitions:
        if part.name.lower() == "cidata":
            return part
    for part in table.partitions:
        if fat_labels.get(part.number) in SEED_LABELS:
            return part
    return None


def find_seed_partition(path: Path) -> tuple[Partition, int] | None:
    """(partition, byte offset) of the seed partition of the image at ``path``."""
    table = read_partitions(path)
    reader = ReadAt(path)
    labels = {p.number: parse_fat_label(reader(p.offset(table.sector_size), 512))
              for p in table.partitions if p.type != f"{MBR_PROTECTIVE:#04x}"}
    part = decide_seed_partition(table, labels)
    if part is None:
        return None
    return part, part.offset(table.sector_size)
