"""decide_expiry as a table: when a quiet install fails, and when it must not;
and why_unservable: what a node says about an approved task it would not
install."""

from __future__ import annotations

import pytest

from bootsvc.policy.machine import MachineView
from bootsvc.policy.reaping import Timeouts, decide_expiry, why_unservable
from lpmos.catalog import Image
from lpmos.models import Server, Task, Transition

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
    # other states are never expired (approved ones: see the next table)
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


def _approved(*, approved_at: float, history_at: float | None = None,
              updated: float = NOW - 5) -> Task:
    task = Task(idc="dc1", sn="s", mac="52:54:00:00:00:01", os_type="lab", status="approved")
    task.created_at = NOW - 99_999
    task.updated_at = updated
    task.approved_at = approved_at
    if history_at is not None:
        task.history = [Transition("", "pending", NOW - 99_999),
                        Transition("pending", "approved", history_at)]
    return task


NOT_IN_CATALOG = "node n1 would not install it: task image gone is not in the catalog"


@pytest.mark.parametrize("task,lease,unservable,expect,words", [
    # approved and claimed by nobody: failed once the boot timeout after approval passed
    (_approved(approved_at=NOW - 10), False, "", None, ""),
    (_approved(approved_at=NOW - 3599), False, "", None, ""),
    (_approved(approved_at=NOW - 3601), False, "", "never_claimed",
     "approved 3601 s ago and never claimed by a boot node (timeout 3600 s): is the machine "
     "powered on and network-booting?"),
    # measured from the approval, not from activity: a discovery agent's events or a
    # live agent lease do not keep an unclaimed task waiting
    (_approved(approved_at=NOW - 3601, updated=NOW - 1), True, "", "never_claimed",
     "never claimed"),
    # a retry is a new approval: the clock starts again (created long ago)
    (_approved(approved_at=NOW - 60, updated=NOW - 60), False, "", None, ""),
    # an approval stamped ahead of this node's clock is not old
    (_approved(approved_at=NOW + 500), False, "", None, ""),
    # a record without approved_at: the newest approval in its history
    (_approved(approved_at=0, history_at=NOW - 3601), False, "", "never_claimed",
     "3601 s ago"),
    (_approved(approved_at=0, history_at=NOW - 100, updated=NOW - 9000), False, "", None, ""),
    # this node cannot serve it: the reason says why instead of asking about power
    (_approved(approved_at=NOW - 3601), False, NOT_IN_CATALOG, "unservable",
     "never claimed by a boot node (timeout 3600 s); " + NOT_IN_CATALOG),
    # ... but only after the same timeout (another node of the IDC may serve it)
    (_approved(approved_at=NOW - 3599), False, NOT_IN_CATALOG, None, ""),
])
def test_decide_expiry_approved_table(task, lease, unservable, expect, words) -> None:
    expiry = decide_expiry(task, lease_present=lease, lease_gone_since=None, now=NOW,
                           timeouts=T, unservable=unservable)
    if expect is None:
        assert expiry is None
    else:
        assert expiry is not None and expiry.code == expect
        assert words in expiry.reason
        if expect == "never_claimed":
            assert "would not install" not in expiry.reason


def test_unservable_is_ignored_for_tasks_past_approval() -> None:
    # a claimed task is judged by the other timeouts only
    booting = _task("booting", updated=NOW - 10)
    assert decide_expiry(booting, lease_present=False, lease_gone_since=None, now=NOW,
                         timeouts=T, unservable=NOT_IN_CATALOG) is None


LAB_OS = Image("lab-os", "Lab OS", "lab", "1", mode="image", disk_image="lab-os/disk.img")
LIVE = Image("live", "LPMOS live", "lab", role="live", mode="installer", kernel="k",
             initrd="i")


def _view(*, conflict: str = "", arch: str = "") -> MachineView:
    task = Task(idc="dc1", sn="s", mac="52:54:00:00:00:01", os_type="Lab OS",
                status="approved").validate()
    server = Server(idc="dc1", sn="s", macs=["52:54:00:00:00:01"], conflict=conflict,
                    arch=arch)
    return MachineView("s", task, 3, server)


@pytest.mark.parametrize("view,image,live,words", [
    (_view(), LAB_OS, True, ""),                           # it would claim: nothing to say
    (_view(), None, True, "task image Lab OS is not in the catalog"),
    (_view(), LIVE, True, "live is the live agent image"),
    (_view(), LAB_OS, False, "needs the live image"),
    (_view(conflict="mac reused"), LAB_OS, True, "conflict (mac reused)"),
    # the inventory says arm64: an x86_64 image is never sent there, and says why
    (_view(arch="aarch64"), LAB_OS, True, "built for x86_64, and this machine is arm64"),
    (_view(arch="x86_64"), LAB_OS, True, ""),
])
def test_why_unservable_table(view, image, live, words) -> None:
    reason = why_unservable(view, node="n1", image=image, live_available=live, now=0.0)
    if not words:
        assert reason == ""
    else:
        assert reason.startswith("node n1 would not install it: ") and words in reason


def test_an_approved_task_waiting_for_its_schedule_is_not_unclaimed() -> None:
    from bootsvc.policy.reaping import Timeouts, approved_since, decide_expiry

    task = Task(idc="dc1", sn="s", mac="52:54:00:00:00:01", os_type="Lab OS",
                status="approved", approved_at=1_800_000_000.0,
                not_before=1_800_000_000.0 + 86400).validate()
    assert approved_since(task) == 1_800_000_000.0 + 86400
    timeouts = Timeouts(boot=3600.0)
    assert decide_expiry(task, lease_present=False, lease_gone_since=None,
                         now=1_800_000_000.0 + 80000, timeouts=timeouts) is None
    late = decide_expiry(task, lease_present=False, lease_gone_since=None,
                         now=1_800_000_000.0 + 86400 + 3601, timeouts=timeouts)
    assert late is not None and late.code == "never_claimed"


def test_a_release_nobody_carries_out_fails_after_the_boot_timeout() -> None:
    from bootsvc.policy.reaping import Timeouts, decide_expiry

    task = Task(idc="dc1", sn="s", mac="52:54:00:00:00:01", os_type="Lab OS",
                status="releasing", updated_at=1000.0).validate()
    timeouts = Timeouts(boot=3600.0)
    assert decide_expiry(task, lease_present=False, lease_gone_since=None, now=4000.0,
                         timeouts=timeouts) is None
    assert decide_expiry(task, lease_present=True, lease_gone_since=None, now=9000.0,
                         timeouts=timeouts) is None
    late = decide_expiry(task, lease_present=False, lease_gone_since=None, now=4601.0 + 1,
                         timeouts=timeouts)
    assert late is not None and "may not be wiped" in late.reason
