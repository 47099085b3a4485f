"""The install claim's rule (:func:`bootsvc.policy.claim.decide_claim`) as a table."""

from __future__ import annotations

from typing import Any

import pytest

from bootsvc.policy.claim import decide_claim
from lpmos.models import Progress, Server, Task
from lpmos.states import REBOOT_STEP, Move, TaskStatus

S = TaskStatus
AT = 1000.0
UUID = "4c4c4544-0000-1000-8000-000000000001"
OTHER_UUID = "4c4c4544-0000-1000-8000-000000000002"


def _task(status: S, *, claimed_by: str = "", started_at: float = 0.0, step: str = "") -> Task:
    return Task("idc1", "SN1", "52:54:00:00:00:01", "ubuntu", status=status.value,
                claimed_by=claimed_by, started_at=started_at, progress=Progress(step=step))


def _server(*, uuid: str = UUID, conflict: str = "") -> Server:
    return Server("idc1", "SN1", ["52:54:00:00:00:01"], uuid=uuid, conflict=conflict)


CLONE = (f"uuid {OTHER_UUID} booted with a MAC of SN1, which is registered with uuid {UUID}")

#: (task, server, arguments, install, reason, conflict to flag)
CASES: list[tuple[Task, Server | None, dict[str, Any], bool, str, str]] = [
    (_task(S.APPROVED), _server(), {}, True, "install claimed", ""),
    (_task(S.APPROVED), None, {}, True, "install claimed", ""),
    (_task(S.APPROVED), _server(), {"boot_uuid": UUID}, True, "install claimed", ""),
    (_task(S.APPROVED), _server(uuid=""), {"boot_uuid": OTHER_UUID}, True,
     "install claimed", ""),
    (_task(S.APPROVED), _server(), {"boot_uuid": OTHER_UUID}, False,
     f"machine flagged as a conflict ({CLONE}); no install", CLONE),
    (_task(S.APPROVED), _server(conflict="cloned"), {"boot_uuid": OTHER_UUID}, False,
     "machine flagged as a conflict (cloned); no install", ""),
    (_task(S.PENDING), _server(), {}, False, "the task is now pending", ""),
    (_task(S.BOOTING, claimed_by="n2"), _server(), {}, False,
     "the task is now booting by n2", ""),
    (_task(S.CANCELLED), _server(), {"continuing": True}, False,
     "the task is now cancelled", ""),
    (_task(S.APPROVED), _server(), {"continuing": True}, False,
     "the task is now approved", ""),
    (_task(S.BOOTING, claimed_by="n1", started_at=AT - 1), _server(), {"continuing": True},
     True, "install confirmed", ""),
    (_task(S.INSTALLING, claimed_by="n2", started_at=AT - 31), _server(),
     {"continuing": True}, True, "install confirmed", ""),
    (_task(S.BOOTING, claimed_by="n2", started_at=AT - 1), _server(), {"continuing": True},
     False, "the install was claimed by n2 moments ago", ""),
    (_task(S.BOOTING, started_at=AT - 29), _server(), {"continuing": True},
     False, "the install was claimed by another node moments ago", ""),
    (_task(S.BOOTING, claimed_by="n2", started_at=AT + 5), _server(), {"continuing": True},
     True, "install confirmed", ""),
    (_task(S.INSTALLING, claimed_by="n1", step=REBOOT_STEP), _server(), {"continuing": True},
     False, "the image is written; the next boot goes to disk", ""),
]


@pytest.mark.parametrize("task,server,kwargs,install,reason,conflict", CASES)
def test_decide_claim(task: Task, server: Server | None, kwargs: dict[str, Any],
                      install: bool, reason: str, conflict: str) -> None:
    before = task.to_dict()
    args: dict[str, Any] = {"node": "n1", "continuing": False, "at": AT, **kwargs}
    decision = decide_claim(task, server, **args)
    assert (decision.install, decision.reason, decision.conflict) == (install, reason, conflict)
    assert task.to_dict() == before, "the decision is pure"
    if install and not args["continuing"]:
        assert decision.move == Move(S.APPROVED, S.BOOTING, AT, "node:n1", "install boot served",
                                     (("started_at", AT),), served_by="n1")
    else:
        assert decision.move is None


def test_a_long_conflict_is_flagged_within_300_characters() -> None:
    decision = decide_claim(_task(S.APPROVED), _server(), node="n1", continuing=False, at=AT,
                            boot_uuid="u" * 400)
    assert not decision.install and len(decision.conflict) == 300


@pytest.mark.parametrize("not_before,window,install,words", [
    (AT + 60, "", False, "scheduled: not before 1970-01-01 00:17:40 UTC"),
    (AT - 60, "", True, "install claimed"),
    (0.0, "01:00-02:00", False, "maintenance window 01:00-02:00 UTC daily"),
    (0.0, "00:00-01:00", True, "install claimed"),      # AT is 00:16:40 UTC
])
def test_a_new_install_waits_for_the_tasks_schedule(not_before: float, window: str,
                                                    install: bool, words: str) -> None:
    task = _task(S.APPROVED)
    task.not_before, task.window = not_before, window
    decision = decide_claim(task, _server(), node="n1", continuing=False, at=AT)
    assert decision.install is install and words in decision.reason
    assert (decision.move is None) is not install
