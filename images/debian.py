"""Debian packages as build inputs: the configured mirror, what apt would
install, downloading and unpacking a .deb, an installed package's version;
packages of another architecture from the mirror's verified index."""

from __future__ import annotations

import lzma
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

from images.common import ARCH, CACHE, SUITE, BuildError, log, run, sha256_file


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


def unpack_deb_into_root(deb: Path, root: Path) -> None:
    """Unpack ``deb`` over a root file system as dpkg would: the merged-/usr
    links (``bin`` -> ``usr/bin``...) stay links (``dpkg-deb -x`` would
    replace them with directories).  No maintainer script runs."""
    with subprocess.Popen(["dpkg-deb", "--fsys-tarfile", str(deb)],
                          stdout=subprocess.PIPE) as fsys:
        done = subprocess.run(["tar", "-x", "--keep-directory-symlink", "-C", str(root)],
                              stdin=fsys.stdout, capture_output=True, check=False)
    if fsys.returncode != 0 or done.returncode != 0:
        raise BuildError(f"unpacking {deb.name} into {root} failed: "
                         f"{done.stderr.decode(errors='replace')[-500:]}")


def read_package_version(package: str) -> str:
    """The installed version of a Debian package ("" when it is not installed)."""
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, check=False).stdout


# --- packages of another architecture (arm64 on an amd64 build host) ----------------------
#
# The host's apt knows only its own architecture (no ``dpkg
# --add-architecture``: the build never changes the host's package set), so a
# foreign package comes from the mirror's own index: InRelease verified with
# gpgv against Debian's archive keyring, the Packages.xz it names checked by
# its sha256, each .deb checked against the index's sha256.  Everything goes
# under CACHE/debs-<arch>, apart from the host's CACHE/debs.

#: Debian's keyring that signs the archive (debian-archive-keyring)
ARCHIVE_KEYRING = Path("/usr/share/keyrings/debian-archive-keyring.gpg")
#: how long a downloaded index is used before it is fetched again
INDEX_MAX_AGE = 24 * 3600


def foreign_dir(arch: str) -> Path:
    """Where the packages and the index of ``arch`` are cached."""
    if not re.fullmatch(r"[a-z0-9]+", arch) or arch == ARCH:
        raise BuildError(f"foreign architecture {arch!r}: a Debian name other than {ARCH}")
    return CACHE / f"debs-{arch}"


def _download(url: str, dest: Path) -> None:
    """``url`` into ``dest`` (through a temporary name, so a cut download
    never looks finished)."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=60) as resp, tmp.open("wb") as fh:  # noqa: S310
            shutil.copyfileobj(resp, fh, 1 << 20)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise BuildError(f"cannot download {url}: {exc} (set LPMOS_DEBIAN_MIRROR?)") from None
    tmp.rename(dest)


def parse_release_sha256(text: str, name: str) -> tuple[str, int]:
    """(sha256, size) of ``name`` in a Release file's SHA256 section."""
    section = text.partition("\nSHA256:\n")[2]
    for line in section.splitlines():
        if not line.startswith(" "):
            break
        fields = line.split()
        if len(fields) == 3 and fields[2] == name:
            return fields[0], int(fields[1])
    raise BuildError(f"the Release file names no {name}")


def parse_packages(text: str) -> dict[str, dict[str, str]]:
    """A Packages index as package name -> its fields (the last stanza of a
    name wins; continuation lines are dropped: no field used here has them)."""
    out: dict[str, dict[str, str]] = {}
    for stanza in text.split("\n\n"):
        fields = dict(re.findall(r"^([A-Za-z0-9-]+): (.*)$", stanza, re.M))
        if "Package" in fields:
            out[fields["Package"]] = fields
    return out


def verified_release(release: Path, where: str) -> str:
    """The text of ``release`` (an InRelease file) that its signature by the
    archive keyring covers.  The hashes must come from this, never from the
    file as downloaded: gpgv also passes a file with unsigned text around
    the signed block, which could carry a forged SHA256 list."""
    signed = release.with_name(release.name + ".verified")
    signed.unlink(missing_ok=True)
    done = subprocess.run(["gpgv", "--keyring", str(ARCHIVE_KEYRING), "--output", str(signed),
                           str(release)], capture_output=True, text=True, check=False)
    if done.returncode != 0 or not signed.exists():
        raise BuildError(f"{where}: bad signature (debian-archive-keyring installed?)\n"
                         f"{done.stderr[-500:]}")
    try:
        return signed.read_text()
    finally:
        signed.unlink()


def foreign_index(arch: str) -> dict[str, dict[str, str]]:
    """The main component's Packages index of ``arch`` for SUITE, verified
    (InRelease signed by the archive keyring, Packages.xz by its sha256) and
    cached for a day."""
    cache = foreign_dir(arch)
    cache.mkdir(parents=True, exist_ok=True)
    packages = cache / f"Packages-{SUITE}.xz"
    fresh = packages.exists() and time.time() - packages.stat().st_mtime < INDEX_MAX_AGE
    if not fresh:
        mirror = debian_mirror()
        release = cache / f"InRelease-{SUITE}"
        _download(f"{mirror}/dists/{SUITE}/InRelease", release)
        signed = verified_release(release, f"{mirror}/dists/{SUITE}/InRelease")
        name = f"main/binary-{arch}/Packages.xz"
        want, _size = parse_release_sha256(signed, name)
        tmp = cache / "Packages.xz.new"
        _download(f"{mirror}/dists/{SUITE}/{name}", tmp)
        if sha256_file(tmp) != want:
            tmp.unlink()
            raise BuildError(f"{name} from {mirror} does not match its InRelease sha256")
        tmp.rename(packages)
        log(f"{arch} package index of {SUITE} from {mirror}")
    return parse_packages(lzma.decompress(packages.read_bytes()).decode())


def foreign_candidate(package: str, arch: str) -> dict[str, str]:
    """The index record of ``package`` for ``arch`` (Version, Filename,
    SHA256, Depends...)."""
    record = foreign_index(arch).get(package)
    if record is None or "Filename" not in record or "SHA256" not in record:
        raise BuildError(f"{SUITE} main has no {arch} package {package}")
    return record


def fetch_foreign_deb(package: str, arch: str) -> tuple[Path, str]:
    """Download ``package`` of ``arch`` into CACHE/debs-<arch> (once),
    checked against the index's sha256; (path, version)."""
    record = foreign_candidate(package, arch)
    path = foreign_dir(arch) / Path(record["Filename"]).name
    if not path.exists():
        log(f"downloading {package} {record['Version']} ({arch})")
        tmp = path.with_name(path.name + ".new")
        _download(f"{debian_mirror()}/{record['Filename']}", tmp)
        if sha256_file(tmp) != record["SHA256"]:
            tmp.unlink()
            raise BuildError(f"{path.name}: sha256 does not match the {arch} index")
        tmp.rename(path)
    return path, record["Version"]


def fetch_package(package: str, arch: str = ARCH) -> tuple[Path, str]:
    """The .deb of ``package`` for the Debian architecture ``arch``: apt's
    for the host's own, the mirror's index for another."""
    return fetch_deb(package) if arch == ARCH else fetch_foreign_deb(package, arch)
