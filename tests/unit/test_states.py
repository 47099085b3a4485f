from __future__ import annotations

import itertools

import pytest

from lpmos.states import (
    ACTIVE,
    REPORTABLE,
    TRANSITIONS,
    IllegalTransition,
    Move,
    TaskStatus,
    can_transition,
    check_transition,
    decide_transition,
)

S = TaskStatus
ALLOWED = {
    (S.PENDING, S.APPROVED), (S.PENDING, S.REJECTED), (S.PENDING, S.CANCELLED),
    (S.APPROVED, S.BOOTING), (S.APPROVED, S.FAILED), (S.APPROVED, S.CANCELLED),
    (S.BOOTING, S.INSTALLING), (S.BOOTING, S.SUCCEEDED), (S.BOOTING, S.FAILED),
    (S.BOOTING, S.CANCELLED),
    (S.INSTALLING, S.SUCCEEDED), (S.INSTALLING, S.FAILED), (S.INSTALLING, S.CANCELLED),
    (S.FAILED, S.APPROVED), (S.SUCCEEDED, S.APPROVED),
    # release (#21): the live agent wipes the disks, the machine is powered off
    (S.SUCCEEDED, S.RELEASING), (S.FAILED, S.RELEASING),
    (S.RELEASING, S.RELEASED), (S.RELEASING, S.FAILED), (S.RELEASING, S.CANCELLED),
}


@pytest.mark.parametrize("current,target", sorted(ALLOWED))
def test_allowed_transitions_pass(current: S, target: S) -> None:
    check_transition(current, target)
    assert can_transition(current.value, target.value)


ILLEGAL = sorted(set(itertools.product(S, S)) - ALLOWED)


@pytest.mark.parametrize("current,target", ILLEGAL)
def test_every_illegal_transition_is_refused_naming_both_states(current: S, target: S) -> None:
    with pytest.raises(IllegalTransition) as err:
        check_transition(current, target)
    assert f"from {current.value} to {target.value}" in str(err.value)
    assert err.value.status_code == 409


def test_every_active_state_can_be_cancelled() -> None:
    for state in ACTIVE:
        assert S.CANCELLED in TRANSITIONS[state]


def test_table_matches_design() -> None:
    assert {(a, b) for a, bs in TRANSITIONS.items() for b in bs} == ALLOWED


def test_a_machine_cannot_report_an_approved_task_failed() -> None:
    # only the reaper judges a task nobody claimed; every other move is reportable
    assert S.FAILED in TRANSITIONS[S.APPROVED]
    assert S.FAILED not in REPORTABLE[S.APPROVED]
    assert {(a, b) for a, bs in REPORTABLE.items() for b in bs} == ALLOWED - {
        (S.APPROVED, S.FAILED), (S.SUCCEEDED, S.APPROVED),
        (S.SUCCEEDED, S.RELEASING), (S.FAILED, S.RELEASING)}


def test_a_release_is_a_new_attempt_and_only_an_approver_starts_it() -> None:
    move = decide_transition(S.SUCCEEDED, S.RELEASING, at=7.0, by="ann", reason="decommission")
    assert move.new_attempt
    assert dict(move.fields)["approved_by"] == "ann" and dict(move.fields)["claimed_by"] == ""
    with pytest.raises(IllegalTransition):
        decide_transition(S.SUCCEEDED, S.RELEASING, at=7.0, by="agent", reported=True)
    done = decide_transition(S.RELEASING, S.RELEASED, at=9.0, by="agent", reported=True)
    assert dict(done.fields) == {"finished_at": 9.0}


RESTART = {"reason": "", "finished_at": 0.0, "started_at": 0.0, "claimed_by": "",
           "progress.percent": 0.0, "progress.step": "", "progress.message": ""}

#: (current, target, reason, reported, what the move writes, a new attempt)
WRITES = [
    (S.PENDING, S.APPROVED, "", False, {"approved_by": "ann", "approved_at": 7.0, **RESTART},
     True),
    (S.FAILED, S.APPROVED, "retry", False,
     {"approved_by": "ann", "approved_at": 7.0, **RESTART}, True),
    (S.APPROVED, S.BOOTING, "", False, {"started_at": 7.0}, False),
    (S.BOOTING, S.INSTALLING, "", False, {}, False),
    (S.INSTALLING, S.SUCCEEDED, "", False, {"finished_at": 7.0, "progress.percent": 100.0},
     False),
    (S.INSTALLING, S.SUCCEEDED, "done", False,
     {"finished_at": 7.0, "reason": "done", "progress.percent": 100.0}, False),
    (S.APPROVED, S.FAILED, "nobody claimed it", False,
     {"finished_at": 7.0, "reason": "nobody claimed it"}, False),
    (S.INSTALLING, S.CANCELLED, "", False, {"finished_at": 7.0}, False),
    (S.PENDING, S.REJECTED, "no", False, {"finished_at": 7.0, "reason": "no"}, False),
    # a machine's report records what it saw and restarts nothing
    (S.BOOTING, S.INSTALLING, "partitioning", True, {}, False),
    (S.INSTALLING, S.SUCCEEDED, "all done", True,
     {"finished_at": 7.0, "progress.percent": 100.0}, False),
    (S.INSTALLING, S.FAILED, "disk full", True, {"finished_at": 7.0, "reason": "disk full"},
     False),
    (S.BOOTING, S.FAILED, "", True, {"finished_at": 7.0, "reason": "reported failed"}, False),
    (S.APPROVED, S.BOOTING, "", True, {}, False),
    (S.FAILED, S.APPROVED, "", True, {}, False),
    # a redeploy is a new attempt, as a retry is
    (S.SUCCEEDED, S.APPROVED, "", False, {"approved_by": "ann", "approved_at": 7.0, **RESTART},
     True),
]


@pytest.mark.parametrize("current,target,reason,reported,fields,new_attempt", WRITES)
def test_decide_transition_writes(current: S, target: S, reason: str, reported: bool,
                                  fields: dict[str, object], new_attempt: bool) -> None:
    move = decide_transition(current.value, target.value, at=7.0, by="ann", reason=reason,
                             reported=reported)
    assert move == Move(current, target, 7.0, "ann", reason, move.fields, new_attempt)
    assert dict(move.fields) == fields
    assert len(move.fields) == len(fields)


def test_decide_transition_of_a_claim_names_the_node() -> None:
    move = decide_transition(S.APPROVED, S.BOOTING, at=7.0, by="node:n1",
                             reason="install boot served", served_by="n1")
    assert move.served_by == "n1" and dict(move.fields) == {"started_at": 7.0}


@pytest.mark.parametrize("current,target", ILLEGAL)
def test_decide_transition_refuses_what_the_machine_forbids(current: S, target: S) -> None:
    with pytest.raises(IllegalTransition):
        decide_transition(current, target, at=7.0, by="ann")
    with pytest.raises(IllegalTransition):
        decide_transition(current, target, at=7.0, by="agent", reported=True)


def test_a_machine_report_cannot_fail_an_approved_task() -> None:
    decide_transition(S.APPROVED, S.FAILED, at=7.0, by="reaper")
    with pytest.raises(IllegalTransition):
        decide_transition(S.APPROVED, S.FAILED, at=7.0, by="agent", reported=True)
