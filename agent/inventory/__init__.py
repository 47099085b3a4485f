"""Hardware inventory, schema v1 (documented in ``docs/inventory.md``).

``collect_inventory()`` reads (``read_*``: sysfs, procfs, udev through
pyudev, ipmitool) and parses (``parse_*``: pure, tested on captured
fixtures) each section.  It never raises: a field that cannot be read is
left out and ``unavailable[field]`` says why, so the same code runs on bare
metal, in a VM and in a container.  A section whose reader or parser fails
unexpectedly is reported as unavailable with the error, not a crash.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.inventory import bmc, cpu, disks, memory, nics, system
from agent.inventory.sysfs import AttrError
from agent.inventory.udev import UdevUnavailable, read_udev_properties

SCHEMA = 1


def _section(name: str, unavailable: dict[str, str], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:   # a reader or parser bug must not stop the inventory
        unavailable[name] = f"error: {type(exc).__name__}: {exc}"[:300]
        return None


def collect_inventory(root: Path = Path("/"), *, boot_mac: str | None = None,
                      udev: dict[str, dict[str, dict[str, str]]] | None = None,
                      use_ipmitool: bool = True, now: float | None = None) -> dict[str, Any]:
    """This host's inventory as a JSON-safe dict (schema v1).

    ``root`` is the file system root (a captured tree in tests); ``udev``
    gives udev properties per subsystem instead of asking pyudev (tests);
    ``boot_mac`` marks the NIC the machine booted from.
    """
    unavailable: dict[str, str] = {}
    inv: dict[str, Any] = {"schema": SCHEMA,
                           "collected_at": time.time() if now is None else now}

    def do_system() -> dict[str, Any]:
        sec = system.parse_dmi(system.read_dmi(root))
        unavailable.update(sec.unavailable)
        return sec.data

    def do_firmware() -> dict[str, Any]:
        sec = system.parse_firmware(system.read_firmware(root))
        unavailable.update(sec.unavailable)
        return sec.data

    live = Path(root).resolve() == Path("/")

    def do_cpu() -> dict[str, Any]:
        text = cpu.read_cpuinfo(root)
        if text is None:
            counts = read_psutil_cpu() if live else {}
            if counts:
                return counts
            unavailable["cpu"] = "/proc/cpuinfo unreadable"
            return {}
        sec = cpu.parse_cpuinfo(text, cpu.read_cpu_topology(root))
        unavailable.update(sec.unavailable)
        return sec.data

    def do_memory() -> dict[str, Any]:
        meminfo = memory.read_meminfo(root)
        if meminfo is None and live:
            total = read_psutil_memory()
            meminfo = f"MemTotal: {total // 1024} kB\n" if total else None
        sec = memory.parse_memory(meminfo, memory.read_smbios_memory_devices(root))
        unavailable.update(sec.unavailable)
        return sec.data

    def udev_for(subsystem: str) -> dict[str, dict[str, str]]:
        if udev is not None:
            return udev.get(subsystem, {})
        try:
            return read_udev_properties(subsystem)
        except UdevUnavailable as exc:
            unavailable[f"udev.{subsystem}"] = str(exc)
            return {}

    def do_disks() -> list[dict[str, Any]]:
        found, why = disks.parse_disks(disks.read_block_devices(root), udev_for("block"),
                                       disks.read_by_path_links(root))
        unavailable.update(why)
        return found

    def do_nics() -> list[dict[str, Any]]:
        found, why = nics.parse_nics(nics.read_nics(root), boot_mac)
        if live:     # psutil asks the driver (ethtool ioctl) where sysfs had no speed
            speeds = read_psutil_speeds()
            for nic in found:
                key = f"nics.{nic['name']}.speed_mbps"
                if "speed_mbps" not in nic and speeds.get(nic["name"], 0) > 0:
                    nic["speed_mbps"] = speeds[nic["name"]]
                    why.pop(key, None)
        unavailable.update(why)
        return found

    inv["system"] = _section("system", unavailable, do_system) or {}
    inv["firmware"] = _section("firmware", unavailable, do_firmware) or {}
    inv["cpu"] = _section("cpu", unavailable, do_cpu) or {}
    inv["memory"] = _section("memory", unavailable, do_memory) or {}
    inv["disks"] = _section("disks", unavailable, do_disks) or []
    inv["nics"] = _section("nics", unavailable, do_nics) or []
    if use_ipmitool:
        lan = _section("bmc", unavailable, bmc.read_ipmitool_lan)
        if isinstance(lan, str):
            address = bmc.parse_ipmitool_lan(lan)
            if address:
                inv["bmc"] = {"address": address}
            else:
                unavailable["bmc"] = "ipmitool reports no BMC address"
        elif isinstance(lan, AttrError):
            unavailable["bmc"] = lan.reason
    else:
        unavailable["bmc"] = "not probed"
    inv["unavailable"] = dict(sorted(unavailable.items()))
    return inv


def read_psutil_cpu() -> dict[str, Any]:
    """CPU counts from psutil (the fallback when /proc/cpuinfo is unreadable)."""
    try:
        import psutil
    except ImportError:
        return {}
    out: dict[str, Any] = {}
    threads = psutil.cpu_count(logical=True)
    cores = psutil.cpu_count(logical=False)
    if threads:
        out["threads"] = int(threads)
    if cores:
        out["cores"] = int(cores)
    return out


def read_psutil_memory() -> int | None:
    try:
        import psutil
        return int(psutil.virtual_memory().total)
    except (ImportError, OSError):
        return None


def read_psutil_speeds() -> dict[str, int]:
    try:
        import psutil
        return {name: int(st.speed) for name, st in psutil.net_if_stats().items()}
    except (ImportError, OSError):
        return {}


def read_default_route_iface(root: Path = Path("/")) -> str | None:
    try:
        text = (root / "proc/net/route").read_text(errors="replace")[:256 * 1024]
    except OSError:
        return None
    return nics.parse_default_route_iface(text)


__all__ = ["SCHEMA", "collect_inventory", "read_default_route_iface"]
