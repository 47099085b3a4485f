"""``lpmos demo`` starts etcd, the control plane and the lab's regional node,
prints the console URL and the demo users, and on Ctrl-C removes everything
(here with no VMs, to stay quick; the VMs are the e2e test's business)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from lpmos.store.embedded import free_port
from tests.lab.conftest import require_lab_host

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.lab, pytest.mark.slow, pytest.mark.netns, pytest.mark.timeout(900)]


def test_demo_prints_console_and_users_and_cleans_up_on_ctrl_c(
        lab_images: dict[str, Path], cloud_image: Path, tmp_path: Path) -> None:
    # the images are built before (the fixtures): the demo's own build of
    # them on a fresh machine takes minutes and is not what this test times
    require_lab_host()
    port = free_port()
    out = tmp_path / "demo.out"
    with out.open("wb") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lpmos", "demo", "--state-dir", str(tmp_path / "state"),
             "--vms", "0", "--listen", f"127.0.0.1:{port}"],
            cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=dict(os.environ, PYTHONPATH=str(REPO)), start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while "LPMOS demo is up" not in out.read_text(errors="replace"):
            assert proc.poll() is None, out.read_text(errors="replace")
            assert time.monotonic() < deadline, out.read_text(errors="replace")
            time.sleep(0.5)
        text = out.read_text(errors="replace")
        assert f"console:       http://127.0.0.1:{port}" in text
        users = dict(re.findall(r"user (\w+)\s+role (\w+)", text))
        assert users == {"viewer": "viewer", "operator": "operator", "approver": "approver",
                         "admin": "admin"}
        namespace = re.search(r"namespace (lpmos-lab-[\d-]+)", text).group(1)  # type: ignore[union-attr]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as resp:
            assert resp.status == 200
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(120) == 0, out.read_text(errors="replace")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert "stopped" in out.read_text(errors="replace")
    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert namespace not in names
