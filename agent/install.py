"""Image install: choose the target disk, stream the image to it (raw,
qcow2 or compressed raw, decoded while it arrives by
:mod:`agent.image_formats`) verifying the published file's sha256, then
write the cloud-init NoCloud seed into the image's ``cidata`` FAT
partition with mtools, adding one at the end of the disk when the image
has none (:mod:`agent.seed_partition`).  A failure after the target is
opened wipes its partition tables (:func:`install_image`).

Pure parts (tested as tables): :func:`parse_install`,
:func:`parse_root_device_hints`, :func:`decide_target_disk`,
:class:`ProgressThrottle`, :func:`build_progress`, :func:`decide_resume`,
:func:`decide_sync`.  Side effects: :func:`install_image` (all of it),
:func:`write_image` (network and the target), :func:`write_seed` (runs
``mcopy``), :func:`open_target`, :class:`DiskWriter` (the target's writes
and zeroes), :func:`wipe_target`.

Progress is reported through a callback taking the fields of a
:class:`lpmos.models.ProgressEvent` (the runner spools them): at least every
2 % of the image or every 2 seconds, with bytes written, total and rate.
The image phase covers 0-95 %, the seed 96 %, the final sync 98 %.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import struct
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.client import Backoff, ClientError, NodeClient, NodeError, is_transient
from agent.image_formats import FORMATS, Decoder, ImageFormatError, open_decoder
from agent.partitions import MalformedTable, find_seed_partition
from agent.seed_partition import SEED_BYTES, NoRoom, add_seed_partition

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
SYNC_EVERY = 256 * 1024 * 1024
SEED_FILES = ("user-data", "meta-data", "network-config")
SEED_FILE_MAX = 1024 * 1024
IMAGE_PERCENT = 95.0
HINT_KEYS = ("size_min_gb", "model", "serial", "rotational", "by_path", "name")
MCOPY_TIMEOUT = 60.0
GIB = 1024 ** 3
MIB = 1024 * 1024
WIPE_BYTES = MIB
WRITE_BUFFER = 2 * MIB
ZERO_BLOCK = MIB
BLKZEROOUT = 0x127F
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


class InstallError(RuntimeError):
    """The install cannot go on; ``str()`` is the reason reported to the node."""


class NoSuitableDisk(InstallError):
    def __init__(self, reasons: dict[str, str]) -> None:
        detail = "; ".join(f"{k}: {v}" for k, v in sorted(reasons.items())) or "no disks found"
        super().__init__(f"no suitable target disk ({detail})")
        self.reasons = reasons


# --- the install order -----------------------------------------------------


@dataclass(frozen=True)
class RootDeviceHints:
    size_min_gb: float | None = None
    model: str | None = None
    serial: str | None = None
    rotational: bool | None = None
    by_path: str | None = None
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def parse_root_device_hints(data: Any) -> RootDeviceHints:
    """Validate ``root_device_hints``; unknown keys are refused (a typo must
    not silently widen the choice of the disk to wipe)."""
    if data is None:
        return RootDeviceHints()
    if not isinstance(data, dict):
        raise InstallError("root_device_hints: a JSON object expected")
    unknown = set(data) - set(HINT_KEYS)
    if unknown:
        raise InstallError(f"root_device_hints: unknown hints {sorted(unknown)}; "
                           f"known: {', '.join(HINT_KEYS)}")
    values: dict[str, Any] = {}
    if data.get("size_min_gb") is not None:
        size = data["size_min_gb"]
        if isinstance(size, bool) or not isinstance(size, int | float) or size < 0:
            raise InstallError("root_device_hints.size_min_gb: a non-negative number")
        values["size_min_gb"] = float(size)
    if data.get("rotational") is not None:
        if not isinstance(data["rotational"], bool):
            raise InstallError("root_device_hints.rotational: true or false")
        values["rotational"] = data["rotational"]
    for key in ("model", "serial", "by_path", "name"):
        value = data.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str) or len(value) > 256:
            raise InstallError(f"root_device_hints.{key}: a string of at most 256 characters")
        values[key] = value.strip()
    return RootDeviceHints(**values)


@dataclass(frozen=True)
class InstallSpec:
    image: str
    image_url: str
    sha256: str
    size: int
    hints: RootDeviceHints = field(default_factory=RootDeviceHints)
    seed: dict[str, str] = field(default_factory=dict)
    allow_removable: bool = False
    format: str = "raw"
    disk_size: int | None = None      # the virtual disk's bytes, when the node knows them

    @property
    def known_disk_size(self) -> int:
        """The virtual disk's size as far as known before the download (raw:
        the file; else the catalog's ``disk_size``; 0 when unknown)."""
        if self.format == "raw":
            return self.size
        return self.disk_size or 0


def parse_install(data: Any) -> InstallSpec:
    """Validate the node's INSTALL object (image mode)."""
    if not isinstance(data, dict):
        raise InstallError("install: a JSON object expected")
    if data.get("mode", "image") != "image":
        raise InstallError(f"install mode {data.get('mode')!r} is not supported by the agent")
    url = data.get("image_url")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise InstallError("install.image_url: an absolute http(s) URL expected")
    digest = data.get("sha256")
    if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest.lower()):
        raise InstallError("install.sha256: 64 hex digits expected")
    size = data.get("size")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise InstallError("install.size: a positive integer expected")
    seed = data.get("seed") or {}
    if not isinstance(seed, dict):
        raise InstallError("install.seed: a JSON object expected")
    clean_seed = {}
    for name in SEED_FILES:
        value = seed.get(name)
        if value is None:
            continue
        if not isinstance(value, str) or len(value.encode()) > SEED_FILE_MAX:
            raise InstallError(f"install.seed.{name}: a string of at most {SEED_FILE_MAX} bytes")
        clean_seed[name] = value
    if "user-data" not in clean_seed or "meta-data" not in clean_seed:
        raise InstallError("install.seed: user-data and meta-data are required")
    fmt = data.get("format") or "raw"
    if fmt not in FORMATS:
        raise InstallError(f"install.format: one of {', '.join(FORMATS)}")
    disk_size = data.get("disk_size")
    if disk_size is not None and (isinstance(disk_size, bool) or not isinstance(disk_size, int)
                                  or disk_size <= 0):
        raise InstallError("install.disk_size: a positive integer (bytes) or null")
    return InstallSpec(
        image=str(data.get("image") or "")[:64],
        image_url=url,
        sha256=digest.lower(),
        size=size,
        hints=parse_root_device_hints(data.get("root_device_hints")),
        seed=clean_seed,
        allow_removable=bool(data.get("allow_removable", False)),
        format=fmt,
        disk_size=disk_size,
    )


def _match(disk: dict[str, Any], hints: RootDeviceHints) -> str | None:
    """Why ``disk`` does not match ``hints`` (None when it does)."""
    if hints.name and disk.get("name") != hints.name.removeprefix("/dev/"):
        return f"name is not {hints.name}"
    if hints.model and (disk.get("model") or "").lower() != hints.model.lower():
        return f"model {disk.get('model')!r} is not {hints.model!r}"
    if hints.serial and (disk.get("serial") or "").lower() != hints.serial.lower():
        return f"serial {disk.get('serial')!r} is not {hints.serial!r}"
    if hints.by_path and disk.get("by_path") not in (
            hints.by_path, "/dev/disk/by-path/" + hints.by_path):
        return f"by-path {disk.get('by_path')!r} is not {hints.by_path!r}"
    if hints.rotational is not None and disk.get("rotational") is not hints.rotational:
        return "rotational" if disk.get("rotational") else "not rotational"
    if hints.size_min_gb is not None and int(disk.get("size_bytes", 0)) < hints.size_min_gb * GIB:
        return f"smaller than {hints.size_min_gb:g} GiB"
    return None


def decide_target_disk(disks: list[dict[str, Any]], hints: RootDeviceHints, *,
                       image_size: int, allow_removable: bool = False) -> dict[str, Any]:
    """The disk to install on: among the inventory's disks matching every
    hint, not removable (unless allowed) and at least as large as the image,
    the smallest (ties broken by name) — the Ironic default, which keeps
    a large data disk out of harm's way.  Raises :class:`NoSuitableDisk`
    with the reason each disk was refused."""
    reasons: dict[str, str] = {}
    fit = []
    for disk in disks:
        name = str(disk.get("name", "?"))
        why = _match(disk, hints)
        if why is None and disk.get("removable") and not allow_removable:
            why = "removable (allow_removable is off)"
        if why is None and int(disk.get("size_bytes", 0)) < image_size:
            why = f"{disk.get('size_bytes', 0)} bytes is smaller than the image ({image_size})"
        if why is None:
            fit.append(disk)
        else:
            reasons[name] = why
    if not fit:
        raise NoSuitableDisk(reasons)
    return min(fit, key=lambda d: (int(d.get("size_bytes", 0)), str(d.get("name"))))


@dataclass
class ProgressThrottle:
    """Decides when to report: every ``step_percent`` of the total or every
    ``interval`` seconds, whichever comes first, and always at the end."""

    total: int
    step_percent: float = 2.0
    interval: float = 2.0
    last_done: int = -1
    last_at: float = 0.0

    def due(self, done: int, now: float) -> bool:
        if self.last_done < 0 or done >= self.total:
            return done != self.last_done
        step = self.total * self.step_percent / 100.0
        return done - self.last_done >= step or now - self.last_at >= self.interval

    def mark(self, done: int, now: float) -> float:
        """Record a report; returns the rate (bytes/s) since the last one."""
        elapsed = now - self.last_at if self.last_done >= 0 else 0.0
        rate = (done - max(self.last_done, 0)) / elapsed if elapsed > 0 else 0.0
        self.last_done, self.last_at = done, now
        return max(rate, 0.0)


# --- the target -----------------------------------------------------------------


@dataclass
class Target:
    """An open target.  ``capacity`` is the disk's size: a block device's,
    or the size a disk file was given; None for a file that grows to fit."""

    path: Path
    block: bool
    fd: int
    capacity: int | None = None


def block_removable(path: Path) -> bool:
    """Whether the block device at ``path`` says it is removable (sysfs)."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return Path(f"/sys/dev/block/{dev}/removable").read_text().strip() == "1"
    except OSError:
        return False


def decide_disk_too_small(disk: int, capacity: int | None, path: Path) -> str | None:
    """Why a virtual disk of ``disk`` bytes does not fit ``capacity`` (None: it fits)."""
    if capacity is None or disk <= capacity:
        return None
    return (f"the image's disk is {disk} bytes, larger than {path} ({capacity} bytes); "
            f"choose a larger disk (root_device_hints) or a smaller image")


@contextlib.contextmanager
def open_target(path: Path, *, size: int, allow_removable: bool,
                disk_size: int | None = None) -> Iterator[Target]:
    """Open a block device (exclusively: a mounted device is refused by the
    kernel with EBUSY) or a plain file (created, truncated) for writing.
    ``size`` is the virtual disk's size when known (0 when not): a device
    smaller than that is refused before anything is written.  A file is a
    disk of ``disk_size`` bytes when given, else it grows to fit the image."""
    try:
        st = os.stat(path)
        block = stat.S_ISBLK(st.st_mode)
    except FileNotFoundError:
        block = False
    if block:
        if block_removable(path) and not allow_removable:
            raise InstallError(f"{path} is removable; allow_removable is off")
        try:
            fd = os.open(path, os.O_RDWR | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InstallError(f"cannot open {path}: {exc.strerror}") from None
        capacity: int | None = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
    else:
        if path.exists() and not path.is_file():
            raise InstallError(f"{path} is neither a block device nor a regular file")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise InstallError(f"cannot open {path}: {exc.strerror}") from None
        capacity = disk_size
        if disk_size:
            os.ftruncate(fd, disk_size)
    why = decide_disk_too_small(size, capacity, path)
    if why:
        os.close(fd)
        raise InstallError(why)
    try:
        yield Target(path, block, fd, capacity)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


_ZEROS = bytes(ZERO_BLOCK)


class _Fallocate:
    """libc's fallocate(2), loaded once (None when there is none)."""

    fn: Any = None
    loaded = False

    @classmethod
    def punch(cls, fd: int, offset: int, length: int) -> bool:
        if not cls.loaded:
            cls.loaded = True
            with contextlib.suppress(OSError, AttributeError):
                libc = ctypes.CDLL(None, use_errno=True)
                fn = libc.fallocate
                fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
                cls.fn = fn
        if cls.fn is None:
            return False
        return bool(cls.fn(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0)


class DiskWriter:
    """The :class:`agent.image_formats.Sink` on a target: contiguous writes
    are coalesced into ``WRITE_BUFFER`` pwrite calls, all-zero blocks of
    ``ZERO_BLOCK`` become zero ranges, and zero ranges are zeroed cheaply
    (BLKZEROOUT on a device, a punched hole or nothing past the end in a
    file, zeros written as the fallback).  The page cache is flushed every
    ``SYNC_EVERY`` bytes.  ``touched`` says whether the target was changed."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.pending = bytearray()
        self.pending_at = 0
        self.zero_at = 0
        self.zero_len = 0
        self.written = 0
        self.synced = 0
        self.touched = False
        self.file_end = 0 if target.block else (target.capacity or 0)
        self.disk_size: int | None = None

    # -- the Sink
    def announce(self, size: int) -> None:
        why = decide_disk_too_small(size, self.target.capacity, self.target.path)
        if why:
            raise InstallError(why)
        self.disk_size = size

    def _check(self, offset: int, length: int) -> None:
        cap = self.target.capacity
        if cap is not None and offset + length > cap:
            raise InstallError(f"the image's disk is larger than {self.target.path} "
                               f"({cap} bytes): it writes up to byte {offset + length}")

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self._check(offset, len(data))
        if self.pending and offset != self.pending_at + len(self.pending):
            self._flush_data()
        if not self.pending:
            self.pending_at = offset
        self.pending += data
        if len(self.pending) >= WRITE_BUFFER:
            self._flush_data()

    def zero(self, offset: int, length: int) -> None:
        self._check(offset, length)
        self._flush_data()
        self._zero_pending(offset, length)

    # -- flushing
    def _zero_pending(self, offset: int, length: int) -> None:
        if self.zero_len and offset == self.zero_at + self.zero_len:
            self.zero_len += length
            return
        self._flush_zero()
        self.zero_at, self.zero_len = offset, length

    def _flush_data(self) -> None:
        buf, at = self.pending, self.pending_at
        if not buf:
            return
        self.pending = bytearray()
        view = memoryview(buf)
        run = 0                         # start (in buf) of the data not yet written
        i = 0
        while i < len(buf):
            step = min(ZERO_BLOCK - (at + i) % ZERO_BLOCK, len(buf) - i)
            if buf.startswith(_ZEROS[:step], i):
                if run < i:
                    self._pwrite(view[run:i], at + run)
                self._zero_pending(at + i, step)
                run = i + step
            i += step
        if run < len(buf):
            self._pwrite(view[run:], at + run)

    def _pwrite(self, data: memoryview, offset: int) -> None:
        self._flush_zero()
        try:
            _write_all(self.target.fd, data, offset)
        except OSError as exc:
            raise InstallError(f"writing {self.target.path}: {exc.strerror}") from None
        self.touched = True
        self.file_end = max(self.file_end, offset + len(data))
        self._written(len(data))

    def _written(self, n: int) -> None:
        self.written += n
        if decide_sync(self.written, self.synced):
            os.fdatasync(self.target.fd)
            self.synced = self.written

    def _flush_zero(self) -> None:
        offset, length = self.zero_at, self.zero_len
        if not length:
            return
        self.zero_len = 0
        try:
            self._zero_range(offset, length)
        except OSError as exc:
            raise InstallError(f"zeroing {self.target.path}: {exc.strerror}") from None
        self.touched = True

    def _zero_range(self, offset: int, length: int) -> None:
        fd = self.target.fd
        if self.target.block:
            if offset % 512 == 0 and length % 512 == 0:
                try:
                    fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, length))
                    return
                except OSError as exc:
                    if exc.errno not in (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
        else:
            if offset + length > self.file_end:
                # past the file's end: extending it leaves a hole, which reads as zeros
                os.ftruncate(fd, offset + length)
            end = min(offset + length, self.file_end)
            self.file_end = max(self.file_end, offset + length)
            if end <= offset:
                return
            if _Fallocate.punch(fd, offset, end - offset):
                return
            length = end - offset
        while length:
            n = min(length, ZERO_BLOCK)
            _write_all(fd, _ZEROS[:n], offset)
            offset, length = offset + n, length - n
            self._written(n)

    def flush(self) -> None:
        self._flush_data()
        self._flush_zero()

    def reset(self) -> None:
        """Forget what is buffered (the download restarts from 0)."""
        self.pending = bytearray()
        self.zero_len = 0
        self.disk_size = None

    def finish(self, disk_size: int) -> None:
        """Flush, size a file that grows to the disk, and fsync."""
        self.flush()
        try:
            if not self.target.block and self.target.capacity is None:
                os.ftruncate(self.target.fd, disk_size)
            os.fsync(self.target.fd)
        except OSError as exc:
            raise InstallError(f"flushing {self.target.path}: {exc.strerror}") from None


def wipe_target(target: Target) -> None:
    """Zero the first and the last MiB of ``target`` (primary GPT or MBR,
    backup GPT), so no boot trusts a half-written disk.  Best effort: an
    error here must not hide the reason the install failed."""
    try:
        size = target.capacity if target.block and target.capacity else \
            os.fstat(target.fd).st_size
        spans = {(0, min(WIPE_BYTES, size)), (max(size - WIPE_BYTES, 0), size)}
        for start, end in spans:
            if end > start:
                _write_all(target.fd, bytes(end - start), start)
        os.fsync(target.fd)
    except OSError as exc:
        log.error("wiping the partition tables of %s failed: %s", target.path, exc)


# --- streaming the image ---------------------------------------------------------


class ImageSource(Protocol):
    def open(self, offset: int, etag: str | None) -> tuple[BinaryIO, int, str | None]:
        """A stream of the image from ``offset`` (or from 0 when the server
        restarted it), the offset it actually starts at, and the ETag."""
        ...


class HttpImageSource:
    """The image from the node over HTTP with ``Range``/``If-Range`` resume."""

    def __init__(self, client: NodeClient, url: str, timeout: float = 30.0) -> None:
        self.client = client
        self.url = url
        self.timeout = timeout

    def open(self, offset: int, etag: str | None) -> tuple[BinaryIO, int, str | None]:
        headers = {"Accept": "*/*"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
            if etag:
                headers["If-Range"] = etag
        response = self.client.open("GET", self.url, headers=headers, timeout=self.timeout)
        start = 0
        if response.status == 206:
            m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
            if not m:
                response.close()
                raise NodeError(502, "bad Content-Range",
                                str(response.headers.get("Content-Range")))
            start = int(m.group(1))
        return response, start, response.headers.get("ETag")


class FileImageSource:
    """The published image from a local file, resumed by seeking (the
    write benchmark, and tests that install from a built image)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def open(self, offset: int, etag: str | None) -> tuple[BinaryIO, int, str | None]:
        fh = self.path.open("rb")
        fh.seek(offset)
        return fh, offset, None


Report = Callable[[dict[str, Any]], None]


def build_progress(done: int, size: int, rate: float) -> dict[str, Any]:
    """The progress event of the image phase (0-95 %) after ``done`` of
    ``size`` bytes, written at ``rate`` bytes/s."""
    return {"kind": "progress", "step": "writing image",
            "percent": round(IMAGE_PERCENT * done / size, 2),
            "bytes_done": done, "bytes_total": size, "rate": round(rate, 1),
            "message": f"{done // (1024 * 1024)} of {size // (1024 * 1024)} MiB "
                       f"at {rate / (1024 * 1024):.1f} MiB/s"}


def decide_resume(start: int, done: int) -> bool:
    """Whether a stream the node starts at ``start`` when ``done`` bytes are
    written means starting over (True: it sent the whole image, it changed
    or ignores Range) or going on (False).  Any other start is refused: the
    digest covers the bytes in order, so a gap or an overlap cannot be
    mended."""
    if start == done:
        return False
    if start != 0:
        raise InstallError(f"node resumed at {start}, expected {done}")
    return True


def decide_sync(written: int, synced: int) -> bool:
    """Whether to flush the target now: every ``SYNC_EVERY`` bytes, so the
    page cache never holds more than that of the image unwritten."""
    return written - synced >= SYNC_EVERY


@dataclass(frozen=True)
class WrittenImage:
    sha256: str
    disk_size: int            # bytes of the virtual disk written


class _ImageCopy:
    """The state of one image write across connections: the published bytes
    received, their digest, the decoder (which keeps its place, so every
    format resumes), the ETag to resume with, and the progress reports."""

    def __init__(self, writer: DiskWriter, size: int, fmt: str, disk_size: int | None,
                 report: Report, clock: Callable[[], float]) -> None:
        self.writer = writer
        self.size = size
        self.fmt = fmt
        self.disk_size = disk_size
        self.report = report
        self.clock = clock
        self.digest = hashlib.sha256()
        self.decoder = self._decoder()
        self.done = 0
        self.etag: str | None = None
        self.throttle = ProgressThrottle(size)
        self.last_progress = clock()
        self.attempt = 0      # failed connections since the last byte arrived

    def _decoder(self) -> Decoder:
        try:
            return open_decoder(self.fmt, self.writer, file_size=self.size,
                                disk_size=self.disk_size, on_size=self.writer.announce)
        except ImageFormatError as exc:
            raise InstallError(str(exc)) from None

    def progress(self, force: bool = False) -> None:
        now = self.clock()
        if not force and not self.throttle.due(self.done, now):
            return
        rate = self.throttle.mark(self.done, now)
        self.report(build_progress(self.done, self.size, rate))

    def log(self, message: str) -> None:
        log.warning("%s", message)
        self.report({"kind": "log", "step": "download", "message": message})

    def restart(self) -> None:
        self.log(f"restarting from 0 after {self.done} bytes: the node sent the whole "
                 f"image (it changed, or it ignores Range)")
        self.digest = hashlib.sha256()
        self.done = 0
        self.writer.reset()
        self.decoder = self._decoder()

    def write(self, chunk: bytes) -> None:
        """Hash and decode ``chunk``; a failing target or a bad image is final."""
        self.digest.update(chunk)
        try:
            self.decoder.feed(chunk)
        except ImageFormatError as exc:
            raise InstallError(f"{exc} (at byte {self.done} of the {self.fmt} image)") from None
        self.done += len(chunk)
        self.last_progress = self.clock()
        self.attempt = 0
        self.progress()

    def copy(self, stream: BinaryIO) -> BaseException | None:
        """Copy what ``stream`` delivers: None when the image is complete,
        else why the stream stopped short (a read error, an early EOF)."""
        try:
            while self.done < self.size:
                chunk = stream.read(min(CHUNK, self.size - self.done))
                if not chunk:
                    break
                self.write(chunk)
            if self.done >= self.size:
                if stream.read(1):
                    raise InstallError(f"the image is larger than {self.size} bytes")
                return None
            return ClientError(f"connection closed at byte {self.done} of {self.size}")
        except (OSError, http.client.HTTPException) as exc:   # the read side
            return exc

    def finish(self) -> int:
        try:
            disk = self.decoder.finish()
        except ImageFormatError as exc:
            raise InstallError(str(exc)) from None
        self.writer.finish(disk)
        return disk


def _stream_once(source: ImageSource, copy: _ImageCopy) -> BaseException | None:
    """One connection to the node: None when the image is complete, else the
    error to retry after.  A refusal for good raises :class:`InstallError`."""
    try:
        stream, start, new_etag = source.open(copy.done, copy.etag)
    except ClientError as exc:
        if not is_transient(exc):
            raise InstallError(f"image download refused: {exc}") from None
        return exc
    with contextlib.closing(stream):
        if decide_resume(start, copy.done):
            copy.restart()
        elif start:
            copy.log(f"resumed at byte {start} of {copy.size}")
        copy.etag = new_etag or copy.etag
        return copy.copy(stream)


def write_image(source: ImageSource, target: Target, *, size: int, sha256: str,
                report: Report, fmt: str = "raw", disk_size: int | None = None,
                stall_timeout: float = 600.0, backoff: Backoff | None = None,
                clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep,
                writer: DiskWriter | None = None) -> WrittenImage:
    """Stream the ``size`` published bytes of a ``fmt`` image from
    ``source``, decode them onto ``target``, and check their sha256
    against ``sha256`` (the digest of the file as published, not of the
    disk).

    After a broken connection the stream resumes where it stopped (HTTP
    Range) with the same decoder, whatever the format; when the node answers
    with the whole image instead it restarts from 0 with a new decoder and
    digest.  The progress log says which.  Gives up with
    :class:`InstallError` when no byte arrives for ``stall_timeout``
    seconds, the node refuses the image for good (4xx other than 408/429),
    the image does not decode or its disk does not fit the target.
    """
    backoff = backoff or Backoff(base=0.5, cap=10.0)
    writer = writer or DiskWriter(target)
    copy = _ImageCopy(writer, size, fmt, disk_size, report, clock)
    copy.progress(force=True)
    while copy.done < size:
        error = _stream_once(source, copy)
        if error is None:
            break
        if clock() - copy.last_progress > stall_timeout:
            raise InstallError(f"image download stalled for {stall_timeout:g} s "
                               f"at byte {copy.done} of {size}: {error}")
        log.warning("image stream interrupted at %d/%d: %s; resuming", copy.done, size, error)
        sleep(backoff.delay(copy.attempt))
        copy.attempt += 1
    copy.progress(force=True)
    got = copy.digest.hexdigest()
    if got != sha256:
        raise InstallError(f"sha256 mismatch: the downloaded image has {got}, expected {sha256}")
    disk = copy.finish()
    return WrittenImage(got, disk)


# --- the NoCloud seed ---------------------------------------------------------------


def write_seed(target: Path, seed: dict[str, str], *, offset: int | None = None) -> int:
    """Write the seed files into the ``cidata`` FAT partition at byte
    ``offset`` of ``target`` (found in the partition table when not given)
    with ``mcopy -o -i TARGET@@OFFSET`` (no mount).  Returns the offset."""
    if offset is None:
        try:
            found = find_seed_partition(target)
        except (MalformedTable, OSError) as exc:
            raise InstallError(f"cannot read the partition table of {target}: {exc}") from None
        if found is None:
            raise InstallError("the image has no 'cidata' partition (GPT name or FAT label) "
                               "for the cloud-init seed")
        offset = found[1]
    mcopy = shutil.which("mcopy")
    if mcopy is None:
        raise InstallError("mcopy not found: install the mtools package in the live image")
    env = dict(os.environ, MTOOLS_SKIP_CHECK="1", MTOOLS_NO_VFAT="0")
    with tempfile.TemporaryDirectory(prefix="lpmos-seed-") as tmp:
        for name, text in seed.items():
            local = Path(tmp) / name
            local.write_text(text)
            cmd = [mcopy, "-o", "-i", f"{target}@@{offset}", str(local), f"::/{name}"]
            try:
                done = subprocess.run(cmd, capture_output=True, timeout=MCOPY_TIMEOUT,
                                      env=env, check=False)
            except subprocess.TimeoutExpired:
                raise InstallError(f"mcopy {name} timed out") from None
            if done.returncode != 0:
                err = done.stderr.decode(errors="replace").strip()[:300]
                raise InstallError(f"mcopy {name} into the seed partition failed: {err}")
    return offset


def decide_seed_disk_size(disk_size: int, capacity: int | None) -> int:
    """The size of the disk the seed partition goes to the end of: the
    target's, or for a file that grows, the image's disk rounded up to a
    MiB plus the seed and a MiB for the backup GPT."""
    if capacity is not None:
        return capacity
    return -(-disk_size // MIB) * MIB + SEED_BYTES + MIB


def prepare_seed_partition(target: Target, disk_size: int, report: Report,
                           seed: dict[str, str]) -> int:
    """Write the NoCloud ``seed`` into the image's ``cidata`` partition and
    return its byte offset; when the image has none, one is added at the
    end of the disk, with the seed in it (a file that grows is extended for
    it)."""
    try:
        found = find_seed_partition(target.path)
    except (MalformedTable, OSError) as exc:
        raise InstallError(f"cannot read the partition table of {target.path}: {exc}") from None
    if found is not None:
        return write_seed(target.path, seed, offset=found[1])
    disk_bytes = decide_seed_disk_size(disk_size, target.capacity)
    try:
        if target.capacity is None:
            os.ftruncate(target.fd, disk_bytes)
        plan = add_seed_partition(target.path, disk_bytes=disk_bytes, part_guid=uuid.uuid4(),
                                  fill=lambda fat: _fill_seed(fat, seed))
    except (NoRoom, MalformedTable) as exc:
        raise InstallError(str(exc)) from None
    except (OSError, RuntimeError) as exc:
        raise InstallError(f"adding the cidata seed partition to {target.path}: {exc}") from None
    report({"kind": "log", "step": "seed",
            "message": f"the image has no cidata partition: added one of {plan.size >> 20} MiB "
                       f"at byte {plan.start} ({plan.scheme})"})
    return plan.start


def _fill_seed(fat: Path, seed: dict[str, str]) -> None:
    write_seed(fat, seed, offset=0)


def install_image(source: ImageSource, spec: InstallSpec, target_path: Path, *,
                  report: Report, allow_removable: bool, stall_timeout: float = 600.0,
                  disk_size: int | None = None, **write_kw: Any) -> int:
    """Write ``spec``'s image to ``target_path`` and its NoCloud seed, as
    :func:`write_image` and :func:`write_seed` do; returns the seed's byte
    offset.  A failure once the target is open wipes its first and last MiB
    (:func:`wipe_target`) before the :class:`InstallError` goes on: the
    disk's content is given up the moment the install commits to it, and a
    disk without partition tables is one no firmware boots, so the machine
    goes back to the network.  ``disk_size`` makes a file target a disk of
    that size (tests)."""
    with open_target(target_path, size=spec.known_disk_size, allow_removable=allow_removable,
                     disk_size=disk_size) as tgt:
        try:
            written = write_image(source, tgt, size=spec.size, sha256=spec.sha256,
                                  report=report, fmt=spec.format, disk_size=spec.disk_size,
                                  stall_timeout=stall_timeout, **write_kw)
            report({"kind": "progress", "step": "seed", "percent": 96.0,
                    "message": "writing the cloud-init NoCloud seed"})
            offset = prepare_seed_partition(tgt, written.disk_size, report, spec.seed)
            os.fsync(tgt.fd)
        except BaseException:
            wipe_target(tgt)
            raise
    return offset
