"""TaskService on the real etcd: transitions are CAS, events are idempotent."""

from __future__ import annotations

import threading

import pytest

from lpmos.models import ProgressEvent, Task
from lpmos.states import IllegalTransition, NotInState, TaskStatus
from lpmos.store import Conflict
from lpmos.tasks import TaskExists, TaskNotFound, TaskService


def _task(sn: str = "sn-001") -> Task:
    return Task(idc="dc1", sn=sn, mac="00:1a:2b:3c:4d:5e", os_type="Ubuntu 22.04",
                os_version="22.04")


@pytest.fixture
def svc(etcd_store, keys) -> TaskService:
    return TaskService(etcd_store, keys)


def test_create_then_full_lifecycle(svc: TaskService) -> None:
    stored = svc.create(_task(), by="op")
    assert stored.task.status == "pending"
    svc.transition("dc1", "sn-001", "approved", by="boss")
    svc.transition("dc1", "sn-001", "booting", by="node-a")
    svc.transition("dc1", "sn-001", "installing", by="agent")
    done = svc.transition("dc1", "sn-001", "succeeded", by="agent")
    assert done.task.status == "succeeded" and done.task.progress.percent == 100
    assert [h.to_status for h in done.task.history] == [
        "pending", "approved", "booting", "installing", "succeeded"]
    assert done.task.approved_by == "boss" and done.task.finished_at > 0


def test_illegal_transition_refused_and_nothing_changes(svc: TaskService) -> None:
    created = svc.create(_task(), by="op")
    with pytest.raises(IllegalTransition, match="from pending to installing"):
        svc.transition("dc1", "sn-001", "installing", by="x")
    assert svc.get("dc1", "sn-001").revision == created.revision


def test_active_task_cannot_be_replaced_but_ended_one_can(svc: TaskService) -> None:
    svc.create(_task(), by="op")
    with pytest.raises(TaskExists):
        svc.create(_task(), by="op")
    svc.transition("dc1", "sn-001", "approved", by="boss")
    with pytest.raises(TaskExists, match="dc1/sn-001 already has an approved task"):
        svc.create(_task(), by="op")
    svc.transition("dc1", "sn-001", "cancelled", by="boss", reason="wrong rack")
    again = svc.create(_task(), by="op")
    assert again.task.status == "pending"


def test_approve_and_retry_move_only_their_own_state(svc: TaskService) -> None:
    """Both lead to approved: ``source`` keeps each to its own (a retry of a
    pending task used to approve it under the name retry)."""
    svc.create(_task(), by="op")
    with pytest.raises(NotInState) as err:
        svc.transition("dc1", "sn-001", "approved", by="boss", source="failed")
    assert (err.value.current, err.value.expected) == (TaskStatus.PENDING, TaskStatus.FAILED)
    assert svc.get("dc1", "sn-001").task.status == "pending"  # type: ignore[union-attr]
    svc.transition("dc1", "sn-001", "approved", by="boss", source="pending")
    assert svc.get("dc1", "sn-001").task.attempt == 1  # type: ignore[union-attr]


def test_expect_revision_conflict(svc: TaskService) -> None:
    created = svc.create(_task(), by="op")
    svc.update("dc1", "sn-001", lambda t: setattr(t, "notes", "edited"))
    with pytest.raises(Conflict) as err:
        svc.transition("dc1", "sn-001", "approved", by="boss", expect_revision=created.revision)
    assert err.value.revision > created.revision


def test_fifty_concurrent_approvals_exactly_one_wins(svc: TaskService) -> None:
    svc.create(_task(), by="op")
    wins, losses, other = [], [], []

    def approve(i: int) -> None:
        try:
            svc.transition("dc1", "sn-001", "approved", by=f"approver{i}")
            wins.append(i)
        except (IllegalTransition, Conflict):
            losses.append(i)
        except Exception as exc:  # pragma: no cover
            other.append(exc)

    threads = [threading.Thread(target=approve, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not other and len(wins) == 1 and len(losses) == 49
    task = svc.get("dc1", "sn-001").task
    assert task.approved_by == f"approver{wins[0]}" and task.attempt == 1


def test_events_applied_once_in_order(svc: TaskService) -> None:
    svc.create(_task(), by="op")
    svc.transition("dc1", "sn-001", "approved", by="boss")
    svc.transition("dc1", "sn-001", "booting", by="node")
    evs = [ProgressEvent(source="agent", seq=1, kind="state", status="installing"),
           ProgressEvent(source="agent", seq=2, percent=10, message="writing"),
           ProgressEvent(source="agent", seq=3, percent=20, message="writing more")]
    stored, applied = svc.apply_events("dc1", "sn-001", evs)
    assert applied == ["agent:1", "agent:2", "agent:3"]
    assert stored.task.status == "installing" and stored.task.progress.percent == 20
    again, applied2 = svc.apply_events("dc1", "sn-001", evs[1:])
    assert applied2 == [] and again.revision == stored.revision
    assert sum("writing" in line for line in again.task.logs) == 2


def test_late_success_cannot_resurrect_a_cancelled_task(svc: TaskService) -> None:
    svc.create(_task(), by="op")
    svc.transition("dc1", "sn-001", "approved", by="boss")
    svc.transition("dc1", "sn-001", "cancelled", by="boss", reason="changed plans")
    stored, applied = svc.apply_events(
        "dc1", "sn-001", [ProgressEvent(source="firstboot", seq=1, kind="state",
                                        status="succeeded")])
    assert stored.task.status == "cancelled" and applied == ["firstboot:1"]


def test_retry_after_failure_resets_progress(svc: TaskService) -> None:
    svc.create(_task(), by="op")
    for target in ("approved", "booting", "installing"):
        svc.transition("dc1", "sn-001", target, by="x")
    svc.apply_events("dc1", "sn-001", [ProgressEvent(source="agent", seq=5, percent=40)])
    svc.transition("dc1", "sn-001", "failed", by="agent", reason="disk error")
    retried = svc.transition("dc1", "sn-001", "approved", by="boss")
    assert retried.task.attempt == 2 and retried.task.event_seq == {}
    assert retried.task.progress.percent == 0 and retried.task.reason == ""


def test_missing_task(svc: TaskService) -> None:
    with pytest.raises(TaskNotFound):
        svc.transition("dc1", "nope", "approved", by="x")
    assert svc.get("dc1", "nope") is None
