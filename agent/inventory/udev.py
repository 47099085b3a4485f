"""udev properties of devices: live through pyudev, or from a captured
``udevadm info --export-db`` (tests and post-mortems), in the same shape:
``{sys_name: {PROPERTY: value, ...}}`` with symlinks in ``DEVLINKS``."""

from __future__ import annotations

from typing import Any

EXPORT_MAX = 16 * 1024 * 1024
DEVICES_MAX = 4096


class UdevUnavailable(RuntimeError):
    """pyudev or libudev is missing, or udev's database cannot be read."""


def read_udev_properties(subsystem: str) -> dict[str, dict[str, str]]:
    """Properties of every device of ``subsystem`` through pyudev.

    Raises :class:`UdevUnavailable` (with the reason) when pyudev or
    libudev cannot be loaded.  In a container or a VM without udevd the
    database is empty: properties then hold only what the kernel's uevent
    says (no ID_SERIAL, no ID_PATH), which callers treat as "not reported".
    """
    try:
        import pyudev
    except ImportError as exc:   # pragma: no cover - depends on the install
        raise UdevUnavailable(f"pyudev not installed: {exc}") from None
    try:
        context: Any = pyudev.Context()
        out: dict[str, dict[str, str]] = {}
        for device in context.list_devices(subsystem=subsystem):
            props = {str(k): str(v) for k, v in device.properties.items()}
            links = " ".join(str(x) for x in device.device_links)
            if links:
                props["DEVLINKS"] = links
            out[str(device.sys_name)] = props
            if len(out) >= DEVICES_MAX:
                break
        return out
    except Exception as exc:   # libudev missing, /sys unreadable ...
        raise UdevUnavailable(f"udev unreadable: {exc}") from None


def parse_udev_export(text: str) -> dict[str, dict[str, str]]:
    """Parse ``udevadm info --export-db`` output (records separated by blank
    lines; ``P:`` devpath, ``N:`` node name, ``S:`` symlink, ``E:`` property).

    Keyed by the last component of the devpath, as pyudev's ``sys_name``.
    """
    out: dict[str, dict[str, str]] = {}
    record: dict[str, str] = {}
    links: list[str] = []

    def flush() -> None:
        devpath = record.get("DEVPATH", "")
        if devpath and len(out) < DEVICES_MAX:
            if links:
                record["DEVLINKS"] = " ".join(links)
            out[devpath.rsplit("/", 1)[-1]] = dict(record)

    for line in text[:EXPORT_MAX].splitlines():
        if not line.strip():
            flush()
            record, links = {}, []
            continue
        tag, sep, value = line.partition(": ")
        if not sep:
            continue
        if tag == "P":
            record["DEVPATH"] = value
        elif tag == "N":
            record.setdefault("DEVNAME", "/dev/" + value)
        elif tag == "S":
            links.append("/dev/" + value)
        elif tag == "E":
            key, eq, val = value.partition("=")
            if eq:
                record[key] = val
    flush()
    return out
