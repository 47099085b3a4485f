"""The task state machine of the design brief, as data.

    pending → approved → booting → installing → succeeded | failed
    pending → rejected
    any non-terminal state → cancelled
    failed → approved (retry)
    approved → failed (no node claimed it within the boot timeout)
    booting → succeeded | failed (an installer may report before any progress)

:func:`check_transition` is pure: it says whether a move is allowed and
raises :class:`IllegalTransition` naming both states when it is not.  The CAS
that applies a transition lives in :mod:`lpmos.tasks`.
"""

from __future__ import annotations

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


S = TaskStatus

#: States a task can still move forward from (and so can be cancelled from).
ACTIVE: frozenset[TaskStatus] = frozenset({S.PENDING, S.APPROVED, S.BOOTING, S.INSTALLING})

#: States that end a task.  ``failed`` also allows a retry.
FINAL: frozenset[TaskStatus] = frozenset({S.SUCCEEDED, S.FAILED, S.REJECTED, S.CANCELLED})

#: States in which the machine is being (or about to be) wiped.
DESTRUCTIVE: frozenset[TaskStatus] = frozenset({S.APPROVED, S.BOOTING, S.INSTALLING})

TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    S.PENDING: frozenset({S.APPROVED, S.REJECTED, S.CANCELLED}),
    S.APPROVED: frozenset({S.BOOTING, S.FAILED, S.CANCELLED}),
    S.BOOTING: frozenset({S.INSTALLING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.INSTALLING: frozenset({S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    S.SUCCEEDED: frozenset(),
    S.FAILED: frozenset({S.APPROVED}),
    S.REJECTED: frozenset(),
    S.CANCELLED: frozenset(),
}

#: Transitions a machine's own ``state`` event may make
#: (:meth:`lpmos.tasks.TaskService.apply_events`): all but ``approved →
#: failed``.  A machine reports on an install it has claimed; only a regional
#: node's reaper judges that an approved task was never claimed, and an event
#: of the previous attempt replayed after a retry must not fail the new one.
REPORTABLE: dict[TaskStatus, frozenset[TaskStatus]] = {
    state: targets - {S.FAILED} if state is S.APPROVED else targets
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
    """The call moves only a task in state ``expected``: approve (pending)
    and retry (failed) both lead to approved, and neither may do the
    other's job under its own name.  HTTP status 409."""

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
