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


def test_paired_ratio_and_its_confidence_interval():
    """The ratio per round, their median, the rounds ours won, and the
    95 % interval for the median (order statistics: with 10 pairs, the 2nd
    smallest and 2nd largest, since P(Binomial(10, 1/2) <= 1) = 0.011 and
    P(<= 2) = 0.055)."""
    sys.path.insert(0, str(REPO))
    from bench.tftp_bench import paired

    ours = [{"failed": 0, "seconds": 1.0}] * 10
    theirs = [{"failed": 0, "seconds": s} for s in (0.9, 1.3, 1.1, 1.2, 0.95, 1.05, 1.15,
                                                   1.25, 1.4, 1.0)]
    out = paired(ours, theirs)
    assert out == {"pairs": 10, "median_ratio": 1.125, "ours_faster": 7, "ci95": [0.95, 1.3]}
    # a failed run drops its pair; under 6 pairs there is no 95 % interval
    theirs[0] = {"failed": 3, "seconds": 9.0}
    assert paired(ours[:5], theirs[:5]) == {"pairs": 4, "median_ratio": 1.15,
                                            "ours_faster": 3, "ci95": None}
    assert paired(ours[:6], [{"failed": 0, "seconds": 2.0}] * 6)["ci95"] == [2.0, 2.0]
    assert paired([], []) is None


def test_round_order_puts_every_server_after_every_other_equally_often():
    sys.path.insert(0, str(REPO))
    from collections import Counter

    from bench.tftp_bench import round_order

    servers = ["ours", "tftpd-hpa", "dnsmasq"]
    rounds = [round_order(servers, rep) for rep in range(6)]
    assert all(sorted(r) == sorted(servers) for r in rounds)
    follows = Counter((r[i], r[i + 1]) for r in rounds for i in range(2))
    assert len(follows) == 6 and set(follows.values()) == {2}
    assert Counter(r[0] for r in rounds) == {s: 2 for s in servers}
