"""The agent installs alone: its code imports no server dependency, and the
``agent`` extra names only what the agent needs."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SERVER_ONLY = {"flask", "flask_sock", "grpc", "pyetcd", "google", "scapy", "jinja2", "yaml",
               "httptools", "gunicorn", "werkzeug"}


def test_agent_extra_is_psutil_and_pyudev_only() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["dependencies"] == []
    names = sorted(d.split(">")[0].split("=")[0].strip() for d in
                   project["optional-dependencies"]["agent"])
    assert names == ["psutil", "pyudev"]


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
