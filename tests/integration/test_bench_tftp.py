"""The TFTP benchmark runs end to end on a tiny input and prints its table.
No speed is asserted: that is what the benchmark itself reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not Path("/usr/sbin/in.tftpd").exists(), reason="needs tftpd-hpa")
def test_tftp_bench_quick_prints_table_and_json(tmp_path):
    out = tmp_path / "tftp.json"
    result = subprocess.run([sys.executable, "-m", "bench.tftp_bench", "--quick", "--json",
                             str(out)], cwd=REPO, capture_output=True, timeout=180,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = result.stdout.decode()
    assert "ours s" in text and "tftpd-hpa/ours" in text
    report = json.loads(out.read_text())
    assert report["rows"] and "ours" in report["servers"]
    for row in report["rows"]:
        for kind in report["servers"]:
            assert all(run["failed"] == 0 for run in row["runs"][kind]), (kind, row["case"])
            assert row["median_seconds"][kind] > 0
    if os.geteuid() == 0:
        assert "dnsmasq" in report["servers"]
        assert report["saturation"]["more_generators_ok"] > 0
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, check=False)
    assert b"lpmos-tftpb-" not in netns.stdout    # the namespace was removed


def test_bench_sandbox_stops_every_process_it_started():
    """Every server the bench started is gone when it ends (a leftover
    server would also skew the next run's numbers)."""
    sys.path.insert(0, str(REPO))
    from bench.tftp_bench import Sandbox

    with Sandbox(use_netns=False) as sandbox:
        procs = [sandbox.popen(["sleep", "30"]) for _ in range(3)]
    assert [p.poll() for p in procs] == [-15, -15, -15]     # SIGTERM, all three
