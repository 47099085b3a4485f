"""System identity (DMI / SMBIOS) and firmware (BIOS or UEFI, Secure Boot).

``read_dmi`` / ``read_firmware`` touch sysfs; ``parse_dmi`` /
``parse_firmware`` are pure and turn the raw values into the schema's
``system`` and ``firmware`` sections plus the reasons for what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.inventory.sysfs import AttrError, read_attr, read_bytes

DMI_DIR = "sys/class/dmi/id"
EFI_DIR = "sys/firmware/efi"
EFI_GLOBAL_GUID = "8be4df61-93ca-11d2-aa0d-00e098032b8c"

#: schema field → DMI attribute file
DMI_FIELDS = {
    "vendor": "sys_vendor",
    "product": "product_name",
    "serial": "product_serial",
    "uuid": "product_uuid",
}

#: values firmware vendors leave in unset fields (compared case-blind, stripped)
PLACEHOLDERS = frozenset(x.lower() for x in (
    "", "Not Specified", "To be filled by O.E.M.", "To Be Filled By O.E.M.", "0", "None",
    "Default string", "System Serial Number", "System Product Name", "System manufacturer",
    "Not Applicable", "N/A", "NA", "0123456789", "Unknown", "Chassis Serial Number",
    "00000000", "xxxxxxxxxx",
))
PLACEHOLDER_UUIDS = frozenset({
    "00000000-0000-0000-0000-000000000000",
    "ffffffff-ffff-ffff-ffff-ffffffffffff",
    "03000200-0400-0500-0006-000700080009",   # common AMI default
})


@dataclass
class Section:
    """A parsed inventory section and the reasons for its missing fields."""

    data: dict[str, Any] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)


def is_placeholder(value: str) -> bool:
    return value.strip().lower() in PLACEHOLDERS


def read_dmi(root: Path) -> dict[str, str | AttrError]:
    """The raw DMI attributes (``sys_vendor`` ... as files name them)."""
    base = root / DMI_DIR
    if not base.is_dir():
        return {name: AttrError("no DMI in sysfs (VM without SMBIOS, container or non-x86)")
                for name in DMI_FIELDS.values()}
    return {name: read_attr(base / name) for name in DMI_FIELDS.values()}


def parse_dmi(raw: dict[str, str | AttrError]) -> Section:
    """``system``: vendor, product, serial, uuid; placeholders count as missing."""
    out = Section()
    for field_name, attr in DMI_FIELDS.items():
        value = raw.get(attr, AttrError("not read"))
        where = f"system.{field_name}"
        if isinstance(value, AttrError):
            out.unavailable[where] = value.reason
            continue
        value = " ".join(value.split())[:128]
        if field_name == "uuid":
            value = value.lower()
            if value in PLACEHOLDER_UUIDS or is_placeholder(value):
                out.unavailable[where] = f"placeholder value {value!r}"
                continue
        elif is_placeholder(value):
            out.unavailable[where] = f"placeholder value {value!r}"
            continue
        out.data[field_name] = value
    return out


def read_firmware(root: Path) -> dict[str, Any]:
    """Raw firmware facts: does sysfs show EFI, and the SecureBoot variable."""
    fw = root / "sys/firmware"
    efi = root / EFI_DIR
    raw: dict[str, Any] = {"sysfs_firmware": fw.is_dir(), "efi": efi.is_dir()}
    if raw["efi"]:
        var = read_bytes(efi / "efivars" / f"SecureBoot-{EFI_GLOBAL_GUID}", 64)
        if isinstance(var, AttrError):
            legacy = read_bytes(efi / "vars" / f"SecureBoot-{EFI_GLOBAL_GUID}" / "data", 64)
            if isinstance(legacy, bytes):
                var = b"\x00\x00\x00\x00" + legacy   # no attribute prefix in the old API
        raw["secure_boot_var"] = var
    return raw


def parse_firmware(raw: dict[str, Any]) -> Section:
    """``firmware``: mode ``uefi``/``bios`` and ``secure_boot`` (bool, or None
    when UEFI does not say).  Under BIOS there is no Secure Boot: False."""
    out = Section()
    if raw.get("efi"):
        out.data["mode"] = "uefi"
        var = raw.get("secure_boot_var")
        if isinstance(var, bytes) and len(var) >= 5:
            # efivarfs: 4 bytes of attributes, then the UINT8 value
            out.data["secure_boot"] = var[4] == 1
        else:
            out.data["secure_boot"] = None
            reason = var.reason if isinstance(var, AttrError) else "SecureBoot variable malformed"
            out.unavailable["firmware.secure_boot"] = reason
    elif raw.get("sysfs_firmware"):
        out.data["mode"] = "bios"
        out.data["secure_boot"] = False
    else:
        out.unavailable["firmware.mode"] = "no /sys/firmware (container?)"
        out.unavailable["firmware.secure_boot"] = "no /sys/firmware (container?)"
    return out
