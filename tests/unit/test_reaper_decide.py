"""decide_expiry as a table: when a quiet install fails, and when it must not."""

from __future__ import annotations

import pytest

from bootsvc.reaper import Timeouts, decide_expiry
from lpmos.models import Task

T = Timeouts(agent=300, firstboot=1800, boot=3600)
NOW = 1_000_000.0


def _task(status: str, *, updated: float, step: str = "") -> Task:
    task = Task(idc="dc1", sn="s", mac="52:54:00:00:00:01", os_type="lab", status=status)
    task.updated_at = updated
    task.progress.step = step
    return task


@pytest.mark.parametrize("status,updated,step,lease,gone,expect", [
    # installing, lease present: alive whatever the age
    ("installing", NOW - 10_000, "", True, None, None),
    # installing, lease gone long ago and nothing since: failed
    ("installing", NOW - 400, "", False, NOW - 350, "agent_lost"),
    # lease gone recently: not yet
    ("installing", NOW - 400, "", False, NOW - 100, None),
    # lease gone long ago but events still arriving (updated recently): alive
    ("installing", NOW - 10, "", False, NOW - 5000, None),
    # node restarted, never saw the lease: judged from the last activity
    ("installing", NOW - 301, "", False, None, "agent_lost"),
    ("installing", NOW - 299, "", False, None, None),
    # rebooted into the OS: the lease is expected to vanish; firstboot timeout applies
    ("installing", NOW - 1000, "rebooting", False, NOW - 1000, None),
    ("installing", NOW - 1801, "rebooting", False, NOW - 1801, "firstboot_timeout"),
    ("booting", NOW - 1801, "rebooting", False, None, "firstboot_timeout"),
    # claimed, nothing heard: the boot timeout
    ("booting", NOW - 3000, "", False, None, None),
    ("booting", NOW - 3601, "", False, None, "boot_timeout"),
    ("booting", NOW - 9999, "", True, None, None),
    # other states are never expired
    ("approved", NOW - 99999, "", False, None, None),
    ("pending", NOW - 99999, "", False, None, None),
    ("succeeded", NOW - 99999, "", False, None, None),
    ("failed", NOW - 99999, "", False, None, None),
    ("cancelled", NOW - 99999, "", False, None, None),
])
def test_decide_expiry_table(status, updated, step, lease, gone, expect) -> None:
    expiry = decide_expiry(_task(status, updated=updated, step=step), lease_present=lease,
                           lease_gone_since=gone, now=NOW, timeouts=T)
    if expect is None:
        assert expiry is None
    else:
        assert expiry is not None and expiry.code == expect
        # the operator's reason names the timeout that was passed
        assert str(int(getattr(T, {"agent_lost": "agent", "firstboot_timeout": "firstboot",
                                    "boot_timeout": "boot"}[expect]))) in expiry.reason
