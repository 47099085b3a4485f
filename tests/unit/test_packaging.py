"""The agent installs alone: its code imports no server dependency, and the
``agent`` extra names only what the agent needs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"flask", "flask_sock", "grpc", "pyetcd", "google", "scapy", "jinja2", "yaml",
               "httptools", "gunicorn", "werkzeug", "prometheus_client"}


def test_agent_extra_is_psutil_pyudev_and_zstandard_only() -> None:
    # psutil and pyudev: the inventory; zstandard: the .raw.zst image decoder
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    names = sorted(d.split(">")[0].split("=")[0].strip() for d in
                   project["optional-dependencies"]["agent"])
    assert names == ["psutil", "pyudev", "zstandard"]


def test_scapy_is_for_tests_and_the_bench_only() -> None:
    """No service imports scapy: it is in the ``dev`` extra, not ``server``."""
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    assert not any(d.startswith("scapy") for d in extras["server"])
    assert any(d.startswith("scapy") for d in extras["dev"])
    users = subprocess.run(["grep", "-rlE", "^(import scapy|from scapy)", "lpmos", "bootsvc",
                            "agent", "web", "lab", "images"], cwd=REPO, capture_output=True,
                           text=True, timeout=30, check=False).stdout.split()
    assert users == [], users


def test_agent_modules_import_no_server_dependency() -> None:
    code = (
        "import importlib, pkgutil, sys, agent, lpmos.models, lpmos.states, lpmos.config;"
        "mods = pkgutil.walk_packages(agent.__path__, 'agent.');"
        "[importlib.import_module(m.name) for m in mods];"
        "print(' '.join(sorted({n.split('.')[0] for n in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    loaded = set(out.stdout.split())
    assert not (loaded & SERVER_ONLY), f"the agent pulled in {sorted(loaded & SERVER_ONLY)}"


def _versions_note(tmp_path: Path, version: str) -> str:
    """Run ``setup.sh versions`` with a dpkg-query that reports ``version``
    for every package."""
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    (fake / "dpkg-query").write_text(f"#!/bin/sh\nprintf '%s' '{version}'\n")
    (fake / "dpkg-query").chmod(0o755)
    done = subprocess.run(["bash", str(REPO / "scripts" / "setup.sh"), "versions"],
                          capture_output=True, text=True, check=True, timeout=30,
                          env={"PATH": f"{fake}:/usr/bin:/bin"})
    return done.stderr


def test_setup_names_a_package_whose_version_differs_from_the_checked_one(
        tmp_path: Path) -> None:
    text = (REPO / "scripts" / "setup.sh").read_text()
    checked = text.split("CHECKED_VERSIONS=(", 1)[1].split(")", 1)[0]
    ovmf = next(line.strip().strip('"') for line in checked.splitlines()
                if line.strip().startswith('"ovmf '))
    note = _versions_note(tmp_path, "9999-new")
    assert f"setup: note: ovmf is 9999-new; the lab and tests were last checked with " \
           f"{ovmf.split(' ', 1)[1]}" in note
    assert "not pinned" in note
    # the checked version itself says nothing about ovmf
    assert "ovmf" not in _versions_note(tmp_path, ovmf.split(" ", 1)[1])
