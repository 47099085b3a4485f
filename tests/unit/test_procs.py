"""Process liveness (:func:`lpmos.procs.pid_alive`) on real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from lpmos.procs import pid_alive


def _state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def test_a_running_process_is_alive() -> None:
    assert pid_alive(os.getpid())
    assert pid_alive(1)      # init: another user's process unless the tests run as root
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        assert pid_alive(child.pid)
    finally:
        child.kill()
        child.wait()


def test_an_exited_child_not_yet_reaped_is_a_zombie_and_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        deadline = time.monotonic() + 10
        while _state(child.pid) != "Z":     # not child.poll(): that would reap it
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert not pid_alive(child.pid)
    finally:
        child.wait()


def test_a_reaped_child_is_dead() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    # its PID could be reused at once only after the whole PID space wrapped
    assert not pid_alive(child.pid)
