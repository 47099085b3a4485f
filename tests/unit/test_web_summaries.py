"""The console's pure row and stats helpers as tables."""

from __future__ import annotations

from typing import Any

import pytest

from lpmos.models import Task
from web.summaries import diff_summary, sort_key, task_stats

HOUR = 3600.0
NOW = 1000 * HOUR + 1000.0


def _task(sn: str, status: str, *, idc: str = "dc1", started: float = 0.0,
          finished: float = 0.0, created: float = 0.0) -> Task:
    return Task(idc=idc, sn=sn, mac="52:54:00:00:00:01", os_type="ubuntu", status=status,
                started_at=started, finished_at=finished, created_at=created)


def test_task_stats_counts_hours_and_median() -> None:
    tasks = [
        _task("a", "succeeded", started=NOW - 700, finished=NOW - 100),       # this hour
        _task("b", "succeeded", started=NOW - 2 * HOUR - 300, finished=NOW - 2 * HOUR),
        _task("c", "failed", finished=NOW - HOUR),
        _task("d", "failed", finished=NOW - 30 * HOUR),                      # too old
        _task("e", "installing", idc="dc2", started=NOW - 50),
        _task("f", "succeeded", finished=NOW - 5),                           # not started
    ]
    counts = {("dc1", "succeeded"): 3, ("dc1", "failed"): 2, ("dc2", "installing"): 1}
    stats = task_stats(counts, tasks, NOW)
    assert stats["total"] == 6
    assert stats["per_state"] == {"succeeded": 3, "failed": 2, "installing": 1}
    assert stats["per_idc"] == {"dc1": {"succeeded": 3, "failed": 2},
                                "dc2": {"installing": 1}}
    hours = stats["installs_per_hour"]
    assert len(hours) == 24
    assert hours[-1] == {"hour_start": 1000 * HOUR, "succeeded": 2, "failed": 0}
    assert hours[-2]["failed"] == 1 and hours[-3]["succeeded"] == 1
    assert sum(h["succeeded"] + h["failed"] for h in hours) == 4
    assert stats["median_install_seconds"] == 450.0
    assert stats["installs_measured"] == 2


def test_task_stats_empty() -> None:
    stats = task_stats({}, [], NOW)
    assert stats["total"] == 0 and stats["median_install_seconds"] is None
    assert stats["installs_measured"] == 0


@pytest.mark.parametrize(("before", "after", "diff"), [
    (None, {"idc": "dc1", "sn": "a", "revision": 2, "status": "booting"},
     {"idc": "dc1", "sn": "a", "revision": 2, "status": "booting"}),
    ({"idc": "dc1", "sn": "a", "revision": 1, "status": "approved", "notes": "x"},
     {"idc": "dc1", "sn": "a", "revision": 2, "status": "booting", "notes": "x"},
     {"idc": "dc1", "sn": "a", "revision": 2, "status": "booting"}),
    ({"idc": "dc1", "sn": "a", "revision": 2, "notes": "x"},
     {"idc": "dc1", "sn": "a", "revision": 2, "notes": "x"},
     {"idc": "dc1", "sn": "a", "revision": 2}),
])
def test_diff_summary_keeps_identity(before: dict[str, Any] | None, after: dict[str, Any],
                                     diff: dict[str, Any]) -> None:
    assert diff_summary(before, after) == diff


def test_sort_key_newest_first_then_idc_and_sn() -> None:
    tasks = [_task("b", "pending", created=1.0), _task("a", "pending", created=2.0),
             _task("a", "pending", idc="dc0", created=1.0)]
    assert [(t.idc, t.sn) for t in sorted(tasks, key=sort_key)] == [
        ("dc1", "a"), ("dc0", "a"), ("dc1", "b")]
