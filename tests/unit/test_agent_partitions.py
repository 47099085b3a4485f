"""MBR/GPT/FAT decoders against captured heads (made by sfdisk and mkfs.vfat)."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import pytest

from agent.partitions import (
    MalformedTable,
    Partition,
    Table,
    decide_seed_partition,
    parse_fat_label,
    parse_gpt_entries,
    parse_gpt_header,
    parse_mbr,
    parse_table,
)

FIX = Path(__file__).resolve().parent.parent / "fixtures" / "agent"


def gpt_head() -> bytes:
    return (FIX / "gpt-head.bin").read_bytes()


def reader(data: bytes):
    return lambda offset, length: data[offset:offset + length]


def test_gpt_fixture_decodes() -> None:
    head = gpt_head()
    table = parse_table(head, reader(head))
    assert table.scheme == "gpt" and table.sector_size == 512
    assert table.partitions == [
        Partition(1, 2048, 4096, "c12a7328-f81f-11d2-ba4b-00a0c93ec93b", "EFI"),
        Partition(2, 6144, 8192, "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7", "cidata"),
    ]
    header = parse_gpt_header(head[512:1024])
    assert header.disk_guid == "52eebc80-db64-784f-a88c-fb88a48d2341"
    assert header.entries_count == 128 and header.entry_size == 128


def test_mbr_fixture_decodes() -> None:
    head = (FIX / "mbr-head.bin").read_bytes()
    table = parse_table(head, reader(head))
    assert table.scheme == "mbr"
    assert [(p.number, p.start_lba, p.sectors, p.type) for p in table.partitions] == [
        (1, 2048, 4096, "0x83"), (2, 6144, 70000, "0x0c")]


def test_fat_labels_fat16_and_fat32() -> None:
    assert parse_fat_label((FIX / "fat16-cidata-bootsector.bin").read_bytes()) == "CIDATA"
    assert parse_fat_label((FIX / "fat32-cidata-bootsector.bin").read_bytes()) == "CIDATA"
    assert parse_fat_label(b"\0" * 512) is None
    assert parse_fat_label((FIX / "mbr-head.bin").read_bytes()) is None   # an MBR, not FAT


def test_gpt_header_crc_is_checked() -> None:
    head = bytearray(gpt_head())
    head[512 + 40] ^= 1                       # first usable LBA, covered by the CRC
    with pytest.raises(MalformedTable, match="header CRC32"):
        parse_gpt_header(bytes(head[512:1024]))


def test_gpt_entries_crc_is_checked() -> None:
    head = bytearray(gpt_head())
    header = parse_gpt_header(bytes(head[512:1024]))
    head[1024 + 128 + 56] ^= 0x20              # a letter of "cidata"
    with pytest.raises(MalformedTable, match="entry array CRC32"):
        parse_gpt_entries(bytes(head[1024:]), header)


def _header_with(count: int, size: int) -> bytes:
    h = bytearray(gpt_head()[512:1024])
    struct.pack_into("<II", h, 80, count, size)
    struct.pack_into("<I", h, 16, 0)
    struct.pack_into("<I", h, 16, zlib.crc32(bytes(h[:92])) & 0xFFFFFFFF)
    return bytes(h)


@pytest.mark.parametrize(("count", "size"), [(0, 128), (5000, 128), (128, 64), (128, 130)])
def test_gpt_header_bounds(count: int, size: int) -> None:
    with pytest.raises(MalformedTable):
        parse_gpt_header(_header_with(count, size))


@pytest.mark.parametrize("data", [b"", b"\0" * 512, b"\0" * 510 + b"\x55\xaa"[::-1]])
def test_mbr_rejects_garbage(data: bytes) -> None:
    with pytest.raises(MalformedTable):
        parse_mbr(data)


def test_protective_mbr_without_gpt_is_refused() -> None:
    head = bytearray(gpt_head())
    head[512:520] = b"NOT PART"
    with pytest.raises(MalformedTable, match="no valid GPT"):
        parse_table(bytes(head), reader(bytes(head)))


def test_decide_seed_partition_prefers_gpt_name_then_fat_label() -> None:
    table = Table("gpt", 512, [Partition(1, 34, 10, "x", "root"), Partition(2, 44, 10, "x", ""),
                               Partition(3, 54, 10, "x", "CIDATA")])
    assert decide_seed_partition(table, {2: "cidata"}).number == 3
    table = Table("mbr", 512, [Partition(1, 34, 10, "0x83"), Partition(2, 44, 10, "0x0c")])
    assert decide_seed_partition(table, {2: "CIDATA"}).number == 2
    assert decide_seed_partition(table, {2: "OTHER"}) is None
