"""CPU: model, sockets, cores, threads from ``/proc/cpuinfo`` (sysfs topology
as the fallback for architectures whose cpuinfo does not say)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from agent.inventory.sysfs import list_dir, read_attr
from agent.inventory.system import Section

CPUINFO_MAX = 4 * 1024 * 1024
MODEL_KEYS = ("model name", "cpu model", "cpu", "processor name", "hardware")


def read_cpuinfo(root: Path) -> str | None:
    try:
        with (root / "proc/cpuinfo").open("rb") as fh:
            return fh.read(CPUINFO_MAX).decode("utf-8", errors="replace")
    except OSError:
        return None


def read_cpu_topology(root: Path) -> list[tuple[str, str]]:
    """(physical_package_id, core_id) of every online CPU in sysfs."""
    base = root / "sys/devices/system/cpu"
    out = []
    for name in list_dir(base):
        if not re.fullmatch(r"cpu\d+", name):
            continue
        pkg = read_attr(base / name / "topology/physical_package_id")
        core = read_attr(base / name / "topology/core_id")
        if isinstance(pkg, str) and isinstance(core, str):
            out.append((pkg, core))
    return out


def parse_cpuinfo(text: str, topology: list[tuple[str, str]] | None = None) -> Section:
    """``cpu``: model, sockets, cores (physical), threads (logical CPUs).

    Blocks are separated by blank lines, one per logical CPU.  Cores are the
    distinct (physical id, core id) pairs; without those, ``cpu cores`` per
    socket, then the sysfs topology, else unavailable with a reason.
    """
    out = Section()
    blocks: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                blocks.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current.setdefault(key.strip().lower(), value.strip())
    if current:
        blocks.append(current)
    cpus = [b for b in blocks if "processor" in b and b["processor"].isdigit()]
    header = [b for b in blocks if b not in cpus]
    if cpus:
        out.data["threads"] = len(cpus)
    else:
        out.unavailable["cpu.threads"] = "no processor entries in /proc/cpuinfo"
    model = None
    for block in cpus + header:
        for key in MODEL_KEYS:
            if block.get(key) and not block[key].isdigit():
                model = " ".join(block[key].split())[:128]
                break
        if model:
            break
    if model:
        out.data["model"] = model
    else:
        out.unavailable["cpu.model"] = "/proc/cpuinfo names no model"
    pairs = {(b["physical id"], b["core id"]) for b in cpus
             if "physical id" in b and "core id" in b}
    sockets = {b["physical id"] for b in cpus if "physical id" in b}
    if pairs:
        out.data["sockets"] = len(sockets)
        out.data["cores"] = len(pairs)
    elif sockets and all("cpu cores" in b and b["cpu cores"].isdigit() for b in cpus):
        per_socket = {b["physical id"]: int(b["cpu cores"]) for b in cpus}
        out.data["sockets"] = len(sockets)
        out.data["cores"] = sum(per_socket.values())
    elif topology:
        out.data["sockets"] = len({pkg for pkg, _ in topology})
        out.data["cores"] = len(set(topology))
    else:
        out.unavailable["cpu.sockets"] = "no physical id in /proc/cpuinfo nor sysfs topology"
        out.unavailable["cpu.cores"] = "no core id in /proc/cpuinfo nor sysfs topology"
    return out


def parse_psutil_cpu(counts: dict[str, Any]) -> Section:
    """``cpu`` from psutil's counts (``threads``, ``cores``), the fallback when
    /proc/cpuinfo is unreadable; no counts at all is a reason, not an error."""
    out = Section()
    if counts:
        out.data.update(counts)
    else:
        out.unavailable["cpu"] = "/proc/cpuinfo unreadable"
    return out
