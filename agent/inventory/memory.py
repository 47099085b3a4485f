"""Memory: total from ``/proc/meminfo`` and DIMMs from the SMBIOS type 17
(Memory Device) tables the kernel exposes in ``/sys/firmware/dmi/entries``.

The SMBIOS decoder is pure (``parse_smbios_memory_device``) and follows the
SMBIOS 3.x layout: a formatted area whose first byte is the type and second
its length, then NUL-terminated strings ended by a double NUL.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

from agent.inventory.sysfs import AttrError, list_dir, read_bytes
from agent.inventory.system import Section, is_placeholder

MEMORY_TYPES = {
    0x12: "DDR", 0x13: "DDR2", 0x18: "DDR3", 0x1A: "DDR4", 0x1B: "LPDDR",
    0x1C: "LPDDR2", 0x1D: "LPDDR3", 0x1E: "LPDDR4", 0x20: "HBM", 0x21: "HBM2",
    0x22: "DDR5", 0x23: "LPDDR5", 0x07: "RAM", 0x02: "Unknown", 0x01: "Other",
}
DIMMS_MAX = 512


class MalformedSMBIOS(ValueError):
    pass


def read_meminfo(root: Path) -> str | None:
    try:
        with (root / "proc/meminfo").open("rb") as fh:
            return fh.read(64 * 1024).decode("ascii", errors="replace")
    except OSError:
        return None


def read_smbios_memory_devices(root: Path) -> list[bytes] | AttrError:
    base = root / "sys/firmware/dmi/entries"
    if not base.is_dir():
        return AttrError("no SMBIOS tables in sysfs (VM without SMBIOS or container)")
    out: list[bytes] = []
    for name in list_dir(base):
        if not re.fullmatch(r"17-\d+", name):
            continue
        raw = read_bytes(base / name / "raw", 4096)
        if isinstance(raw, AttrError):
            return raw
        out.append(raw)
        if len(out) >= DIMMS_MAX:
            break
    return out


def build_meminfo(total_bytes: int | None) -> str | None:
    """The ``MemTotal`` line :func:`parse_meminfo_total` reads, from a total
    in bytes (psutil's, when /proc/meminfo is unreadable); None for none."""
    return f"MemTotal: {total_bytes // 1024} kB\n" if total_bytes else None


def parse_meminfo_total(text: str) -> int | None:
    m = re.search(r"^MemTotal:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _strings(raw: bytes, length: int) -> list[str]:
    tail = raw[length:]
    end = tail.find(b"\x00\x00")
    if end < 0:
        raise MalformedSMBIOS("string set not terminated by a double NUL")
    if end == 0:
        return []
    return [s.decode("ascii", errors="replace").strip() for s in tail[:end].split(b"\x00")]


def parse_smbios_memory_device(raw: bytes) -> dict[str, Any] | None:
    """One SMBIOS type 17 structure → a DIMM dict, or None for an empty slot.

    Fields: slot (device locator), size_bytes, type, speed_mts, manufacturer,
    serial, part_number (absent when the firmware leaves a placeholder).
    Raises :class:`MalformedSMBIOS` for a structure that is not type 17 or
    is truncated.
    """
    if len(raw) < 0x15 or raw[0] != 17:
        raise MalformedSMBIOS("not an SMBIOS type 17 structure")
    length = raw[1]
    if length < 0x15 or length > len(raw):
        raise MalformedSMBIOS("formatted area length out of range")
    strings = _strings(raw, length)

    def string(offset: int) -> str:
        if offset >= length:
            return ""
        index = raw[offset]
        if index == 0 or index > len(strings):
            return ""
        return strings[index - 1]

    (size,) = struct.unpack_from("<H", raw, 0x0C)
    if size == 0:
        return None
    dimm: dict[str, Any] = {}
    if size == 0x7FFF and length >= 0x20:
        (ext,) = struct.unpack_from("<I", raw, 0x1C)
        dimm["size_bytes"] = (ext & 0x7FFFFFFF) * 1024 * 1024
    elif size != 0xFFFF:
        unit = 1024 if size & 0x8000 else 1024 * 1024
        dimm["size_bytes"] = (size & 0x7FFF) * unit
    slot = string(0x10)
    if slot:
        dimm["slot"] = slot
    mem_type = raw[0x12]
    if mem_type in MEMORY_TYPES and mem_type not in (0x01, 0x02):
        dimm["type"] = MEMORY_TYPES[mem_type]
    if length >= 0x17:
        (speed,) = struct.unpack_from("<H", raw, 0x15)
        if speed not in (0, 0xFFFF):
            dimm["speed_mts"] = speed
    for name, offset in (("manufacturer", 0x17), ("serial", 0x18), ("part_number", 0x1A)):
        value = string(offset)
        if value and not is_placeholder(value):
            dimm[name] = value[:64]
    return dimm


def parse_memory(meminfo: str | None, devices: list[bytes] | AttrError) -> Section:
    """``memory``: total_bytes and dimms (installed modules only)."""
    out = Section()
    total = parse_meminfo_total(meminfo) if meminfo else None
    if total is not None:
        out.data["total_bytes"] = total
    else:
        out.unavailable["memory.total_bytes"] = "/proc/meminfo unreadable"
    if isinstance(devices, AttrError):
        out.unavailable["memory.dimms"] = devices.reason
        return out
    if not devices:
        out.unavailable["memory.dimms"] = "no SMBIOS memory device entries"
        return out
    dimms = []
    for raw in devices:
        try:
            dimm = parse_smbios_memory_device(raw)
        except MalformedSMBIOS as exc:
            out.unavailable["memory.dimms"] = f"malformed SMBIOS entry: {exc}"
            continue
        if dimm is not None:
            dimms.append(dimm)
    out.data["dimms"] = dimms
    return out
