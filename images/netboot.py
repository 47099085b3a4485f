"""The network boot loader of another architecture, for a node's TFTP root:
images/build/netboot-arm64/grubaa64.efi.

Debian ships no iPXE for arm64, so arm64 UEFI machines boot Debian's signed
GRUB network image (``grubnetaa64.efi.signed`` from ``grub-efi-arm64-signed``,
GRUB 2.06), the arm64 twin of the ``grubx64.efi`` the node serves Secure Boot
x86 machines: its prefix is ``/grub`` on the TFTP server it came from, so it
follows the same chain (``grub/grub.cfg`` → ``grub/<mac>.cfg`` → the catalog's
kernel and initrd, all over TFTP; bootsvc/tftp/chain.py).  On an arm64 node
with the package installed the node finds it itself
(bootsvc.tftp.root.SIGNED_LOADERS); an amd64 node cannot install an arm64
package without a foreign dpkg architecture, so this build takes the .deb
from the mirror's verified arm64 index and the operator copies the file into
the node's TFTP root (README: arm64).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from images.common import (
    CACHE,
    OUT,
    code_digest,
    fresh_dir,
    key_of,
    log,
    publish,
    sha256_file,
    up_to_date,
)
from images.debian import extract_deb, fetch_package

#: Debian architecture -> (signed GRUB package, its network image, the TFTP name)
NETBOOT_GRUB = {
    "arm64": ("grub-efi-arm64-signed", "usr/lib/grub/arm64-efi-signed/grubnetaa64.efi.signed",
              "grubaa64.efi"),
}


def netboot_name(arch: str) -> str:
    """The directory under images/build/ (``netboot-arm64``)."""
    return f"netboot-{arch}"


def build_netboot_grub(*, arch: str = "arm64", force: bool = False) -> Path:
    """Build (or reuse) images/build/netboot-<arch>/<tftp name> (+ manifest)."""
    package, member, tftp_name = NETBOOT_GRUB[arch]
    deb, version = fetch_package(package, arch)
    key = key_of({"deb": deb.name, "version": version, "code": code_digest()})
    out = OUT / netboot_name(arch)
    if not force and up_to_date(out, key, [tftp_name]):
        log(f"{netboot_name(arch)} up to date ({out})")
        return out
    unpacked = fresh_dir(CACHE / f"{package}.tmp")
    extract_deb(deb, unpacked)
    tmp_out = fresh_dir(OUT / f"{netboot_name(arch)}.tmp")
    shutil.copy2(unpacked / member, tmp_out / tftp_name)
    (tmp_out / "manifest.json").write_text(json.dumps(
        {"package": package, "version": version, "file": member,
         "sha256": sha256_file(tmp_out / tftp_name)}, indent=2, sort_keys=True) + "\n")
    publish(tmp_out, out, key)
    shutil.rmtree(unpacked, ignore_errors=True)
    log(f"{netboot_name(arch)}: {tftp_name} from {package} {version}")
    return out
