"""The console fan-out benchmark runs on a tiny input and prints its table
(no speed is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ws_fanout_bench_runs_tiny(tmp_path: Path) -> None:
    out = tmp_path / "ws.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.ws_fanout_bench", "--clients", "3", "--writes", "2",
         "--reps", "1", "--interval", "0.01", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "delivery_p99_ms" in proc.stdout and "lost deliveries" in proc.stdout
    data = json.loads(out.read_text())
    assert data["median"]["delivered"] == 6 and data["median"]["lost"] == 0
