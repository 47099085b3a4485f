"""Small, bounded readers of sysfs-like trees (``read_*`` helpers).

Every reader takes the tree's root so that a captured tree under
``tests/fixtures/agent/`` reads exactly like the live ``/``.  A missing or
unreadable attribute is ``None``, or an :class:`AttrError` naming why when
the caller needs the reason (permission denied on DMI serials, EINVAL on the
speed of a NIC without link ...).
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

ATTR_MAX = 4096


class AttrError:
    """Why an attribute could not be read (kept as data, never raised)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def __repr__(self) -> str:
        return f"AttrError({self.reason!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AttrError) and other.reason == self.reason

    def __hash__(self) -> int:
        return hash(self.reason)


def reason_of(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission denied (run as root)"
    if exc.errno == errno.ENOENT:
        return "not present"
    if exc.errno == errno.EINVAL:
        return "not available (EINVAL)"
    return os.strerror(exc.errno or 0) or str(exc)


def read_attr(path: Path) -> str | AttrError:
    """The stripped text of a sysfs attribute, or why it cannot be read."""
    try:
        with path.open("rb") as fh:
            data = fh.read(ATTR_MAX)
    except OSError as exc:
        return AttrError(reason_of(exc))
    return data.decode("utf-8", errors="replace").strip().strip("\x00").strip()


def read_bytes(path: Path, limit: int = 64 * 1024) -> bytes | AttrError:
    try:
        with path.open("rb") as fh:
            return fh.read(limit)
    except OSError as exc:
        return AttrError(reason_of(exc))


def read_attrs(base: Path, names: tuple[str, ...]) -> dict[str, str]:
    """The readable attributes among ``names`` (relative paths) under ``base``."""
    out: dict[str, str] = {}
    for name in names:
        value = read_attr(base / name)
        if isinstance(value, str):
            out[name] = value
    return out


def link_target(root: Path, path: Path) -> str | None:
    """Where a sysfs symlink points, as an absolute path inside ``root``
    (``/devices/pci0000:00/...``), or None when it is not a link."""
    try:
        real = Path(os.path.realpath(path))
        rel = real.relative_to(Path(os.path.realpath(root)))
    except (OSError, ValueError):
        return None
    return "/" + str(rel)


def list_dir(path: Path, limit: int = 4096) -> list[str]:
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return []
    return names[:limit]
