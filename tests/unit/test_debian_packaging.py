"""The Debian packaging's sources agree with the project (fast checks; the
package itself is built, installed and run by
tests/integration/test_debian_package.py)."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from lpmos.catalog import load_catalog

REPO = Path(__file__).resolve().parents[2]
DEBIAN = REPO / "packaging" / "debian"


def test_changelog_version_is_the_projects() -> None:
    first = (DEBIAN / "changelog").read_text().splitlines()[0]
    version = re.fullmatch(r"lpmos \(([^)]+)\) \S+; urgency=\w+", first)
    assert version is not None, first
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert version.group(1) == project["version"]


def test_control_depends_on_etcd_ipxe_and_the_signed_loaders() -> None:
    control = (DEBIAN / "control").read_text()
    depends = control.split("\nDepends:", 1)[1].split("\nRecommends:", 1)[0]
    names = {d.strip().split(" ")[0] for d in depends.split(",")}
    assert {"etcd-server", "ipxe", "shim-signed", "grub-efi-amd64-signed", "adduser"} <= names


@pytest.mark.parametrize(("name", "command"), [("regional.toml", "regional"),
                                               ("control-plane.toml", "control-plane")])
def test_default_config_has_only_known_keys(name: str, command: str) -> None:
    path = REPO / "packaging" / "etc" / name
    tomllib.loads(path.read_text())
    done = subprocess.run([sys.executable, "-m", "lpmos", "config", "show", "--for", command,
                           "--config", str(path)], capture_output=True, text=True, cwd=REPO,
                          timeout=60, check=False)
    assert done.returncode == 0 and "warning" not in done.stderr, done.stderr
    assert re.search(r"^state_dir\s+/var/lib/lpmos\s+\(file ", done.stdout, re.M), done.stdout


def test_default_catalog_loads_with_the_live_image() -> None:
    catalog = load_catalog(REPO / "packaging" / "etc" / "catalog.toml")
    assert list(catalog.images) == ["live"]
    live = catalog.images["live"]
    assert live.kernel == "/var/lib/lpmos/images/live/vmlinuz"
    assert live.initrd == "/var/lib/lpmos/images/live/initrd.img"


def test_units_are_notify_with_a_watchdog_and_run_the_packaged_config() -> None:
    for unit, config in (("lpmos-regional.service", "/etc/lpmos/regional.toml"),
                         ("lpmos-control-plane.service", "/etc/lpmos/control-plane.toml")):
        text = (REPO / "packaging" / "systemd" / unit).read_text()
        assert "\nType=notify\n" in text and "\nNotifyAccess=main\n" in text
        assert "\nWatchdogSec=30s\n" in text and "\nUser=lpmos\n" in text
        assert f"ExecStart=/usr/bin/lpmos {unit[6:-8]} --config {config}\n" in text
    regional = (REPO / "packaging" / "systemd" / "lpmos-regional.service").read_text()
    assert "\nCapabilityBoundingSet=CAP_NET_BIND_SERVICE\n" in regional
    control = (REPO / "packaging" / "systemd" / "lpmos-control-plane.service").read_text()
    assert "\nCapabilityBoundingSet=\n" in control
