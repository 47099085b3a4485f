"""The Vagrantfile of the libvirt lab passes ``vagrant validate`` (with the
vagrant-libvirt plugin from Debian), and validation does catch a wrong
provider setting, so the pass means something."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _validate(project: Path, home: Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, VAGRANT_HOME=str(home), VAGRANT_CWD=str(project),
               VAGRANT_DEFAULT_PROVIDER="libvirt", VAGRANT_CHECKPOINT_DISABLE="1")
    return subprocess.run(["vagrant", "validate"], cwd=project, env=env, capture_output=True,
                          text=True, timeout=180, check=False)


def test_vagrantfile_validates_with_libvirt_provider(tmp_path: Path) -> None:
    if shutil.which("vagrant") is None:
        pytest.fail("vagrant missing: run 'scripts/setup.sh system' (Debian's vagrant and "
                    "vagrant-libvirt)")
    good = tmp_path / "good"
    good.mkdir()
    shutil.copy(REPO / "Vagrantfile", good / "Vagrantfile")
    done = _validate(good, tmp_path / "home")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout

    bad = tmp_path / "bad"
    bad.mkdir()
    text = (REPO / "Vagrantfile").read_text()
    assert "lv.cpus = 1" in text
    (bad / "Vagrantfile").write_text(text.replace("lv.cpus = 1", "lv.cpuz = 1"))
    done = _validate(bad, tmp_path / "home")
    assert done.returncode != 0
    assert "cpuz" in done.stdout + done.stderr
