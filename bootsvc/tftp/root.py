"""The TFTP root: name normalisation, a safe read-only file source, a cache of
hot files, and virtual files generated per request.

Contract (RELIABILITY L5): nothing outside the root is ever opened.  A name
is normalised by :func:`normalize_name` (pure) before it touches the file
system: backslashes are separators, ``.`` and empty components vanish, a
leading ``/`` means the root itself (as tftpd-hpa ``--secure`` and dnsmasq
read it: GRUB asks for ``/grub/grub.cfg``), and ``..``, drive names
(``C:\\x``), NUL and non-printable characters are refused.  The resolved
path must stay under the root after following symlinks, must be a regular
file, and is opened with ``O_NOFOLLOW``.  (The root is the operator's
read-only directory; a local user who can rename things inside it between
our check and our open could still race us, which is why the final open
re-checks the inode it stat-ed.)

Only names that fully match one narrow, anchored pattern reach the virtual
file callback; everything else is a static file or "not found".  The
callback may hand back a future (:class:`ContentPending`) when its answer
needs a thread, and the server answers when it is done.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path

from bootsvc.tftp.settings import TftpSettings
from bootsvc.wire.tftp import ErrorCode, to_netascii

#: Where Debian's ``ipxe`` package puts its builds.
IPXE_DIR = Path("/usr/lib/ipxe")
#: The iPXE builds a TFTP root gets, BIOS and UEFI; missing ones are skipped.
IPXE_FILES = ("undionly.kpxe", "undionly.kkpxe", "ipxe.pxe", "ipxe.efi", "snponly.efi",
              "ipxe.lkrn")
#: The Secure Boot chain (Debian's ``shim-signed`` and ``grub-efi-amd64-signed``):
#: TFTP root name -> the signed file.  shim loads ``grubx64.efi`` (and, when
#: it must ask the user about a key, ``mmx64.efi``) from the directory it was
#: loaded from, so the signed GRUB network image goes in under that name.
SIGNED_LOADERS: dict[str, Path] = {
    "shimx64.efi": Path("/usr/lib/shim/shimx64.efi.signed"),
    "mmx64.efi": Path("/usr/lib/shim/mmx64.efi.signed"),
    "grubx64.efi": Path("/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed"),
    # arm64 UEFI machines (Debian has no arm64 iPXE): the same signed GRUB
    # network image for arm64, from grub-efi-arm64-signed, on an arm64 node;
    # an amd64 node gets it from ``python3 images/build.py arm64`` (README)
    "grubaa64.efi": Path("/usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed"),
}
#: Names generated per request by default: one path component ending in
#: ``.ipxe`` (an iPXE script for clients that fetch one over TFTP).
DEFAULT_VIRTUAL_PATTERN = r"[A-Za-z0-9_-]{1,64}\.ipxe"

MAX_DEPTH = 16
MAX_NAME_CHARS = 255
DEFAULT_CACHE_BYTES = TftpSettings().cache_bytes
DEFAULT_MAX_FILE_BYTES = 1024 * 1024 * 1024

#: ``virtual(name, client)``: the bytes, ``None`` for "not generated here",
#: or a future of either when making them takes a thread (an etcd claim)
VirtualSource = Callable[[str, tuple[str, int]], "bytes | Future[bytes | None] | None"]


class PathRejected(Exception):
    """The name may not be served.  ``reason`` is a metric label, ``code`` the
    TFTP error code to answer with."""

    def __init__(self, reason: str, message: str,
                 code: int = ErrorCode.ACCESS_VIOLATION) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code


class ContentPending(Exception):
    """A virtual file is being made on another thread: ``future`` gives its
    bytes (or ``None``: not found); the server answers once it is done."""

    def __init__(self, name: str, future: Future[bytes | None]) -> None:
        super().__init__(name)
        self.name = name
        self.future = future


class FileNotFound(PathRejected):
    def __init__(self, message: str = "file not found") -> None:
        super().__init__("not_found", message, ErrorCode.FILE_NOT_FOUND)


_DRIVE = re.compile(r"[A-Za-z]:")


def normalize_name(name: str) -> str:
    """The relative POSIX path a client's file name means, or raise
    :class:`PathRejected`.

    ``pxelinux.cfg\\default`` → ``pxelinux.cfg/default``; ``./a//b`` →
    ``a/b``; ``/grub/grub.cfg`` → ``grub/grub.cfg`` (a leading separator
    names the root, never the file system's).  Refused: empty, longer than
    255 characters, NUL or any character outside printable ASCII, a drive
    letter (absolute), any ``..`` component, more than 16 components.
    """
    if not name:
        raise PathRejected("empty_name", "empty file name")
    if len(name) > MAX_NAME_CHARS:
        raise PathRejected("name_too_long", "file name too long")
    if any(not 0x20 <= ord(c) < 0x7F for c in name):
        raise PathRejected("non_printable", "file name has non-printable characters")
    text = name.replace("\\", "/")
    if _DRIVE.match(text):
        raise PathRejected("absolute", "drive names are refused")
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if any(p == ".." for p in parts):
        raise PathRejected("traversal", "'..' is refused")
    if not parts:
        raise PathRejected("empty_name", "empty file name")
    if len(parts) > MAX_DEPTH:
        raise PathRejected("too_deep", "file name too deep")
    return "/".join(parts)


@dataclass(frozen=True)
class FileContent:
    """What a transfer sends: the bytes (already in the transfer mode)."""

    name: str
    data: bytes
    virtual: bool = False


class TftpRoot:
    """Read-only source of files under ``root``, with an LRU cache of hot files.

    Cache entries are keyed by (name, mode) and valid while the file's
    (device, inode, mtime, size) stay the same: every request costs one
    ``stat``; a hit costs no read.  The cache holds at most ``cache_bytes``;
    larger files are served from memory per transfer but not kept.  Files
    over ``max_file_bytes`` are refused.  Thread-safe.
    """

    def __init__(self, root: Path, *, cache_bytes: int = DEFAULT_CACHE_BYTES,
                 max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 virtual: VirtualSource | None = None,
                 virtual_pattern: str = DEFAULT_VIRTUAL_PATTERN) -> None:
        self.root = Path(root)
        self._real_root = os.path.realpath(self.root)
        self.cache_bytes = cache_bytes
        self.max_file_bytes = max_file_bytes
        self._virtual = virtual
        self._virtual_re = re.compile(virtual_pattern)
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, bool], tuple[tuple[int, int, int, int], bytes]] = \
            OrderedDict()
        self._cached_bytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def open(self, name: str, client: tuple[str, int], *, netascii: bool = False) -> FileContent:
        """The content of ``name`` for ``client``, or raise :class:`PathRejected`
        (:class:`FileNotFound` for a missing file)."""
        rel = normalize_name(name)
        if self._virtual is not None and self._virtual_re.fullmatch(rel):
            generated = self._virtual(rel, client)
            if isinstance(generated, Future):
                raise ContentPending(rel, generated)
            if generated is not None:
                return FileContent(rel, to_netascii(generated) if netascii else generated, True)
        return FileContent(rel, self._read_static(rel, netascii))

    def _read_static(self, rel: str, netascii: bool) -> bytes:
        real = os.path.realpath(os.path.join(self._real_root, rel))
        if not real.startswith(self._real_root + os.sep):
            raise PathRejected("outside_root", "access violation")
        try:
            st = os.stat(real)
        except FileNotFoundError:
            raise FileNotFound() from None
        except NotADirectoryError:
            raise FileNotFound() from None
        except OSError:
            raise PathRejected("unreadable", "access violation") from None
        if not stat.S_ISREG(st.st_mode):
            raise PathRejected("not_regular", "not a regular file")
        if st.st_size > self.max_file_bytes:
            raise PathRejected("too_large", "file too large")
        key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            entry = self._cache.get((rel, netascii))
            if entry is not None and entry[0] == key:
                self._cache.move_to_end((rel, netascii))
                self.hits += 1
                return entry[1]
        self.misses += 1
        data = self._read_file(real, st)
        if netascii:
            data = to_netascii(data)
        self._remember((rel, netascii), key, data)
        return data

    @staticmethod
    def _read_file(real: str, st: os.stat_result) -> bytes:
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(real, flags)
        except OSError:
            raise PathRejected("unreadable", "access violation") from None
        try:
            fst = os.fstat(fd)
            if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino) or \
                    not stat.S_ISREG(fst.st_mode):
                raise PathRejected("changed", "access violation")
            chunks = []
            remaining = fst.st_size
            while remaining > 0:
                chunk = os.read(fd, min(remaining, 8 * 1024 * 1024))
                if not chunk:
                    break
                chunks.append(chunk)
                remaining -= len(chunk)
            return b"".join(chunks)
        except OSError:
            raise PathRejected("unreadable", "access violation") from None
        finally:
            os.close(fd)

    def _remember(self, cache_key: tuple[str, bool], key: tuple[int, int, int, int],
                  data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        with self._lock:
            old = self._cache.pop(cache_key, None)
            if old is not None:
                self._cached_bytes -= len(old[1])
            self._cache[cache_key] = (key, data)
            self._cached_bytes += len(data)
            while self._cached_bytes > self.cache_bytes and self._cache:
                _, (_, evicted) = self._cache.popitem(last=False)
                self._cached_bytes -= len(evicted)


def prepare_tftp_root(root: Path, source: Path = IPXE_DIR,
                      loaders: Mapping[str, Path] = SIGNED_LOADERS) -> list[str]:
    """Create ``root`` and put Debian's iPXE builds (from ``source``) and the
    signed Secure Boot loaders (``loaders``: name -> file) in it; return the
    names placed.

    Each file is hard-linked when the file system allows it, else copied
    (never symlinked: a symlink out of the root would be refused when served).
    A file already there with the same size and mtime is left alone; a
    missing one is skipped.
    """
    root.mkdir(parents=True, exist_ok=True)
    wanted = [(name, source / name) for name in IPXE_FILES] + list(loaders.items())
    return [name for name, src in wanted if _place(root, name, src)]


def _place(root: Path, name: str, src: Path) -> bool:
    """Put ``src`` into ``root`` as ``name`` (see :func:`prepare_tftp_root`)."""
    if not src.is_file():
        return False
    src = src.resolve()   # Debian ships some builds as symlinks into /boot
    dest = root / name
    try:
        sst = src.stat()
        if not dest.is_symlink() and dest.is_file():
            dst = dest.stat()
            if (dst.st_size, int(dst.st_mtime)) == (sst.st_size, int(sst.st_mtime)):
                return True
        tmp = root / f".{name}.tmp{os.getpid()}"
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copy2(src, tmp)
        os.replace(tmp, dest)
        return True
    except OSError:
        return False
