"""The image delivery bench's quick mode against a real node (on a real
etcd) and Debian's nginx: every client gets the whole file (sha256
checked, some after a drop and a Range resume), from both servers, with
no error, and the report carries the ratios.  No speed is asserted: that
is what the benchmark itself reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (shutil.which("nginx") or Path("/usr/sbin/nginx").exists()),
                    reason="needs nginx-light (scripts/setup.sh system)")
def test_image_bench_quick_has_ratios_and_no_errors(tmp_path: Path) -> None:
    out = tmp_path / "image.json"
    result = subprocess.run([sys.executable, "-m", "bench.image_bench", "--quick",
                             "--json", str(out)], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    text = result.stdout.decode()
    assert "throughput ours/nginx" in text and "spread p99/p50" in text
    assert f"results: {out}" in text
    report = json.loads(out.read_text())
    assert report["verify"] == "sha256" and report["clients"] == [4, 8]
    rounds = report["rounds"]
    assert sorted({(r["server"], r["clients"]) for r in rounds}) == [
        ("nginx", 4), ("nginx", 8), ("ours", 4), ("ours", 8)]
    assert len(rounds) == 2 * 2 * report["rounds_per_n"]
    for r in rounds:
        assert r["errors"] == 0, r["error_samples"]
        assert r["resumed"] >= 1                   # someone dropped and resumed with Range
        assert r["bytes"] >= r["clients"] * report["size"]
        assert r["throughput_gib_s"] > 0 and r["spread_p99_p50"] >= 1.0
        assert r["rss_peak_kib"] >= r["rss_before_kib"] > 0
    # the order alternates between the servers over rounds
    firsts = [rounds[i]["server"] for i in range(0, len(rounds), 2)]
    assert firsts[:2] == ["ours", "nginx"]
    for n, entry in report["summary"]["per_clients"].items():
        assert entry["errors"] == 0
        ours = entry["ours_gib_s"]
        nginx = entry["nginx_gib_s"]
        assert entry["throughput_ratio"] == [round(o / g, 3) for o, g in zip(ours, nginx,
                                                                              strict=True)], n
        assert len(entry["spread_ratio"]) == report["rounds_per_n"]
    assert "node_rss_growth_bytes" in report["summary"]
