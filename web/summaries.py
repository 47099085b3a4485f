"""What the console's lists show of a task, a server and a regional node,
and the numbers of its stats panel: pure functions of the records, used by
:class:`web.index.ConsoleIndex`, the API blueprints and the WebSocket deltas.

A task's place in every list is its :func:`sort_key` (newest first, then IDC
and SN), which is also the cursor a page ends at; text search matches the
lower-cased ``haystack`` of a task or server.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lpmos.models import Server, Task

#: log lines a list row carries (the full log is the task's own page)
LOG_TAIL = 5

SortKey = tuple[float, str, str]


@dataclass
class TaskEntry:
    """A task as the index holds it: the record, its mod revision, its
    :func:`sort_key` and its search text (:func:`task_haystack`)."""

    task: Task
    revision: int
    sort: SortKey
    haystack: str


def sort_key(task: Task) -> SortKey:
    """Newest first, then IDC and SN: stable across pages."""
    return (-float(task.created_at), task.idc, task.sn)


def task_haystack(task: Task) -> str:
    """The lower-cased text a task list's ``q`` filter searches."""
    return " ".join((task.idc, task.sn, task.mac, task.os_type, task.os_version, task.image,
                     task.created_by, task.approved_by, task.template, task.notes,
                     task.status)).lower()


def task_summary(task: Task, revision: int) -> dict[str, Any]:
    """What a list row and a WebSocket delta carry: no history, a short log tail."""
    p = task.progress
    return {
        "idc": task.idc, "sn": task.sn, "mac": task.mac, "os_type": task.os_type,
        "os_version": task.os_version, "image": task.image, "status": task.status,
        "template": task.template, "created_by": task.created_by,
        "created_at": task.created_at, "updated_at": task.updated_at,
        "approved_by": task.approved_by, "attempt": task.attempt, "reason": task.reason,
        "claimed_by": task.claimed_by, "started_at": task.started_at,
        "finished_at": task.finished_at, "notes": task.notes,
        "not_before": task.not_before, "window": task.window,
        "progress": {"percent": p.percent, "step": p.step, "message": p.message,
                     "bytes_done": p.bytes_done, "bytes_total": p.bytes_total,
                     "rate": p.rate, "updated_at": p.updated_at},
        "log_tail": task.logs[-LOG_TAIL:],
        "revision": revision,
    }


def server_summary(server: Server, revision: int, online: bool) -> dict[str, Any]:
    """What a server list row and a WebSocket delta carry: the record without
    its inventory, plus the inventory facts a row shows (a malformed
    inventory shows as empty)."""
    inv = server.inventory if isinstance(server.inventory, dict) else {}
    system = inv.get("system") if isinstance(inv.get("system"), dict) else {}
    cpu = inv.get("cpu") if isinstance(inv.get("cpu"), dict) else {}
    memory = inv.get("memory") if isinstance(inv.get("memory"), dict) else {}
    disks = inv.get("disks") if isinstance(inv.get("disks"), list) else []
    assert isinstance(system, dict) and isinstance(cpu, dict) and isinstance(memory, dict)
    assert isinstance(disks, list)
    return {
        "idc": server.idc, "sn": server.sn, "macs": server.macs, "boot_mac": server.boot_mac,
        "uuid": server.uuid, "arch": server.arch, "ip": server.ip, "state": server.state,
        "conflict": server.conflict, "first_seen": server.first_seen,
        "last_seen": server.last_seen, "online": online,
        "vendor": str(system.get("vendor", "")), "product": str(system.get("product", "")),
        "cpu_model": str(cpu.get("model", "")),
        "cpu_threads": cpu.get("threads") if isinstance(cpu.get("threads"), int) else None,
        "memory_bytes": memory.get("total_bytes")
        if isinstance(memory.get("total_bytes"), int) else None,
        "disk_count": len(disks), "revision": revision,
    }


def server_haystack(server: Server) -> str:
    """The lower-cased text a server list's ``q`` filter searches."""
    inv = server.inventory if isinstance(server.inventory, dict) else {}
    system = inv.get("system") if isinstance(inv.get("system"), dict) else {}
    assert isinstance(system, dict)
    return " ".join([server.idc, server.sn, server.uuid, server.ip, *server.macs,
                     str(system.get("vendor", "")), str(system.get("product", ""))]).lower()


def node_view(name: str, data: dict[str, Any], revision: int, now: float) -> dict[str, Any]:
    """A regional node's registration as shown: the key exists only while its
    lease lives, so presence means alive; ``last_seen`` is informational."""
    shown = {k: v for k, v in data.items() if isinstance(k, str) and k != "token"}
    return {"name": name, "alive": True, "revision": revision, **shown}


def diff_summary(before: dict[str, Any] | None, after: dict[str, Any]) -> dict[str, Any]:
    """``after`` minus the fields equal in ``before`` (identity kept)."""
    if before is None:
        return after
    out = {k: v for k, v in after.items() if before.get(k) != v}
    out["idc"], out["sn"], out["revision"] = after["idc"], after["sn"], after["revision"]
    return out


def task_stats(counts: Mapping[tuple[str, str], int], tasks: Iterable[Task],
               now: float) -> dict[str, Any]:
    """The task half of the stats panel: counts per state and per IDC (from
    ``counts`` per ``(idc, status)``), installs per hour over the 24 hours
    up to ``now`` (succeeded and failed, by ``finished_at``) and the median
    install time of succeeded tasks (``finished_at - started_at``)."""
    per_state: Counter[str] = Counter()
    per_idc: dict[str, Counter[str]] = {}
    for (idc, status), n in counts.items():
        per_state[status] += n
        per_idc.setdefault(idc, Counter())[status] += n
    hour_now = int(now // 3600)
    hours = [0] * 24
    failed_hours = [0] * 24
    durations: list[float] = []
    for task in tasks:
        if task.status not in ("succeeded", "failed") or not task.finished_at:
            continue
        age = hour_now - int(task.finished_at // 3600)
        if 0 <= age < 24:
            (hours if task.status == "succeeded" else failed_hours)[23 - age] += 1
        if task.status == "succeeded" and task.started_at:
            durations.append(task.finished_at - task.started_at)
    return {
        "total": sum(per_state.values()),
        "per_state": dict(per_state),
        "per_idc": {k: dict(v) for k, v in sorted(per_idc.items())},
        "installs_per_hour": [
            {"hour_start": (hour_now - 23 + i) * 3600, "succeeded": hours[i],
             "failed": failed_hours[i]} for i in range(24)],
        "median_install_seconds": statistics.median(durations) if durations else None,
        "installs_measured": len(durations),
    }
