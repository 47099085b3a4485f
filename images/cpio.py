"""The newc cpio writer the initramfs images are packed with.

Entries are root-owned, sorted (directories before their contents) and
carry ``SOURCE_DATE_EPOCH`` as their time, so the same tree always packs to
the same bytes.
"""

from __future__ import annotations

import gzip
import io
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

from images.common import SOURCE_DATE_EPOCH, ZSTD_LEVEL, run


def _cpio_header(name: str, mode: int, size: int, ino: int, nlink: int = 1,
                 rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, nlink, SOURCE_DATE_EPOCH, size, 0, 0, rdev[0], rdev[1],
              len(name) + 1, 0)
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    data = head + name.encode() + b"\0"
    return data + b"\0" * (-len(data) % 4)


def iter_tree(root: Path) -> Iterator[Path]:
    """Every path under root, sorted, directories before their contents."""
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if base != root:
            yield base
        # os.walk lists symlinks to directories with the directories: they
        # are entries of their own (bin -> usr/bin), not trees to descend
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for name in sorted(filenames + links):
            yield base / name


def write_cpio(root: Path, out: io.BufferedIOBase) -> int:
    """A newc archive of ROOT with root-owned entries and fixed times (the
    kernel's initramfs format).  Returns the number of entries."""
    count = 0
    ino = 1
    for path in iter_tree(root):
        rel = str(path.relative_to(root))
        st = path.lstat()
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(path).encode()
            out.write(_cpio_header(rel, mode, len(target), ino))
            out.write(target + b"\0" * (-len(target) % 4))
        elif stat.S_ISREG(mode):
            data = path.read_bytes()
            out.write(_cpio_header(rel, mode, len(data), ino))
            out.write(data + b"\0" * (-len(data) % 4))
        elif stat.S_ISDIR(mode):
            out.write(_cpio_header(rel, mode, 0, ino, nlink=2))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            out.write(_cpio_header(rel, mode, 0, ino,
                                   rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))))
        else:
            continue   # sockets, fifos: nothing an initramfs needs
        ino += 1
        count += 1
    out.write(_cpio_header("TRAILER!!!", 0, 0, 0, nlink=1))
    return count


def pack_initramfs(root: Path, dest: Path, compressor: str = "zstd") -> None:
    tmp = dest.with_suffix(".cpio.tmp")
    with tmp.open("wb") as fh:
        write_cpio(root, fh)  # type: ignore[arg-type]
    if compressor == "zstd":
        run(["zstd", "-q", "-f", f"-{ZSTD_LEVEL}", "-T0", str(tmp), "-o", str(dest)])
    else:
        with tmp.open("rb") as src, gzip.GzipFile(dest, "wb", mtime=SOURCE_DATE_EPOCH) as gz:
            shutil.copyfileobj(src, gz)
    tmp.unlink()


def set_times(root: Path) -> None:
    """Every entry under ``root`` (symlinks themselves) dated SOURCE_DATE_EPOCH."""
    for path in iter_tree(root):
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)
