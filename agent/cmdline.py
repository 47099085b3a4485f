"""The kernel command line: what the live image was booted with.

``parse_cmdline`` is pure; ``read_cmdline`` touches ``/proc/cmdline``.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from pathlib import Path

from lpmos.models import ValidationError, normalize_mac

CMDLINE_MAX = 64 * 1024


@dataclass(frozen=True)
class BootParams:
    """What the agent takes from the kernel command line.

    ``server`` is ``lpmos.server=URL``; ``boot_mac`` comes from pxelinux/iPXE
    style ``BOOTIF=01-aa-bb-cc-dd-ee-ff`` (the leading ``01-`` is the ARP
    hardware type) or ``lpmos.mac=``.  ``live`` is true when the command line
    names an LPMOS server: the agent then runs as the live image.
    """

    server: str | None = None
    boot_mac: str | None = None
    live: bool = False


def parse_cmdline(text: str) -> BootParams:
    """Parse a kernel command line; bad values are ignored, never raised."""
    try:
        words = shlex.split(text[:CMDLINE_MAX])
    except ValueError:
        words = text[:CMDLINE_MAX].split()
    server = None
    boot_mac = None
    for word in words:
        if word == "--":          # arguments after -- belong to init
            break
        key, sep, value = word.partition("=")
        if not sep:
            continue
        if key == "lpmos.server" and value.startswith(("http://", "https://")):
            server = value.rstrip("/")
        elif key in ("BOOTIF", "lpmos.mac") and boot_mac is None:
            boot_mac = parse_bootif(value)
    return BootParams(server=server, boot_mac=boot_mac, live=server is not None)


def parse_bootif(value: str) -> str | None:
    """``01-52-54-00-12-34-56`` (or a plain MAC) → ``52:54:00:12:34:56``; else None."""
    text = value.strip().lower()
    parts = text.split("-")
    if len(parts) == 7 and parts[0] == "01":
        text = "-".join(parts[1:])
    try:
        return normalize_mac(text)
    except ValidationError:
        return None


def read_cmdline(path: Path = Path("/proc/cmdline")) -> str:
    try:
        return path.read_text(errors="replace")[:CMDLINE_MAX]
    except OSError:
        return ""
