"""Disks: whole block devices with model, serial, WWN, size, rotational,
removable and by-path, from sysfs plus udev properties.

Left out (by kernel name): loop, ram, zram, device-mapper, md, nbd, optical
(sr) and floppy devices, partitions, and devices without a medium (size 0).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.inventory.sysfs import link_target, list_dir, read_attrs
from agent.inventory.system import is_placeholder

EXCLUDED_PREFIXES = ("loop", "ram", "zram", "dm-", "md", "nbd", "sr", "fd")
DISK_ATTRS = ("size", "removable", "queue/rotational", "device/model", "device/vendor",
              "device/serial", "device/wwid", "wwid", "serial", "partition")
SECTOR = 512   # /sys/block/*/size counts 512-byte sectors whatever the device's own


def is_excluded(name: str) -> bool:
    return name.startswith(EXCLUDED_PREFIXES)


def read_block_devices(root: Path) -> list[dict[str, Any]]:
    """Raw sysfs facts of each entry of ``/sys/block``."""
    base = root / "sys/block"
    out = []
    for name in list_dir(base):
        out.append({
            "name": name,
            "devpath": link_target(root, base / name) or "",
            "attrs": read_attrs(base / name, DISK_ATTRS),
        })
    return out


def read_by_path_links(root: Path) -> dict[str, str]:
    """``/dev/disk/by-path`` symlinks: kernel name → link (whole disks only)."""
    base = root / "dev/disk/by-path"
    out: dict[str, str] = {}
    for link in list_dir(base):
        if "-part" in link:
            continue
        try:
            target = (base / link).readlink()
        except OSError:
            continue
        out.setdefault(target.name, f"/dev/disk/by-path/{link}")
    return out


def _wwn(attrs: dict[str, str], udev: dict[str, str]) -> str | None:
    for key in ("ID_WWN_WITH_EXTENSION", "ID_WWN"):
        if udev.get(key):
            return udev[key].lower()
    for key in ("wwid", "device/wwid"):
        raw = attrs.get(key, "").strip().lower()
        if not raw:
            continue
        if raw.startswith("naa."):
            return "0x" + raw[4:]
        if raw.startswith(("eui.", "0x")):
            return raw
        # t10 / nvme vendor strings identify, but are not WWNs
    return None


def _clean(value: str | None) -> str | None:
    if value is None:
        return None
    value = " ".join(value.replace("\x00", " ").split())[:128]
    return None if not value or is_placeholder(value) else value


def parse_disks(raw: list[dict[str, Any]], udev: dict[str, dict[str, str]],
                by_path_links: dict[str, str] | None = None) -> tuple[list[dict[str, Any]],
                                                                      dict[str, str]]:
    """The schema's ``disks`` list (sorted by name) and the reasons for missing fields.

    ``removable`` is true when the kernel says so *or* the disk hangs off USB
    (USB sticks and enclosures often report removable=0, and they are never
    a safe default install target).
    """
    disks: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    by_path_links = by_path_links or {}
    for entry in sorted(raw, key=lambda e: str(e.get("name", ""))):
        name = str(entry.get("name", ""))
        attrs: dict[str, str] = entry.get("attrs") or {}
        if not name or is_excluded(name) or "partition" in attrs:
            continue
        props = udev.get(name, {})
        try:
            size = int(attrs.get("size", "0")) * SECTOR
        except ValueError:
            size = 0
        if size <= 0:
            continue
        disk: dict[str, Any] = {"name": name, "size_bytes": size}
        model = _clean(attrs.get("device/model")) or _clean(
            props.get("ID_MODEL_FROM_DATABASE") or (props.get("ID_MODEL") or "").replace("_", " "))
        serial = _clean(props.get("ID_SERIAL_SHORT")) or _clean(attrs.get("device/serial")) \
            or _clean(attrs.get("serial"))
        wwn = _wwn(attrs, props)
        devpath = str(entry.get("devpath", ""))
        usb = props.get("ID_BUS") == "usb" or "/usb" in devpath
        by_path = None
        if props.get("ID_PATH"):
            by_path = "/dev/disk/by-path/" + props["ID_PATH"]
        elif name in by_path_links:
            by_path = by_path_links[name]
        for key, value in (("model", model), ("serial", serial), ("wwn", wwn),
                           ("by_path", by_path)):
            if value:
                disk[key] = value
            else:
                unavailable[f"disks.{name}.{key}"] = (
                    "no udev by-path (udevd not running?)" if key == "by_path"
                    else "not reported by the device")
        rot = attrs.get("queue/rotational")
        if rot in ("0", "1"):
            disk["rotational"] = rot == "1"
        else:
            unavailable[f"disks.{name}.rotational"] = "queue/rotational unreadable"
        disk["removable"] = attrs.get("removable") == "1" or usb
        disks.append(disk)
    return disks, unavailable


PCI_RE = re.compile(r"[0-9a-f]{4}:[0-9a-f]{2}:[0-9a-f]{2}\.[0-7]")


def pci_address(devpath: str) -> str | None:
    """The PCI function a sysfs device path hangs off (the deepest one)."""
    found = [part for part in devpath.split("/") if PCI_RE.fullmatch(part)]
    return found[-1] if found else None
