"""The release wipe's decisions (:mod:`agent.wipe`) as tables; the tools
themselves run on real loop devices in tests/integration/test_release_wipe.py."""

from __future__ import annotations

import subprocess

import pytest

from agent.wipe import DiskFacts, WipeError, decide_disks, decide_wipe, describe, wipe_disk

W = ["wipefs", "--all", "--force"]


@pytest.mark.parametrize("facts,commands", [
    (DiskFacts("/dev/sda"), [W + ["/dev/sda"], ["sgdisk", "--zap-all", "/dev/sda"]]),
    (DiskFacts("/dev/sda", ("/dev/sda1", "/dev/sda2"), discard=True),
     [W + ["/dev/sda1"], W + ["/dev/sda2"], W + ["/dev/sda"],
      ["sgdisk", "--zap-all", "/dev/sda"], ["blkdiscard", "--force", "/dev/sda"]]),
    (DiskFacts("/dev/nvme0n1", discard=True, has_sgdisk=False),
     [W + ["/dev/nvme0n1"], ["blkdiscard", "--force", "/dev/nvme0n1"]]),
    (DiskFacts("/dev/sdb", read_only=True, discard=True), []),
])
def test_decide_wipe(facts: DiskFacts, commands: list[list[str]]) -> None:
    assert decide_wipe(facts) == commands


def test_the_log_line_says_whether_the_disk_was_discarded() -> None:
    assert "blkdiscard (the disk supports discard)" in describe(DiskFacts("/dev/a", discard=True))
    assert "no blkdiscard" in describe(DiskFacts("/dev/a", discard=False))
    assert describe(DiskFacts("/dev/a", ("/dev/a1",))).startswith("wipefs on 1 partition(s)")


def test_disks_to_wipe_leave_removable_and_read_only_ones() -> None:
    disks = [{"name": "sdb"}, {"name": "sda"}, {"name": "sdc", "removable": True},
             {"name": "sr0", "read_only": True}, {"name": "../etc"}, {"name": ""}]
    assert decide_disks(disks) == (["sda", "sdb"], {"sdc": "removable (allow_removable is off)",
                                                    "sr0": "read-only"})
    assert decide_disks(disks, allow_removable=True)[0] == ["sda", "sdb", "sdc"]


def test_a_failing_tool_fails_the_disk_naming_the_step() -> None:
    def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        code = 1 if cmd[0] == "sgdisk" else 0
        return subprocess.CompletedProcess(cmd, code, "", "Problem opening /dev/sda\n")

    with pytest.raises(WipeError, match=r"sgdisk --zap-all /dev/sda failed \(1\): Problem"):
        wipe_disk(DiskFacts("/dev/sda"), run=run)

    def slow(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(cmd, timeout)

    with pytest.raises(WipeError, match="did not finish within 60 s"):
        wipe_disk(DiskFacts("/dev/sda"), run=slow)
    with pytest.raises(WipeError, match="read-only"):
        wipe_disk(DiskFacts("/dev/sda", read_only=True), run=run)
