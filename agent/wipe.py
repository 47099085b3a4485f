"""Release: wipe a machine's disks before it leaves (issue #21).

Per disk, in this order (:func:`decide_wipe`, pure, tested as a table):

1. ``wipefs --all`` on each of its partitions: the file-system and RAID
   signatures inside them (an ext4 superblock survives a wiped table, and
   a re-created table of the same layout would show it again);
2. ``wipefs --all`` on the disk: the partition-table signatures (MBR, the
   primary and the backup GPT header);
3. ``sgdisk --zap-all`` where sgdisk is installed: the GPT structures and
   the protective MBR, whatever wipefs left;
4. ``blkdiscard`` where the disk supports discard (its
   ``queue/discard_max_bytes`` is not 0): every block is discarded, which
   on an SSD or a thin volume makes the old data unreadable through the
   device.  Disks without discard keep their data blocks (only the
   signatures and tables are gone): the log says so.

Secure erase (ATA security erase, NVMe format/sanitize) is not done: it
is vendor-specific and can brick a drive on a failed firmware; the log
says which of the steps above each disk got.

``read_*`` touch sysfs, ``wipe_disk`` runs the tools (each with a
deadline); everything else is pure.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

#: seconds one tool may take (blkdiscard of a large disk: seconds on SSDs,
#: it is the device that works; a wedged device must not hang the agent)
TOOL_TIMEOUT = {"wipefs": 60.0, "sgdisk": 60.0, "blkdiscard": 1800.0}


class WipeError(RuntimeError):
    """A disk could not be wiped; ``str()`` says which step and why."""


@dataclass(frozen=True)
class DiskFacts:
    """What the wipe is decided from: the disk's device, its partitions'
    devices, whether it supports discard, and the tools at hand."""

    device: str
    partitions: tuple[str, ...] = ()
    discard: bool = False
    read_only: bool = False
    has_sgdisk: bool = True


def decide_wipe(disk: DiskFacts) -> list[list[str]]:
    """The commands that wipe ``disk``, in order (see the module docstring).
    A read-only disk gets none (the caller reports it as not wiped)."""
    if disk.read_only:
        return []
    steps = [["wipefs", "--all", "--force", part] for part in disk.partitions]
    steps.append(["wipefs", "--all", "--force", disk.device])
    if disk.has_sgdisk:
        steps.append(["sgdisk", "--zap-all", disk.device])
    if disk.discard:
        steps.append(["blkdiscard", "--force", disk.device])
    return steps


def decide_disks(disks: list[dict[str, Any]], *, allow_removable: bool = False
                 ) -> tuple[list[str], dict[str, str]]:
    """The inventory's disks to wipe (names such as ``sda``) and why each
    other one is left alone (removable, unless allowed; read-only)."""
    chosen: list[str] = []
    skipped: dict[str, str] = {}
    for disk in disks:
        name = str(disk.get("name", ""))
        if not name or "/" in name:
            continue
        if disk.get("removable") and not allow_removable:
            skipped[name] = "removable (allow_removable is off)"
        elif disk.get("read_only") or disk.get("ro"):
            skipped[name] = "read-only"
        else:
            chosen.append(name)
    return sorted(chosen), skipped


def describe(disk: DiskFacts) -> str:
    """One log line: what the wipe of ``disk`` does."""
    done = [f"wipefs on {len(disk.partitions)} partition(s)"] if disk.partitions else []
    done.append("wipefs on the disk")
    if disk.has_sgdisk:
        done.append("sgdisk --zap-all")
    done.append("blkdiscard (the disk supports discard)" if disk.discard
                else "no blkdiscard (the disk does not support discard: data blocks are "
                     "left, only signatures and partition tables are erased)")
    return ", ".join(done)


def read_disk_facts(device: Path, sys_block: Path = Path("/sys/block")) -> DiskFacts:
    """The facts of ``device`` (``/dev/sda``, ``/dev/loop3``) from sysfs."""
    name = device.name
    base = sys_block / name
    partitions = tuple(sorted(f"/dev/{p.name}" for p in base.glob(f"{name}*")
                              if (p / "partition").exists()))

    def number(path: Path) -> int:
        try:
            return int(path.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    return DiskFacts(device=str(device), partitions=partitions,
                     discard=number(base / "queue" / "discard_max_bytes") > 0,
                     read_only=number(base / "ro") == 1,
                     has_sgdisk=shutil.which("sgdisk") is not None)


Runner = Callable[[list[str], float], subprocess.CompletedProcess[str]]


def run_tool(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def wipe_disk(facts: DiskFacts, *, run: Runner = run_tool) -> str:
    """Wipe one disk; the log line of what was done.  :class:`WipeError`
    naming the step when a tool fails or times out (what ran before stays
    done: a partly wiped disk is reported as failed, never as wiped)."""
    if facts.read_only:
        raise WipeError(f"{facts.device} is read-only; not wiped")
    for cmd in decide_wipe(facts):
        try:
            done = run(cmd, TOOL_TIMEOUT[cmd[0]])
        except subprocess.TimeoutExpired:
            raise WipeError(f"{' '.join(cmd)} did not finish within "
                            f"{TOOL_TIMEOUT[cmd[0]]:g} s") from None
        except OSError as exc:
            raise WipeError(f"{' '.join(cmd)}: {exc}") from None
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise WipeError(f"{' '.join(cmd)} failed ({done.returncode}): "
                            f"{detail[-1][:200] if detail else 'no message'}")
    return f"{facts.device}: wiped: {describe(facts)}"
