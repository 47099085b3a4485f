"""The task state machine of the design brief, as data.

    pending → approved → booting → installing → succeeded | failed
    pending → rejected
    any non-terminal state → cancelled
    failed → approved (retry)
    succeeded → approved (redeploy: the machine installs again)
    approved → failed (no node claimed it within the boot timeout)
    booting → succeeded | failed (an installer may report before any progress)
    succeeded | failed → releasing → released | failed (release: the live
    agent wipes the disks, then the machine is powered off)

:func:`check_transition` is pure: it says whether a move is allowed and
raises :class:`IllegalTransition` naming both states when it is not.
:func:`decide_transition` is the one rule of what a transition writes, for
every writer (the API, the reaper, a machine's report, a node's install
claim); :func:`lpmos.tasks.apply_transition` applies its :class:`Move` to a
task, and the CAS that stores it lives in :mod:`lpmos.tasks` and
:mod:`bootsvc.state.claim`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

#: The progress step an agent reports once the disk is written and it reboots
#: the machine into the installed system: from then on a boot is a disk boot.
REBOOT_STEP = "rebooting"


class TaskStatus(StrEnum):
    PENDING = "pending"
    APPROVED = "approved"
    BOOTING = "booting"
    INSTALLING = "installing"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REJECTED = "rejected"
    CANCELLED = "cancelled"
    RELEASING = "releasing"
    RELEASED = "released"


S = TaskStatus

#: States a task can still move forward from (and so can be cancelled from).
ACTIVE: frozenset[TaskStatus] = frozenset({S.PENDING, S.APPROVED, S.BOOTING, S.INSTALLING,
                                           S.RELEASING})

#: States that end a task.  ``failed`` also allows a retry.
FINAL: frozenset[TaskStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.REJECTED, S.CANCELLED,
                                          S.RELEASED})

#: States in which the machine is being (or about to be) wiped.
DESTRUCTIVE: frozenset[TaskStatus] = frozenset({S.APPROVED, S.BOOTING, S.INSTALLING,
                                                S.RELEASING})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.PENDING: frozenset({S.APPROVED, S.REJECTED, S.CANCELLED}),
    S.APPROVED: frozenset({S.BOOTING, S.FAILED, S.CANCELLED}),
    S.BOOTING: frozenset({S.INSTALLING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.INSTALLING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset({S.APPROVED, S.RELEASING}),
    S.FAILED: frozenset({S.APPROVED, S.RELEASING}),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
    S.RELEASING: frozenset({S.RELEASED, S.FAILED, S.CANCELLED}),
    S.RELEASED: frozenset(),
}

#: Transitions a machine's own ``state`` event may make
#: (:meth:`lpmos.tasks.TaskService.apply_events`): all but ``approved →
#: failed``, the redeploy (``succeeded → approved``) and a release
#: (``→ releasing``).  A machine reports
#: on an install it has claimed; only a regional node's reaper judges that an
#: approved task was never claimed, an event of the previous attempt
#: replayed after a retry must not fail the new one, and only an approver
#: may have a finished machine wiped again.
REPORTABLE: dict[TaskStatus, frozenset[TaskStatus]] = {
    state: (targets - {S.FAILED} if state is S.APPROVED
            else targets - {S.APPROVED} if state is S.SUCCEEDED else targets) - {S.RELEASING}
    for state, targets in TRANSITIONS.items()
}


class IllegalTransition(ValueError):
    """A transition the state machine does not allow.  HTTP status 409."""

    status_code = 409

    def __init__(self, current: TaskStatus | str, target: TaskStatus | str) -> None:
        self.current = TaskStatus(current)
        self.target = TaskStatus(target)
        allowed = ", ".join(sorted(s.value for s in TRANSITIONS[self.current])) or "none"
        super().__init__(
            f"cannot move a task from {self.current.value} to {self.target.value} "
            f"(allowed from {self.current.value}: {allowed})"
        )


class NotInState(IllegalTransition):
    """The call moves only a task in state ``expected``: approve (pending),
    retry (failed) and redeploy (succeeded) all lead to approved, and none
    may do another's job under its own name.  HTTP status 409."""

    def __init__(self, current: TaskStatus | str, target: TaskStatus | str,
                 expected: TaskStatus | str) -> None:
        super().__init__(current, target)
        self.expected = TaskStatus(expected)
        self.args = (f"only a {self.expected.value} task moves to {self.target.value} this "
                     f"way; this one is {self.current.value}",)


def can_transition(current: TaskStatus | str, target: TaskStatus | str) -> bool:
    return TaskStatus(target) in TRANSITIONS[TaskStatus(current)]


def check_transition(current: TaskStatus | str, target: TaskStatus | str) -> None:
    """Raise :class:`IllegalTransition` unless ``current → target`` is allowed."""
    if not can_transition(current, target):
        raise IllegalTransition(current, target)


#: What a new attempt clears: who claimed it, its times and its progress.
_RESTART: tuple[tuple[str, str | float], ...] = (
    ("reason", ""), ("finished_at", 0.0), ("started_at", 0.0), ("claimed_by", ""),
    ("progress.percent", 0.0), ("progress.step", ""), ("progress.message", ""),
)


@dataclass(frozen=True)
class Move:
    """What one transition writes to a task.

    The task's status becomes ``target`` and its history gains the entry
    ``current → target`` at ``at`` by ``by`` for ``reason``; ``fields`` are
    the task's attributes set (``progress.NAME`` for its progress record's),
    in order.  ``new_attempt``: the attempt counter goes up by one and the
    per-source event counters start afresh.  ``served_by``: the regional node
    that claimed the install serves this attempt (``""``: not a claim).
    """

    current: TaskStatus
    target: TaskStatus
    at: float
    by: str
    reason: str = ""
    fields: tuple[tuple[str, str | float], ...] = ()
    new_attempt: bool = False
    served_by: str = ""


def decide_transition(current: TaskStatus | str, target: TaskStatus | str, *, at: float,
                      by: str, reason: str = "", reported: bool = False,
                      served_by: str = "") -> Move:
    """The :class:`Move` of a task from ``current`` to ``target`` at time
    ``at``, or :class:`IllegalTransition` when the state machine forbids it.

    An operator's or a node's move (``reported`` False, checked against
    :data:`TRANSITIONS`): ``approved`` starts a new attempt (approver and
    time recorded, the previous attempt's claim, times, reason and progress
    cleared); ``releasing`` starts a new attempt the same way (the
    releaser recorded as its approver); ``booting`` records the start; a final state records the end
    and ``reason`` when one is given.  A machine's own report (``reported``,
    checked against :data:`REPORTABLE`) only says what the machine saw: a
    final state records the end, and ``failed`` its reason (``reported
    failed`` when the machine gave none).  ``succeeded`` fills the progress
    bar either way.  ``served_by`` names the node whose install claim makes
    the move.
    """
    current, target = TaskStatus(current), TaskStatus(target)
    if target not in (REPORTABLE if reported else TRANSITIONS)[current]:
        raise IllegalTransition(current, target)
    fields: list[tuple[str, str | float]] = []
    new_attempt = False
    if reported:
        if target in FINAL:
            fields.append(("finished_at", at))
        if target is S.FAILED:
            fields.append(("reason", reason or "reported failed"))
    elif target in (S.APPROVED, S.RELEASING):
        fields += [("approved_by", by), ("approved_at", at), *_RESTART]
        new_attempt = True
    elif target is S.BOOTING:
        fields.append(("started_at", at))
    elif target in FINAL:
        fields.append(("finished_at", at))
        if reason:
            fields.append(("reason", reason))
    if target is S.SUCCEEDED:
        fields.append(("progress.percent", 100.0))
    return Move(current, target, at, by, reason, tuple(fields), new_attempt, served_by)
