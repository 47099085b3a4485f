"""The image write benchmark runs on a tiny generated image and prints its
table; ours and the reference wrote the same disk (the bench checks it).
No speed is asserted: that is what the benchmark itself reports."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not all(shutil.which(t) for t in ("qemu-img", "zstd", "sfdisk")),
                    reason="needs qemu-utils, zstd and fdisk (scripts/setup.sh system)")
def test_image_write_bench_quick_prints_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "iw.json"
    result = subprocess.run([sys.executable, "-m", "bench.image_write_bench", "--quick",
                             "--json", str(out)], cwd=REPO, capture_output=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    text = result.stdout.decode()
    assert "qemu-img convert" in text and "zstd -dc | dd" in text and "ratio" in text
    report = json.loads(out.read_text())
    assert [r["format"] for r in report["rows"]] == ["raw", "qcow2", "raw.zst"]
    for row in report["rows"]:
        assert row["ours_seconds"] > 0 and row["reference_seconds"] > 0
        assert row["ratio"] == pytest.approx(row["reference_seconds"] / row["ours_seconds"])
        assert row["verified_ratio"] == pytest.approx(
            row["verified_reference_seconds"] / row["ours_seconds"])
