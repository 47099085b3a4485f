"""The boot storm runs end to end on a tiny input and prints its table
(no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench.storm import make_machines, py_spy_report

REPO = Path(__file__).resolve().parent.parent.parent


def test_machines_have_distinct_identities_on_loopback() -> None:
    machines = make_machines(600)
    assert len({m.mac for m in machines}) == 600
    assert len({m.ip for m in machines}) == 600
    assert len({m.sn for m in machines}) == 600
    assert all(m.ip.startswith("127.1.") for m in machines)


def test_py_spy_report_ranks_functions(tmp_path: Path) -> None:
    raw = tmp_path / "raw.txt"
    raw.write_text("run (a.py:1);poll (w.py:9) 30\nrun (a.py:1);render (r.py:3) 10\n")
    report = py_spy_report(raw)
    assert "40 samples" in report
    assert report.index("poll (w.py)") < report.index("render (r.py)")
    assert "100.0%  run (a.py)" in report


@pytest.mark.slow
def test_storm_quick_boots_every_machine_and_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "storm.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.storm", "--quick", "--machines", "5", "--events", "4",
         "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("Boot storm", "machines succeeded", "5/5", "total time", "slowest machine",
                   "etcd write transactions per machine", "peak memory (VmHWM) node",
                   "tasks succeeded in etcd: 5/5", "etcd writes per machine by key kind"):
        assert needle in text, needle
    data = json.loads(out.read_text())
    summary = data["summary"]
    assert summary["succeeded"] == 5 and summary["failed"] == 0
    assert summary["tasks_succeeded_in_etcd"] == 5
    assert summary["etcd"]["revisions"] > 0
    assert summary["etcd_writes_by_kind"]["key_writes"]["task"] >= 5 * 3   # claim, state, end
    assert all(v > 0 for v in summary["vmhwm_mib"].values())
    assert summary["node"]["lpmos_tftp_bytes_total"] > 0
