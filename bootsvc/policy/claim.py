"""Whether a node may serve an install: the pure rule of the install claim.

:func:`decide_claim` judges the task and server record a node has just read
fresh from etcd; :func:`bootsvc.state.claim.claim_install` does that read
and commits what the decision says, conditional on the revision read.
"""

from __future__ import annotations

from dataclasses import dataclass

from lpmos.models import Server, Task
from lpmos.schedule import decide_start
from lpmos.states import REBOOT_STEP, Move, TaskStatus, decide_transition

#: Where a machine that boots again mid-install may continue it.
_UNDER_WAY = (TaskStatus.BOOTING, TaskStatus.INSTALLING)


@dataclass(frozen=True)
class ClaimDecision:
    """``install`` False: serve wait-and-retry, for ``reason``.

    ``conflict`` (``""``: none) is the duplicate-machine conflict to record
    on the server record.  ``move`` is the task's transition the claim
    writes (``None``: a machine continuing its install writes none; only its
    token is renewed)."""

    install: bool
    reason: str
    conflict: str = ""
    move: Move | None = None


def _refuse(reason: str, conflict: str = "") -> ClaimDecision:
    return ClaimDecision(False, reason, conflict)


def decide_claim(task: Task, server: Server | None, *, node: str, continuing: bool,
                 at: float, claim_guard: float = 30.0, boot_uuid: str = "") -> ClaimDecision:
    """May ``node`` serve the install of ``task`` (read fresh, with its
    machine's ``server`` record) at server time ``at``?

    A new install (``continuing`` False) needs an ``approved`` task and moves
    it to ``booting``, claimed by ``node``.  A machine booting again
    mid-install (``continuing``) needs a task still ``booting`` or
    ``installing`` whose image is not yet written, and not claimed by
    another node less than ``claim_guard`` seconds ago: that is the losing
    side of a race whose cache already shows the winner's claim, and it
    waits like a CAS loser.  Either way a machine flagged as a conflict gets
    no install, and neither does one whose firmware reports a ``boot_uuid``
    other than the one registered (a second machine with this MAC: a cloned
    VM), which the decision flags as a conflict.  A new install also waits
    for the task's schedule (:func:`lpmos.schedule.decide_start` at ``at``)."""
    if server is not None and server.conflict:
        return _refuse(f"machine flagged as a conflict ({server.conflict}); no install")
    if boot_uuid and server is not None and server.uuid and boot_uuid != server.uuid:
        why = (f"uuid {boot_uuid} booted with a MAC of {task.sn}, which is registered with "
               f"uuid {server.uuid}")
        return _refuse(f"machine flagged as a conflict ({why}); no install", why[:300])
    status = task.state
    if continuing:
        if status not in _UNDER_WAY:
            return _refuse(f"the task is now {status.value}")
        if task.progress.step == REBOOT_STEP:
            return _refuse("the image is written; the next boot goes to disk")
        if task.claimed_by != node and 0 <= at - task.started_at < claim_guard:
            return _refuse(f"the install was claimed by {task.claimed_by or 'another node'}"
                           " moments ago")
        return ClaimDecision(True, "install confirmed")
    if status is not TaskStatus.APPROVED:
        who = f" by {task.claimed_by}" if task.claimed_by else ""
        return _refuse(f"the task is now {status.value}{who}")
    start = decide_start(task.not_before, task.window, at)
    if not start.start:
        return _refuse(start.reason)
    return ClaimDecision(True, "install claimed", move=decide_transition(
        status, TaskStatus.BOOTING, at=at, by=f"node:{node}", reason="install boot served",
        served_by=node))


def decide_release(task: Task, server: Server | None, *, node: str) -> ClaimDecision:
    """May ``node`` have the live agent wipe ``task``'s machine (the task and
    server record read fresh)?  Only a task still ``releasing`` of a machine
    not flagged as a conflict.  ``move`` is always ``None``: the claim
    writes no transition, only who serves the attempt (a node that takes
    over from another: the wipe can be repeated, nothing is lost by it)."""
    if server is not None and server.conflict:
        return _refuse(f"machine flagged as a conflict ({server.conflict}); no wipe")
    if task.state is not TaskStatus.RELEASING:
        return _refuse(f"the task is now {task.status}")
    return ClaimDecision(True, "release claimed" if task.claimed_by != node
                         else "release confirmed")
