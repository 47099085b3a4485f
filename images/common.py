"""What every stage of the image build shares: the paths and fixed inputs,
running a tool, logging, the cache stamps and publishing an artifact.

A stage's cache key is :func:`key_of` its inputs; :func:`up_to_date` says
whether ``out/.stamp`` holds that key (and the named outputs exist), and
:func:`publish` stamps a finished temporary directory and renames it into
place, so a half-written artifact never carries a matching stamp.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
CACHE = BUILD / "cache"
#: where the artifacts go (the catalog expects build/; LPMOS_IMAGE_OUT is for
#: side builds, e.g. checking that a rebuild gives the same bytes)
OUT = Path(os.environ.get("LPMOS_IMAGE_OUT", str(BUILD)))

SUITE = "bookworm"
SOURCE_DATE_EPOCH = 1700000000
ARCH = "amd64"
#: zstd level of the live initramfs: higher levels cost more CPU than the
#: download they save in the lab (docs/lab.md has the numbers)
ZSTD_LEVEL = int(os.environ.get("LPMOS_IMAGE_ZSTD_LEVEL", "9"))


class BuildError(RuntimeError):
    """A build step failed; ``str()`` says which and why."""


def log(msg: str) -> None:
    sys.stderr.write(f"[images] {msg}\n")
    sys.stderr.flush()


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found: run 'scripts/setup.sh system'") from None
    except subprocess.CalledProcessError as exc:
        # debootstrap says why on stdout, most tools on stderr
        out = exc.stderr or exc.stdout or b""
        err = out.decode(errors="replace")[-2000:] if isinstance(out, bytes) else str(out)
        raise BuildError(f"{' '.join(cmd[:4])}... failed with exit {exc.returncode}\n"
                         f"{err}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(paths: Iterable[Path], root: Path) -> str:
    """sha256 over the relative names and contents of the given files."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def derived_uuid(seed: str, what: str) -> str:
    """A version-4-shaped GUID (upper case) derived from ``seed`` and
    ``what``: the same build inputs give the same disk and file system ids."""
    h = hashlib.sha256(f"{seed}:{what}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}".upper()


def key_of(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, key: str, outputs: Iterable[str] = ()) -> bool:
    stamp = out / ".stamp"
    try:
        if stamp.read_text().strip() != key:
            return False
    except OSError:
        return False
    return all((out / name).exists() for name in outputs)


def write_stamp(out: Path, key: str) -> None:
    (out / ".stamp").write_text(key + "\n")


def copy_overlay(src: Path, root: Path) -> None:
    """Copy every file under ``src`` to the same place under ``root``: mode
    0755 when executable, else 0644 (times are fixed later, for the whole
    tree)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        dest = root / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty directory (whatever was there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(tmp_out: Path, out: Path, key: str) -> None:
    """Stamp ``tmp_out`` with ``key`` and put it in the place of ``out``: a
    half-written artifact never carries a stamp that matches."""
    write_stamp(tmp_out, key)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


def code_digest() -> str:
    """sha256 over the build's own code (images/*.py): part of every image's
    cache key, so a change to how an image is made rebuilds it."""
    return tree_digest(HERE.glob("*.py"), HERE)
