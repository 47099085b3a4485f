"""Image install: choose the target disk, stream the image to it verifying
sha256 while writing, then write the cloud-init NoCloud seed into the
image's ``cidata`` FAT partition with mtools.

Pure parts (tested as tables): :func:`parse_install`,
:func:`parse_root_device_hints`, :func:`decide_target_disk`,
:class:`ProgressThrottle`, :func:`build_progress`, :func:`decide_resume`,
:func:`decide_sync`.  Side effects: :func:`write_image` (network and the
target), :func:`write_seed` (runs ``mcopy``), :func:`open_target`.

Progress is reported through a callback taking the fields of a
:class:`lpmos.models.ProgressEvent` (the runner spools them): at least every
2 % of the image or every 2 seconds, with bytes written, total and rate.
The image phase covers 0-95 %, the seed 96 %, the final sync 98 %.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Protocol

from agent.client import Backoff, ClientError, NodeClient, NodeError, is_transient
from agent.partitions import MalformedTable, find_seed_partition

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
SYNC_EVERY = 256 * 1024 * 1024
SEED_FILES = ("user-data", "meta-data", "network-config")
SEED_FILE_MAX = 1024 * 1024
IMAGE_PERCENT = 95.0
HINT_KEYS = ("size_min_gb", "model", "serial", "rotational", "by_path", "name")
MCOPY_TIMEOUT = 60.0
GIB = 1024 ** 3


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
    return InstallSpec(
        image=str(data.get("image") or "")[:64],
        image_url=url,
        sha256=digest.lower(),
        size=size,
        hints=parse_root_device_hints(data.get("root_device_hints")),
        seed=clean_seed,
        allow_removable=bool(data.get("allow_removable", False)),
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
    path: Path
    block: bool
    fd: int


def block_removable(path: Path) -> bool:
    """Whether the block device at ``path`` says it is removable (sysfs)."""
    try:
        st = os.stat(path)
        dev = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        return Path(f"/sys/dev/block/{dev}/removable").read_text().strip() == "1"
    except OSError:
        return False


@contextlib.contextmanager
def open_target(path: Path, *, size: int, allow_removable: bool) -> Iterator[Target]:
    """Open a block device (exclusively: a mounted device is refused by the
    kernel with EBUSY) or a plain file (created, truncated) for writing."""
    try:
        st = os.stat(path)
        block = stat.S_ISBLK(st.st_mode)
    except FileNotFoundError:
        block = False
    if block:
        if block_removable(path) and not allow_removable:
            raise InstallError(f"{path} is removable; allow_removable is off")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_EXCL | getattr(os, "O_CLOEXEC", 0))
        except OSError as exc:
            raise InstallError(f"cannot open {path}: {exc.strerror}") from None
        capacity = os.lseek(fd, 0, os.SEEK_END)
        os.lseek(fd, 0, os.SEEK_SET)
        if capacity < size:
            os.close(fd)
            raise InstallError(f"{path} holds {capacity} bytes, the image needs {size}")
    else:
        if path.exists() and not path.is_file():
            raise InstallError(f"{path} is neither a block device nor a regular file")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        except OSError as exc:
            raise InstallError(f"cannot open {path}: {exc.strerror}") from None
    try:
        yield Target(path, block, fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


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


class _ImageCopy:
    """The state of one image write across connections: the bytes written,
    their digest, the ETag to resume with, and the progress reports."""

    def __init__(self, target: Target, size: int, report: Report,
                 clock: Callable[[], float]) -> None:
        self.target = target
        self.size = size
        self.report = report
        self.clock = clock
        self.digest = hashlib.sha256()
        self.done = 0
        self.synced = 0
        self.etag: str | None = None
        self.throttle = ProgressThrottle(size)
        self.last_progress = clock()
        self.attempt = 0      # failed connections since the last byte arrived

    def progress(self, force: bool = False) -> None:
        now = self.clock()
        if not force and not self.throttle.due(self.done, now):
            return
        rate = self.throttle.mark(self.done, now)
        self.report(build_progress(self.done, self.size, rate))

    def restart(self) -> None:
        log.warning("image restarted from 0 (changed or no Range support)")
        self.digest = hashlib.sha256()
        self.done = 0
        os.lseek(self.target.fd, 0, os.SEEK_SET)

    def write(self, chunk: bytes) -> None:
        """Hash and write ``chunk``; a failing target is final (no retry)."""
        self.digest.update(chunk)
        try:
            _write_all(self.target.fd, chunk)
            if decide_sync(self.done + len(chunk), self.synced):
                os.fdatasync(self.target.fd)
                self.synced = self.done + len(chunk)
        except OSError as exc:
            raise InstallError(f"writing {self.target.path}: {exc.strerror}") from None
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
        copy.etag = new_etag or copy.etag
        return copy.copy(stream)


def write_image(source: ImageSource, target: Target, *, size: int, sha256: str,
                report: Report, stall_timeout: float = 600.0,
                backoff: Backoff | None = None, clock: Callable[[], float] = time.monotonic,
                sleep: Callable[[float], None] = time.sleep) -> str:
    """Stream ``size`` bytes from ``source`` to ``target`` and return the
    sha256, which must equal ``sha256``.

    The digest is computed over the bytes as they are written, in order;
    after a broken connection the stream resumes where it stopped (HTTP
    Range), or from 0 when the node answers with the whole image.  Gives up
    with :class:`InstallError` when no byte arrives for ``stall_timeout``
    seconds or the node refuses the image for good (4xx other than 408/429).
    """
    backoff = backoff or Backoff(base=0.5, cap=10.0)
    copy = _ImageCopy(target, size, report, clock)
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
    os.fsync(target.fd)
    if not target.block:
        os.ftruncate(target.fd, size)
    got = copy.digest.hexdigest()
    if got != sha256:
        raise InstallError(f"sha256 mismatch: the written image has {got}, expected {sha256}")
    return got


# --- the NoCloud seed ---------------------------------------------------------------


def write_seed(target: Path, seed: dict[str, str]) -> int:
    """Write the seed files into the ``cidata`` FAT partition of the image
    on ``target`` with ``mcopy -o -i TARGET@@OFFSET`` (no mount).  Returns the
    partition's byte offset."""
    try:
        found = find_seed_partition(target)
    except (MalformedTable, OSError) as exc:
        raise InstallError(f"cannot read the partition table of {target}: {exc}") from None
    if found is None:
        raise InstallError("the image has no 'cidata' partition (GPT name or FAT label) "
                           "for the cloud-init seed")
    _part, offset = found
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
