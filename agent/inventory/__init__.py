"""Hardware inventory, schema v1 (documented in ``docs/inventory.md``).

``collect_inventory()`` collects each section (``collect_*``): it reads
(``read_*``: sysfs, procfs, udev through pyudev, psutil, ipmitool) and parses
(``parse_*``/``decide_*``: pure, tested on captured fixtures and as tables).
It never raises: a field that cannot be read is left out and
``unavailable[field]`` says why, so the same code runs on bare metal, in a VM
and in a container.  A section whose reader or parser fails unexpectedly is
reported as unavailable with the error, not a crash.

The ``collect_*`` section helpers add the reasons they find to the
``unavailable`` dict they are given as they go, so that a reason found
before a section fails is kept beside the section's error.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from agent.inventory import bmc, cpu, disks, memory, nics, system
from agent.inventory.udev import UdevUnavailable, read_udev_properties

SCHEMA = 1

Udev = dict[str, dict[str, dict[str, str]]]


def _section(name: str, unavailable: dict[str, str], fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:   # a reader or parser bug must not stop the inventory
        unavailable[name] = f"error: {type(exc).__name__}: {exc}"[:300]
        return None


def collect_inventory(root: Path = Path("/"), *, boot_mac: str | None = None,
                      udev: Udev | None = None, use_ipmitool: bool = True,
                      now: float | None = None) -> dict[str, Any]:
    """This host's inventory as a JSON-safe dict (schema v1).

    ``root`` is the file system root (a captured tree in tests); ``udev``
    gives udev properties per subsystem instead of asking pyudev (tests);
    ``boot_mac`` marks the NIC the machine booted from.  psutil fills what
    procfs and sysfs lack only when ``root`` is the live ``/``.
    """
    unavailable: dict[str, str] = {}
    live = Path(root).resolve() == Path("/")
    inv: dict[str, Any] = {"schema": SCHEMA,
                           "collected_at": time.time() if now is None else now}
    inv["system"] = _section("system", unavailable,
                             lambda: collect_system(root, unavailable)) or {}
    inv["firmware"] = _section("firmware", unavailable,
                               lambda: collect_firmware(root, unavailable)) or {}
    inv["cpu"] = _section("cpu", unavailable, lambda: collect_cpu(root, live, unavailable)) or {}
    inv["memory"] = _section("memory", unavailable,
                             lambda: collect_memory(root, live, unavailable)) or {}
    inv["disks"] = _section("disks", unavailable,
                            lambda: collect_disks(root, udev, unavailable)) or []
    inv["nics"] = _section("nics", unavailable,
                           lambda: collect_nics(root, boot_mac, live, unavailable)) or []
    if use_ipmitool:
        sec = bmc.parse_bmc(_section("bmc", unavailable, bmc.read_ipmitool_lan))
        if sec.data:
            inv["bmc"] = sec.data
        unavailable.update(sec.unavailable)
    else:
        unavailable["bmc"] = "not probed"
    inv["unavailable"] = dict(sorted(unavailable.items()))
    return inv


# --- the sections: read, then parse ----------------------------------------------------


def collect_system(root: Path, unavailable: dict[str, str]) -> dict[str, Any]:
    sec = system.parse_dmi(system.read_dmi(root))
    unavailable.update(sec.unavailable)
    return sec.data


def collect_firmware(root: Path, unavailable: dict[str, str]) -> dict[str, Any]:
    sec = system.parse_firmware(system.read_firmware(root))
    unavailable.update(sec.unavailable)
    return sec.data


def collect_cpu(root: Path, live: bool, unavailable: dict[str, str]) -> dict[str, Any]:
    """From /proc/cpuinfo (+ sysfs topology); psutil's counts when it is unreadable."""
    text = cpu.read_cpuinfo(root)
    if text is None:
        sec = cpu.parse_psutil_cpu(read_psutil_cpu() if live else {})
    else:
        sec = cpu.parse_cpuinfo(text, cpu.read_cpu_topology(root))
    unavailable.update(sec.unavailable)
    return sec.data


def collect_memory(root: Path, live: bool, unavailable: dict[str, str]) -> dict[str, Any]:
    """From /proc/meminfo (psutil's total when it is unreadable) and SMBIOS."""
    meminfo = memory.read_meminfo(root)
    if meminfo is None and live:
        meminfo = memory.build_meminfo(read_psutil_memory())
    sec = memory.parse_memory(meminfo, memory.read_smbios_memory_devices(root))
    unavailable.update(sec.unavailable)
    return sec.data


def collect_disks(root: Path, udev: Udev | None,
                  unavailable: dict[str, str]) -> list[dict[str, Any]]:
    found, why = disks.parse_disks(disks.read_block_devices(root),
                                   read_udev("block", udev, unavailable),
                                   disks.read_by_path_links(root))
    unavailable.update(why)
    return found


def collect_nics(root: Path, boot_mac: str | None, live: bool,
                 unavailable: dict[str, str]) -> list[dict[str, Any]]:
    found, why = nics.parse_nics(nics.read_nics(root), boot_mac)
    if live:     # psutil asks the driver (ethtool ioctl) where sysfs had no speed
        found, why = nics.decide_speeds(found, why, read_psutil_speeds())
    unavailable.update(why)
    return found


# --- readers --------------------------------------------------------------------------


def read_udev(subsystem: str, given: Udev | None,
              unavailable: dict[str, str]) -> dict[str, dict[str, str]]:
    """udev properties of ``subsystem``'s devices: from ``given`` (tests) or pyudev."""
    if given is not None:
        return given.get(subsystem, {})
    try:
        return read_udev_properties(subsystem)
    except UdevUnavailable as exc:
        unavailable[f"udev.{subsystem}"] = str(exc)
        return {}


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
