"""Build the live agent image and the lab's target OS disk image.

    python3 images/build.py live      # images/build/live/{vmlinuz,initrd.img,manifest.json}
    python3 images/build.py lab-os    # images/build/lab-os/{lab-os.img,lab-os.img.sha256}
    python3 images/build.py debian-12 # images/build/debian-12/*.{raw,qcow2,raw.zst}
    python3 images/build.py all       # all three (what ``make images`` runs)
    python3 images/build.py arm64     # images/build/{live-arm64,lab-os-arm64,netboot-arm64}/

Everything comes from Debian packages fetched with Debian's own tools
(``debootstrap``, ``apt-get download``) from the mirror apt is configured
with; nothing is loop-mounted (the disk image is written with ``sfdisk``,
``mformat``/``mcopy`` and ``syslinux --offset``), so the build needs root only
for debootstrap's chroot.

Caching: every stage writes a ``.stamp`` holding the sha256 of its inputs (the
package list, the resolved package versions, the files it copies, the
build's code in images/*.py).  A stage whose stamp matches is skipped, so a
second build with nothing changed rebuilds nothing; changing ``agent/``
rebuilds only the live initramfs.  Outputs are byte-reproducible for a given
set of inputs: file order is sorted, every timestamp is ``SOURCE_DATE_EPOCH``
(fixed in images/common.py), GPT and FAT identifiers are derived from the
inputs' hash.

Stages (cache under ``images/build/cache``), and the module each lives in:

``rootfs``   debootstrap minbase bookworm + python3, psutil, pyudev, udev, ...
             (images/live.py)
``kernel``   Debian's ``linux-image-amd64`` (vmlinuz + modules.dep + modules)
             (images/kernel.py)
``busybox``  Debian's ``busybox-static`` (the lab OS's whole userland)
             (images/lab_os.py)
``live``     trimmed rootfs + a module subset + lpmos/ and agent/ + /init,
             packed as a sorted newc cpio (images/cpio.py) compressed with zstd
             (images/live.py)
``cloud-rootfs`` debootstrap + apt-get install of the real Debian image's
             packages (images/debian_cloud.py)
``debian-12`` the real Debian 12 cloud image: GPT with BIOS boot, ESP (signed
             shim + GRUB) and an ext4 root made with ``mkfs.ext4 -d``; raw,
             qcow2 and raw.zst with their sha256 (images/debian_cloud.py)
``lab-os``   a GPT disk image: an EFI system partition (GRUB standalone for
             UEFI, syslinux with gptmbr.bin for BIOS, kernel + a busybox
             initramfs) and an empty FAT partition labelled CIDATA that the
             agent fills with the NoCloud seed (images/lab_os.py)

``arm64``    the same live image and lab OS from Debian's arm64 packages
             (fetched through the mirror's verified arm64 index, unpacked
             with no arm64 program run but ldconfig and busybox under
             qemu-user-static), and Debian's signed arm64 GRUB network image
             for the node's TFTP root (images/netboot.py); every cache
             directory and output carries ``arm64`` in its name

This module is the command line and the entry points callers import
(``build.build_live()``, ``build.build_lab_os()``, ``build.BuildError``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    # run as a script (python3 images/build.py, make -C images): the
    # project root, which holds the images package, is not on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from images.common import SOURCE_DATE_EPOCH, BuildError, log, sha256_file
from images.cpio import write_cpio
from images.debian_cloud import build_debian_cloud
from images.lab_os import build_lab_os
from images.live import build_live
from images.netboot import build_netboot_grub

__all__ = ["SOURCE_DATE_EPOCH", "BuildError", "build_arm64", "build_debian_cloud",
           "build_lab_os", "build_live", "main", "sha256_file", "write_cpio"]


def build_arm64(*, force: bool = False) -> dict[str, Path]:
    """The arm64 set: ``{"live": dir, "lab-os": dir, "netboot": dir}``
    (images/build/live-arm64, lab-os-arm64, netboot-arm64)."""
    return {"live": build_live(force=force, arch="arm64"),
            "lab-os": build_lab_os(force=force, arch="arm64"),
            "netboot": build_netboot_grub(force=force, arch="arm64")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="images/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("live", "lab-os", "debian-12", "all", "arm64"))
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        if args.target in ("live", "all"):
            build_live(force=args.force)
        if args.target in ("lab-os", "all"):
            build_lab_os(force=args.force)
        if args.target in ("debian-12", "all"):
            build_debian_cloud(force=args.force)
        if args.target == "arm64":
            build_arm64(force=args.force)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
