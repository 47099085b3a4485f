"""Coverage-guided fuzzing with atheris, in addition to hypothesis, with a
bounded budget per target (see atheris_codecs.py).  Skipped where atheris is
not installed (it ships wheels for x86_64 Linux only)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("atheris")

HARNESS = Path(__file__).with_name("atheris_codecs.py")
SECONDS = int(os.environ.get("LPMOS_ATHERIS_SECONDS", "8"))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["agent", "web_json", "filters"])
def test_atheris_finds_no_crash(target: str, tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "seed").write_bytes(b'{"sn": "A1", "macs": ["52:54:00:00:00:01"], "events": '
                                  b'[{"source": "agent", "seq": 1, "kind": "state"}]}')
    proc = subprocess.run(
        [sys.executable, str(HARNESS), target, f"-max_total_time={SECONDS}",
         "-runs=2000000", "-rss_limit_mb=1024", "-max_len=4096", str(corpus)],
        capture_output=True, text=True, timeout=SECONDS + 60, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Done" in out, out[-3000:]
    runs = int(out.rsplit("Done ", 1)[1].split(" ", 1)[0])
    assert runs > 1000, out[-1000:]      # it really ran
