from __future__ import annotations

import itertools

import pytest

from lpmos.states import (
    ACTIVE,
    REPORTABLE,
    TRANSITIONS,
    IllegalTransition,
    TaskStatus,
    can_transition,
    check_transition,
)

S = TaskStatus
ALLOWED = {
    (S.PENDING, S.APPROVED), (S.PENDING, S.REJECTED), (S.PENDING, S.CANCELLED),
    (S.APPROVED, S.BOOTING), (S.APPROVED, S.FAILED), (S.APPROVED, S.CANCELLED),
    (S.BOOTING, S.INSTALLING), (S.BOOTING, S.SUCCEEDED), (S.BOOTING, S.FAILED),
    (S.BOOTING, S.CANCELLED),
    (S.INSTALLING, S.SUCCEEDED), (S.INSTALLING, S.FAILED), (S.INSTALLING, S.CANCELLED),
    (S.FAILED, S.APPROVED),
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
        (S.APPROVED, S.FAILED)}
