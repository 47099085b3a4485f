"""The node's full install log files (bootsvc.state.install_log) and the node-API
signature (lpmos.nodeapi): no store, no sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from bootsvc.state.install_log import InstallLogs
from lpmos.metrics import Registry
from lpmos.models import ATTEMPT_NODES_KEPT, ProgressEvent, Task
from lpmos.nodeapi import sign, verify


def events(first: int, count: int, source: str = "agent", width: int = 10) -> list[ProgressEvent]:
    return [ProgressEvent(source, seq, kind="log", message=f"{seq:06d} " + "y" * width)
            for seq in range(first, first + count)]


def logs(root: Path, **kw: int) -> InstallLogs:
    return InstallLogs(root, Registry(), **kw)


def test_lines_are_appended_once_even_after_a_restart(tmp_path: Path) -> None:
    first = logs(tmp_path)
    assert first.append("SN-1", 1, events(1, 5)) == 5
    assert first.append("SN-1", 1, events(3, 5)) == 2          # 3..5 written already
    assert first.append("SN-1", 1, [ProgressEvent("agent", 9, kind="progress")]) == 0
    again = logs(tmp_path)                                     # a node restart
    assert again.append("SN-1", 1, events(1, 7)) == 0
    assert again.append("SN-1", 1, events(1, 3, source="installer")) == 3
    found = again.read("SN-1", 1)
    assert found is not None and len(found.lines) == 10 and not found.truncated
    assert found.lines[0] == "[agent] 000001 yyyyyyyyyy"


def test_each_attempt_has_its_own_log_and_old_attempts_go(tmp_path: Path) -> None:
    store = logs(tmp_path, attempts_kept=2)
    for attempt in (1, 2, 3):
        store.append("SN-2", attempt, events(1, 2))
    assert store.read("SN-2", 1) is None                       # only the newest 2 are kept
    assert store.read("SN-2", 2) is not None and store.read("SN-2", 3) is not None
    assert store.append("SN-2", 1, events(10, 1)) == 0         # a late event of a dropped one
    assert store.read("SN-2", 1) is None
    assert store.read("SN-9", 1) is None


def test_size_bound_rotates_and_counts_what_was_dropped(tmp_path: Path) -> None:
    cap = 64 * 1024
    store = logs(tmp_path, max_bytes=cap)
    total = 0
    for batch in range(40):
        store.append("SN-3", 1, events(1 + batch * 25, 25, width=120))
        total += 25
        size = sum(p.stat().st_size for p in (tmp_path / "SN-3").iterdir())
        assert size <= cap + 1024, (batch, size)
    found = store.read("SN-3", 1)
    assert found is not None and found.truncated
    assert found.first_line + len(found.lines) == total
    assert found.lines[-1].startswith(f"[agent] {total:06d}")
    restarted = logs(tmp_path, max_bytes=cap)                  # rotation state survives
    restarted.append("SN-3", 1, events(total + 1, 400, width=120))
    again = restarted.read("SN-3", 1)
    assert again is not None and again.first_line + len(again.lines) == total + 400


def test_a_torn_last_line_is_skipped(tmp_path: Path) -> None:
    store = logs(tmp_path)
    store.append("SN-4", 1, events(1, 3))
    with (tmp_path / "SN-4" / "1.log").open("ab") as fh:
        fh.write(b'{"id": "agent:4", "line": "cut sho')
    found = logs(tmp_path).read("SN-4", 1)
    assert found is not None and len(found.lines) == 3


def test_a_bad_sn_never_becomes_a_path(tmp_path: Path) -> None:
    store = logs(tmp_path / "logs")
    assert store.append("../escape", 1, events(1, 1)) == 0
    assert not (tmp_path / "escape").exists()


def test_the_task_remembers_which_node_served_each_attempt() -> None:
    task = Task(idc="dc1", sn="SN-5", mac="52:54:00:00:00:05", os_type="Lab OS")
    for attempt in range(1, ATTEMPT_NODES_KEPT + 3):
        task.attempt = attempt
        task.served_by(f"node-{attempt % 2}")
    assert task.node_of_attempt(ATTEMPT_NODES_KEPT + 2) == task.claimed_by == "node-0"
    assert task.node_of_attempt(3) == "node-1"
    assert task.node_of_attempt(1) == "" and len(task.attempt_nodes) == ATTEMPT_NODES_KEPT
    back = Task.from_json(task.to_json())
    assert back.attempt_nodes == task.attempt_nodes
    legacy = Task.from_dict({**task.to_dict(), "attempt_nodes": {"x": 1, "7": "node-7"}})
    assert legacy.attempt_nodes == {"7": "node-7"}


KEY = b"k" * 32


@pytest.mark.parametrize(("header", "method", "target", "now", "why"), [
    (sign(KEY, "GET", "/node/v1/logs/A?attempt=1", 1000), "GET", "/node/v1/logs/A?attempt=1",
     1030, ""),
    (None, "GET", "/x", 1000, "missing"),
    ("Bearer abc", "GET", "/x", 1000, "malformed"),
    (sign(KEY, "GET", "/x", 1000) + " ", "GET", "/x", 1000, ""),
    (sign(KEY, "GET", "/x", 1000), "GET", "/x", 1061, "expired"),
    (sign(KEY, "GET", "/x", 1000), "GET", "/x", 939, "expired"),
    (sign(KEY, "GET", "/x", 1000), "POST", "/x", 1000, "bad_signature"),
    (sign(KEY, "GET", "/x", 1000), "GET", "/y", 1000, "bad_signature"),
    (sign(b"o" * 32, "GET", "/x", 1000), "GET", "/x", 1000, "bad_signature"),
])
def test_node_api_signatures(header: str | None, method: str, target: str, now: float,
                             why: str) -> None:
    assert verify(KEY, method, target, header, now) == why
