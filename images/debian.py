"""Debian packages as build inputs: the configured mirror, what apt would
install, downloading and unpacking a .deb, an installed package's version."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from images.common import ARCH, CACHE, SUITE, BuildError, log, run


def debian_mirror() -> str:
    """The mirror apt is configured with (``LPMOS_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("LPMOS_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)\s+" + SUITE, text, re.M)
        if m:
            return m.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


def apt_candidate(package: str) -> tuple[str, str]:
    """(package, version) apt would install; follows a metapackage's first
    versioned dependency (``linux-image-amd64`` → ``linux-image-6.1.0-NN-amd64``)."""
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                         capture_output=True, text=True, check=False).stdout
    if not out.strip():
        run(["apt-get", "update", "-q"], capture_output=True)
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                             capture_output=True, text=True, check=False).stdout
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", out, re.M))
    if "Version" not in fields:
        raise BuildError(f"apt knows no package {package}: check /etc/apt/sources.list*")
    return package, fields["Version"]


def fetch_deb(package: str) -> tuple[Path, str]:
    """Download one package with ``apt-get download`` into the cache (once)."""
    name, version = apt_candidate(package)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    safe_version = version.replace(":", "%3a")
    path = debs / f"{name}_{safe_version}_{ARCH}.deb"
    if not path.exists():
        found = list(debs.glob(f"{name}_*{version.split(':')[-1]}_*.deb"))
        if found:
            return found[0], version
        log(f"downloading {name} {version}")
        os.chmod(debs, 0o777)   # noqa: S103  apt-get download drops privileges to _apt
        run(["apt-get", "download", "-q", f"{name}={version}"], cwd=debs, capture_output=True)
        found = list(debs.glob(f"{name}_*.deb"))
        if not found:
            raise BuildError(f"apt-get download {name} left no .deb in {debs}")
        return sorted(found)[-1], version
    return path, version


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])


def read_package_version(package: str) -> str:
    """The installed version of a Debian package ("" when it is not installed)."""
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, check=False).stdout
