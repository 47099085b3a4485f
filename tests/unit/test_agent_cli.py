"""``lpmos agent --once`` is a check a person runs: it gives up on an
unreachable node in seconds, unless told otherwise."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from agent.cli import ONCE_DEADLINE, SETTINGS, _deadline
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.store.embedded import free_port

REPO = Path(__file__).resolve().parents[2]


def test_once_retries_for_seconds_unless_a_deadline_is_given() -> None:
    settings = settings_by_key([COMMON, SETTINGS])
    default = resolve(settings, {}, {}, None)
    assert default["agent.deadline"] > ONCE_DEADLINE          # the install's own
    assert _deadline(default, once=True) == ONCE_DEADLINE
    assert _deadline(default, once=False) == default["agent.deadline"]
    given = resolve(settings, {"agent__deadline": "120"}, {}, None)
    assert _deadline(given, once=True) == 120.0


def test_once_against_a_dead_node_fails_with_one_line(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "lpmos", "agent", "--once", "--server", dead,
                             "--state-dir", str(tmp_path), "--deadline", "2"], cwd=REPO,
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1, result.stderr
    assert "lpmos agent: registration failed" in result.stderr
    assert time.monotonic() - started < 30
