"""The schedule rule (:mod:`lpmos.schedule`) as tables: parsing what an
operator types, and when a task may start."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from lpmos.schedule import (
    ScheduleError,
    decide_start,
    iso_time,
    next_start,
    parse_not_before,
    parse_window,
    window_opening,
)


def t(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize("value,expected", [
    ("2026-12-04T22:00:00Z", t("2026-12-04T22:00:00")),
    ("2026-12-04T22:00Z", t("2026-12-04T22:00:00")),
    ("2026-12-04 22:00Z", t("2026-12-04T22:00:00")),
    ("2026-12-04T23:00:00+01:00", t("2026-12-04T22:00:00")),
    ("2026-12-04T17:30-0430", t("2026-12-04T22:00:00")),
    ("2026-12-04T22:00:00.250Z", t("2026-12-04T22:00:00") + 0.25),
    (t("2026-12-04T22:00:00"), t("2026-12-04T22:00:00")),     # the stored form
    (None, 0.0), ("", 0.0), (0, 0.0),
])
def test_not_before_parses(value: object, expected: float) -> None:
    assert parse_not_before(value) == pytest.approx(expected)


@pytest.mark.parametrize("value,says", [
    ("2026-12-04T22:00:00", "time zone"),          # naive: refused, not guessed
    ("tomorrow", "not an ISO 8601"),
    ("2026-13-04T22:00Z", "month must be in 1..12"),
    ("2026-12-04T25:00Z", "hour must be in 0..23"),
    ("2026-12-04T22:00Z\n", "not an ISO 8601"),
    ("1999-12-31T23:59Z", "between 2000 and 2100"),
    ("2126-01-01T00:00Z", "between 2000 and 2100"),
    ("x" * 100, "not an ISO 8601"),
    (True, "ISO 8601"), ([1], "ISO 8601"), ({"at": 1}, "ISO 8601"),
])
def test_bad_not_before_is_refused_with_a_reason(value: object, says: str) -> None:
    with pytest.raises(ScheduleError) as err:
        parse_not_before(value)
    assert err.value.field == "not_before"
    assert says in str(err.value)


@pytest.mark.parametrize("value,expected", [
    ("22:00-04:00", "22:00-04:00"), ("2:00-4:30", "02:00-04:30"),
    (" 09:15 - 17:45 ", "09:15-17:45"), ("23:59-00:00", "23:59-00:00"),
    (None, ""), ("", ""),
])
def test_window_parses_to_its_canonical_form(value: object, expected: str) -> None:
    assert parse_window(value) == expected


@pytest.mark.parametrize("value,says", [
    ("22:00", "not HH:MM-HH:MM"), ("22:00-", "not HH:MM-HH:MM"),
    ("24:00-02:00", "hours 00-23"), ("22:60-23:00", "minutes 00-59"),
    ("04:00-04:00", "must differ"), ("22h-4h", "not HH:MM-HH:MM"),
    ("22:00-04:00 CET", "not HH:MM-HH:MM"), (2200, "daily UTC window"),
    ("1" * 100, "daily UTC window"),
])
def test_bad_window_is_refused_with_a_reason(value: object, says: str) -> None:
    with pytest.raises(ScheduleError) as err:
        parse_window(value)
    assert err.value.field == "window"
    assert says in str(err.value)


NB = t("2026-12-04T22:00:00")

#: (not_before, window, now, may start, next start)
START = [
    (0.0, "", t("2026-12-03T10:00:00"), True, t("2026-12-03T10:00:00")),
    (NB, "", NB - 1, False, NB),
    (NB, "", NB, True, NB),
    (NB, "", NB + 3600, True, NB + 3600),
    # a window within a day
    (0.0, "09:00-17:00", t("2026-12-03T08:59:59"), False, t("2026-12-03T09:00:00")),
    (0.0, "09:00-17:00", t("2026-12-03T09:00:00"), True, t("2026-12-03T09:00:00")),
    (0.0, "09:00-17:00", t("2026-12-03T16:59:59"), True, t("2026-12-03T16:59:59")),
    (0.0, "09:00-17:00", t("2026-12-03T17:00:00"), False, t("2026-12-04T09:00:00")),
    # a window across midnight: open late evening and early morning
    (0.0, "22:00-04:00", t("2026-12-03T23:30:00"), True, t("2026-12-03T23:30:00")),
    (0.0, "22:00-04:00", t("2026-12-04T03:59:00"), True, t("2026-12-04T03:59:00")),
    (0.0, "22:00-04:00", t("2026-12-04T04:00:00"), False, t("2026-12-04T22:00:00")),
    (0.0, "22:00-04:00", t("2026-12-04T12:00:00"), False, t("2026-12-04T22:00:00")),
    # both: the first window opening at or after not_before
    (NB, "02:00-04:00", t("2026-12-03T03:00:00"), False, t("2026-12-05T02:00:00")),
    (t("2026-12-05T03:00:00"), "02:00-04:00", t("2026-12-03T03:00:00"), False,
     t("2026-12-05T03:00:00")),
    (NB, "21:00-23:00", t("2026-12-04T22:30:00"), True, t("2026-12-04T22:30:00")),
    (NB, "21:00-23:00", t("2026-12-04T21:30:00"), False, NB),
]


@pytest.mark.parametrize("not_before,window,now,start,at", START)
def test_decide_start(not_before: float, window: str, now: float, start: bool,
                      at: float) -> None:
    decision = decide_start(not_before, window, now)
    assert decision.start is start
    assert decision.at == at == next_start(not_before, window, now)
    if start:
        assert decision.reason == ""
    else:
        assert decision.reason.startswith("scheduled: ")
        assert iso_time(at)[:16].replace("T", " ") in decision.reason


def test_the_wait_reason_names_absolute_times_only() -> None:
    # a boot script rendered from it stays the same while the machine waits
    first = decide_start(NB, "22:00-04:00", NB - 7200)
    later = decide_start(NB, "22:00-04:00", NB - 60)
    assert first.reason == later.reason == (
        "scheduled: not before 2026-12-04 22:00 UTC, maintenance window 22:00-04:00 UTC "
        "daily; starts at 2026-12-04 22:00 UTC")


def test_window_opening_is_the_occurrence_holding_or_after_the_instant() -> None:
    assert window_opening("22:00-04:00", t("2026-12-04T01:00:00")) == (
        t("2026-12-03T22:00:00"), t("2026-12-04T04:00:00"))
    assert window_opening("22:00-04:00", t("2026-12-04T05:00:00")) == (
        t("2026-12-04T22:00:00"), t("2026-12-05T04:00:00"))
