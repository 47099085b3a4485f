"""The spool: durable, ordered, strictly increasing seq across restarts, bounded."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from agent.spool import SEQ_BLOCK, Spool, SpoolCorrupt
from lpmos.metrics import Registry


def test_append_pending_ack_in_order(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for i in range(5):
        spool.append(kind="progress", percent=float(i * 10))
    pending = spool.pending()
    assert [e["seq"] for e in pending] == [0, 1, 2, 3, 4]
    assert [e["percent"] for e in pending] == [0, 10, 20, 30, 40]
    assert spool.ack(["agent:0", "agent:1", "other:2", "agent:x"]) == 2
    assert [e["seq"] for e in spool.pending()] == [2, 3, 4]
    assert spool.ack(["agent:0"]) == 0          # acking twice is harmless
    assert len(spool) == 3


def test_restart_keeps_pending_and_never_reuses_seq(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    for _ in range(3):
        spool.append(kind="log", message="x")
    spool.ack(["agent:0", "agent:1", "agent:2"])       # all acked: nothing pending
    again = Spool(tmp_path)
    ev = again.append(kind="log", message="after restart")
    assert ev is not None and ev.seq >= 3
    third = Spool(tmp_path)
    assert [e["message"] for e in third.pending()] == ["after restart"]
    assert third.append(kind="log", message="y").seq > ev.seq


def test_seq_survives_a_killed_process(tmp_path: Path) -> None:
    """A process that appends and dies with os._exit (no cleanup) loses nothing."""
    code = ("import os,sys; from pathlib import Path; from agent.spool import Spool\n"
            "s = Spool(Path(sys.argv[1]))\n"
            "[s.append(kind='progress', percent=1.0) for _ in range(70)]\n"
            "os._exit(0)\n")
    for _ in range(2):
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=60,
                       cwd=Path(__file__).resolve().parent.parent.parent)
    seqs = [e["seq"] for e in Spool(tmp_path).pending(1000)]
    assert len(seqs) == 140 and seqs == sorted(set(seqs))
    assert seqs[70] >= 70                       # second run continued past the first
    assert int((tmp_path / "seq").read_text()) % SEQ_BLOCK == 0


def test_events_are_written_before_append_returns(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    ev = spool.append(kind="state", status="installing", message="go")
    data = json.loads((tmp_path / "events" / f"{ev.seq:016d}.json").read_text())
    assert data["status"] == "installing" and data["source"] == "agent"
    assert stat.S_IMODE(os.stat(tmp_path).st_mode) == 0o700


def test_bounded_drops_progress_keeps_state(tmp_path: Path) -> None:
    metrics = Registry()
    spool = Spool(tmp_path, max_events=3, metrics=metrics)
    for _ in range(3):
        assert spool.append(kind="progress", percent=1.0) is not None
    assert spool.append(kind="progress", percent=2.0) is None
    assert spool.append(kind="log", message="still fits under 2x") is not None
    assert spool.append(kind="state", status="failed", message="kept") is not None
    assert metrics.get("agent_spool_dropped_total", reason="full", kind="progress") == 1
    assert len(spool) == 5


def test_corrupt_event_is_set_aside(tmp_path: Path) -> None:
    metrics = Registry()
    spool = Spool(tmp_path, metrics=metrics)
    a = spool.append(kind="log", message="a")
    spool.append(kind="log", message="b")
    (tmp_path / "events" / f"{a.seq:016d}.json").write_text("{not json")
    assert [e["message"] for e in spool.pending()] == ["b"]
    assert (tmp_path / "events" / f"{a.seq:016d}.bad").exists()
    assert metrics.get("agent_spool_dropped_total", reason="corrupt", kind="unknown") == 1


def test_invalid_event_is_refused_at_append(tmp_path: Path) -> None:
    from lpmos.models import ValidationError
    spool = Spool(tmp_path)
    with pytest.raises(ValidationError):
        spool.append(kind="state", status="rebooted")
    assert len(spool) == 0


def test_corrupt_seq_file_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "seq").write_text("many")
    with pytest.raises(SpoolCorrupt):
        Spool(tmp_path)


def test_token_file_mode_0600(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    assert spool.load_token() is None
    spool.save_token("s3cret")
    assert stat.S_IMODE(os.stat(tmp_path / "token").st_mode) == 0o600
    assert Spool(tmp_path).load_token() == "s3cret"


def test_journal_keeps_every_event_across_restarts(tmp_path: Path) -> None:
    spool = Spool(tmp_path)
    spool.append(kind="log", message="one")
    spool.ack(["agent:0"])
    Spool(tmp_path).append(kind="log", message="two")
    assert [e["message"] for e in Spool(tmp_path).journal()] == ["one", "two"]


def test_journal_healed_after_a_crash_between_spool_and_journal(tmp_path) -> None:
    """An event spooled durably but not journaled (killed in between) is
    journaled when the spool is opened again; a cut journal line is ended."""
    from agent.spool import Spool

    spool = Spool(tmp_path)
    first = spool.append(kind="progress", message="one", percent=1)
    second = spool.append(kind="progress", message="two", percent=2)
    journal = tmp_path / "journal.jsonl"
    lines = journal.read_bytes().splitlines()
    # simulate the crash: the second event's journal line never made it, and
    # a later write was cut short
    journal.write_bytes(lines[0] + b"\n" + b'{"cut')
    reopened = Spool(tmp_path)
    seqs = [e["seq"] for e in reopened.journal()]
    assert seqs == [first.seq, second.seq]
    assert journal.read_bytes().endswith(b"\n")
    third = reopened.append(kind="progress", message="three", percent=3)
    assert [e["seq"] for e in reopened.journal()] == [first.seq, second.seq, third.seq]
