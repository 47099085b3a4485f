"""The lab runner's view of a QEMU process through QMP, on a real QEMU (SeaBIOS with
no disk: it starts in a blink)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lab.runner import VM


@pytest.mark.parametrize(("flags", "status"), [(["-S"], "prelaunch"), ([], "running")])
def test_qemu_state_reports_the_run_state_and_the_cpu(tmp_path: Path, flags: list[str],
                                                       status: str) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.fail("qemu-system-x86_64 missing: run 'scripts/setup.sh system'")
    vm = VM("probe", "bios", "52:54:00:00:00:01", "S1", "u", tmp_path)
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "tcg", "-machine", "pc", "-nographic", "-m", "16",
         "-monitor", "none", "-serial", "none", "-net", "none",
         "-qmp", f"unix:{vm.qmp_socket},server=on,wait=off", *flags],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not vm.qmp_socket.exists():
            assert proc.poll() is None, "QEMU exited at start"
            assert time.monotonic() < deadline, "no QMP socket"
            time.sleep(0.05)
        state = vm.qemu_state()
        assert state.startswith(f"QEMU: status {status}, "), state
        assert "CPU0 " in state and ("RIP=" in state or "EIP=" in state), state
    finally:
        proc.kill()
        proc.wait(10)
    assert vm.qemu_state().startswith("(QMP unavailable: ")
