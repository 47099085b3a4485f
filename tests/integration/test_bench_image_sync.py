"""The managed-image distribution bench runs on a small image (16 MiB, one
and two nodes) and prints its table and JSON: ours reached ready on every
node, the curls fetched the same bytes.  No speed is asserted: that is what
the benchmark itself reports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_image_sync_bench_quick_prints_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "is.json"
    result = subprocess.run([sys.executable, "-m", "bench.image_sync_bench", "--quick",
                             "--size-mib", "16", "--json", str(out)], cwd=REPO,
                            capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = result.stdout.decode()
    assert "1 node(s)" in text and "2 node(s)" in text and "ratio curl/ours" in text
    report = json.loads(out.read_text())
    assert report["size"] == 16 << 20
    assert [c["nodes"] for c in report["cases"]] == [1, 2]
    for case in report["cases"]:
        assert case["ours_median"] > 0 and case["curl_median"] > 0
        assert case["curl_sha256_median"] > 0 and case["node_peak_rss_mib"] > 0
