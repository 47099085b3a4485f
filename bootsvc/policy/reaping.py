"""Why an install must be failed: pure judgements of a task's age and its
machine's liveness, from server clocks only (the approval time the control
plane stamped on the task, else its history, and the node's own clock, never
a machine's).  :class:`bootsvc.state.reaper.Reaper` carries them out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import CLAIM, CONTINUE, decide_script
from lpmos.catalog import Image
from lpmos.models import Task
from lpmos.schedule import next_start
from lpmos.states import REBOOT_STEP, TaskStatus


@dataclass(frozen=True)
class Timeouts:
    agent: float = 300.0       # installing, the agent's lease gone this long
    firstboot: float = 1800.0  # the agent rebooted into the OS; no first-boot call this long
    boot: float = 3600.0       # booting (claimed), nothing heard from the machine this long;
                               # approved, and no node claimed it this long after approval


def last_activity(task: Task) -> float:
    """Server time of the last thing that moved the task (never agent time)."""
    return max(task.updated_at, task.progress.updated_at, task.started_at)


def approved_since(task: Task) -> float:
    """Server time of the task's latest approval: ``approved_at`` (stamped by
    the control plane in the approving CAS), else the newest transition to
    ``approved`` in its history, else its last update; for a scheduled task
    the first instant after that its schedule lets it start
    (:func:`lpmos.schedule.next_start`): an approved task waiting for its
    window is not unclaimed."""
    since = task.updated_at
    if task.approved_at:
        since = task.approved_at
    else:
        for t in reversed(task.history):
            if t.to_status == TaskStatus.APPROVED.value:
                since = t.at
                break
    return next_start(task.not_before, task.window, since)


class Expiry(NamedTuple):
    """Why a task fails: a fixed ``code`` (the metric's label) and the
    ``reason`` recorded on the task for the operator."""

    code: str           # firstboot_timeout | agent_lost | boot_timeout | never_claimed |
                        # unservable
    reason: str


def decide_expiry(task: Task, *, lease_present: bool, lease_gone_since: float | None,
                  now: float, timeouts: Timeouts, unservable: str = "") -> Expiry | None:
    """Why ``task`` must fail now, or ``None``.

    ``unservable`` (approved tasks only) is why this node would not install
    the task if its machine booted now (:func:`why_unservable`), "" when it
    would: the reason then names it instead of asking whether the machine
    is on."""
    if task.status == TaskStatus.APPROVED.value:
        waited = now - approved_since(task)
        if waited <= timeouts.boot:
            return None
        head = (f"approved {waited:.0f} s ago and never claimed by a boot node "
                f"(timeout {timeouts.boot:.0f} s)")
        if unservable:
            return Expiry("unservable", f"{head}; {unservable}")
        return Expiry("never_claimed",
                      f"{head}: is the machine powered on and network-booting?")
    if task.status == TaskStatus.RELEASING.value:
        quiet = now - last_activity(task)
        if lease_present or quiet <= timeouts.boot:
            return None
        return Expiry("boot_timeout", f"release: nothing heard from the machine for "
                                      f"{quiet:.0f} s (timeout {timeouts.boot:.0f} s): is it "
                                      "powered on and network-booting? Its disks may not be "
                                      "wiped")
    if task.status not in (TaskStatus.BOOTING, TaskStatus.INSTALLING):
        return None
    quiet = now - last_activity(task)
    if task.progress.step == REBOOT_STEP:
        if quiet > timeouts.firstboot:
            return Expiry("firstboot_timeout",
                          f"the installed OS did not report its first boot within "
                          f"{timeouts.firstboot:.0f} s after the agent rebooted the machine")
        return None
    if lease_present:
        return None
    if task.status == TaskStatus.INSTALLING:
        gone = max(lease_gone_since or 0.0, last_activity(task))
        if now - gone > timeouts.agent:
            return Expiry("agent_lost", f"agent lost: no heartbeat for {now - gone:.0f} s "
                                        f"(timeout {timeouts.agent:.0f} s) while installing")
        return None
    if quiet > timeouts.boot:
        return Expiry("boot_timeout",
                      f"the machine was claimed for install but nothing was heard from it "
                      f"for {quiet:.0f} s (timeout {timeouts.boot:.0f} s)")
    return None


def why_unservable(view: MachineView, *, node: str, image: Image | None,
                 live_available: bool, now: float, image_wait: str = "") -> str:
    """Why ``node`` would not install ``view``'s task if its machine booted
    now ("" when it would claim or continue it): the boot decision's own
    reason (:func:`bootsvc.policy.script.decide_script`: the image is not in this
    node's catalog, is not installable, the machine is flagged ...)."""
    decision = decide_script(view, discovery=True, image=image, live_available=live_available,
                             now=now, image_wait=image_wait)
    if decision.action in (CLAIM, CONTINUE):
        return ""
    return f"node {node} would not install it: {decision.reason}"
