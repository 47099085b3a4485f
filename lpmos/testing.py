"""Test support for the core: a temporary image catalog, ``catalog.toml``
plus small random image files, in the format :mod:`lpmos.catalog` reads,
and a disk shaped like a distribution's cloud image.

Tests and benchmarks both write catalogs and disks with it; it lives in the core so
that neither has to import the other.  The store fakes are in
:mod:`lpmos.store.testing`, the control plane for tests in :mod:`web.testing`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple


class Installer(NamedTuple):
    """An installer-mode entry with remote kernel/initrd URLs (never fetched)."""

    name: str
    os_type: str
    os_family: str
    version: str
    kernel: str
    initrd: str
    kernel_args: str = ""       # "" writes no kernel_args line

    def toml(self) -> str:
        lines = ["[[image]]", f'name = "{self.name}"', f'os_type = "{self.os_type}"',
                 f'os_family = "{self.os_family}"', f'version = "{self.version}"',
                 'mode = "installer"', f'kernel = "{self.kernel}"', f'initrd = "{self.initrd}"']
        if self.kernel_args:
            lines.append(f'kernel_args = "{self.kernel_args}"')
        return "\n".join(lines) + "\n"


_ROCKY = "https://dl.rockylinux.org/pub/rocky/9/BaseOS/x86_64/os/"
ROCKY_9 = Installer("rocky-9", "Rocky Linux 9", "rhel", "9",
                    kernel=_ROCKY + "images/pxeboot/vmlinuz",
                    initrd=_ROCKY + "images/pxeboot/initrd.img",
                    kernel_args="inst.repo=" + _ROCKY)
UBUNTU_24_04 = Installer("ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04",
                         kernel="https://releases.ubuntu.com/24.04/netboot/amd64/linux",
                         initrd="https://releases.ubuntu.com/24.04/netboot/amd64/initrd")


class Catalog(NamedTuple):
    path: Path                  # <root>/catalog.toml
    files: dict[str, bytes]     # relative path -> bytes written


def write_catalog(root: Path, *, disk_name: str = "lab-os", disk_bytes: int = 1 << 20,
                  write_size: bool = False, live_bytes: tuple[int, int] = (64 * 1024, 64 * 1024),
                  live_kernel_args: bool = True,
                  installers: Sequence[Installer] = (ROCKY_9,)) -> Catalog:
    """Write ``root/catalog.toml`` and its files: the live image (random
    ``live/vmlinuz`` and ``live/initrd.img`` of ``live_bytes``, kernel_args
    "quiet" if ``live_kernel_args``), an image-mode "Lab OS" named
    ``disk_name`` (random ``<disk_name>/disk.img`` of ``disk_bytes``, its
    sha256, ``size`` if ``write_size``), then ``installers`` in order."""
    disk = f"{disk_name}/disk.img"
    files = {"live/vmlinuz": os.urandom(live_bytes[0]),
             "live/initrd.img": os.urandom(live_bytes[1]),
             disk: os.urandom(disk_bytes)}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    sha = hashlib.sha256(files[disk]).hexdigest()
    live = ('[[image]]\nname = "live"\nos_type = "LPMOS live"\nos_family = "lab"\n'
            'role = "live"\nmode = "installer"\nkernel = "live/vmlinuz"\n'
            'initrd = "live/initrd.img"\n')
    if live_kernel_args:
        live += 'kernel_args = "quiet"\n'
    image = (f'[[image]]\nname = "{disk_name}"\nos_type = "Lab OS"\nos_family = "lab"\n'
             f'version = "1"\nmode = "image"\ndisk_image = "{disk}"\nsha256 = "{sha}"\n')
    if write_size:
        image += f"size = {disk_bytes}\n"
    path = root / "catalog.toml"
    path.write_text("\n" + "\n".join([live, image, *(i.toml() for i in installers)]))
    return Catalog(path, files)


#: GPT type of the BIOS boot partition (GRUB's core image goes there)
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"


def write_cloud_like_disk(path: Path, *, size: int, esp_sectors: int,
                          data: Iterable[tuple[int, int]]) -> None:
    """``path`` as a disk of ``size`` bytes shaped like a distribution's
    cloud image: GPT with a 1 MiB BIOS boot partition, an ESP of
    ``esp_sectors`` and the root last, no cidata; random bytes at each
    ``(offset, length)`` of ``data``, holes elsewhere (``sfdisk`` needed)."""
    with path.open("wb") as fh:
        fh.truncate(size)
    subprocess.run(["sfdisk", "-q", str(path)], check=True, timeout=30, input=(
        f"label: gpt\nsize=2048, type={BIOS_BOOT_TYPE}\n"
        f"size={esp_sectors}, type=U\ntype=L\n").encode())
    with path.open("r+b") as fh:
        for offset, length in data:
            fh.seek(offset)
            fh.write(os.urandom(length))
