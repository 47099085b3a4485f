"""The lab's target OS disk image: images/build/lab-os/lab-os.img (+ .sha256).

A GPT disk written without mounting anything (``sfdisk``, ``mformat``,
``mcopy``, ``syslinux --offset``): an EFI system partition holding GRUB
standalone for UEFI, syslinux with gptmbr.bin for BIOS, the Debian kernel
and a busybox initramfs, and an empty FAT partition labelled CIDATA that the
agent fills with the NoCloud seed.  Partition GUIDs and FAT serials derive
from the cache key, so the same inputs give the same bytes.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from images.common import (
    ARCH,
    CACHE,
    HERE,
    OUT,
    SOURCE_DATE_EPOCH,
    BuildError,
    code_digest,
    copy_overlay,
    derived_uuid,
    fresh_dir,
    key_of,
    log,
    publish,
    run,
    sha256_file,
    tree_digest,
    up_to_date,
    write_stamp,
)
from images.cpio import pack_initramfs, set_times
from images.debian import extract_deb, fetch_package, read_package_version
from images.kernel import Kernel, install_modules, stage_kernel

#: The lab OS only needs to find its disk and its NIC under QEMU.
LAB_OS_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "e1000",
                  "e1000e", "ahci", "sd_mod", "nvme", "vfat", "nls_cp437", "nls_ascii",
                  "nls_iso8859_1", "nls_utf8")

ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
DATA_TYPE = "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7"
SECTOR = 512
MIB = 1 << 20
#: FAT geometry both partitions are formatted with (heads, sectors per track)
FAT_HEADS, FAT_SECTORS = 64, 32
#: the lab OS initramfs: busybox's directories and the seed's mount point
LAB_OS_DIRS = ("bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp", "mnt/seed",
               "usr/bin", "usr/sbin", "var/lib/lab-os")
#: GRUB modules in the EFI binary: enough to read its memdisk config and
#: boot a kernel from the FAT partition labelled LABOSBOOT
GRUB_MODULES = ("memdisk", "tar", "normal", "configfile", "part_gpt", "fat", "search",
                "search_label", "linux", "echo", "test", "gzio")


@dataclass(frozen=True)
class DiskGeometry:
    """Byte offsets of the lab OS disk: the ESP from 1 MiB (sector 2048, the
    first usable LBA), the CIDATA partition right after it, and 1 MiB at the
    end for the backup GPT."""

    esp_start: int = 1 * MIB
    esp_size: int = 24 * MIB
    seed_size: int = 4 * MIB

    @property
    def seed_start(self) -> int:
        return self.esp_start + self.esp_size

    @property
    def total(self) -> int:
        return self.seed_start + self.seed_size + 1 * MIB


LAB_OS_DISK = DiskGeometry()
#: arm64's: Debian's arm64 kernel is an uncompressed EFI-stub Image (33 MB)
LAB_OS_DISK_ARM64 = DiskGeometry(esp_size=48 * MIB)


_uuid_from = derived_uuid


def render_gpt_layout(key: str, disk: DiskGeometry = LAB_OS_DISK) -> str:
    """The sfdisk script of the lab OS disk: the ESP (bootable for BIOS
    through syslinux's gptmbr) and the ``cidata`` partition, with GUIDs
    derived from ``key`` so the same inputs give the same disk."""
    return (
        "label: gpt\n"
        f"label-id: {_uuid_from(key, 'disk')}\n"
        "first-lba: 2048\n"
        f"start={disk.esp_start // SECTOR}, size={disk.esp_size // SECTOR}, type={ESP_TYPE}, "
        f"uuid={_uuid_from(key, 'esp')}, name=\"lab-os-boot\", attrs=\"LegacyBIOSBootable\"\n"
        f"start={disk.seed_start // SECTOR}, size={disk.seed_size // SECTOR}, type={DATA_TYPE}, "
        f"uuid={_uuid_from(key, 'seed')}, name=\"cidata\"\n"
    )


def mformat_command(image: Path, start: int, size: int, label: str, serial: str) -> list[str]:
    """``mformat`` of the FAT file system at byte ``start`` of ``image`` (no
    mount): ``size`` bytes, volume ``label`` and ``serial`` (hex)."""
    return ["mformat", "-i", f"{image}@@{start}", "-T", str(size // SECTOR),
            "-h", str(FAT_HEADS), "-s", str(FAT_SECTORS), "-H", str(start // SECTOR),
            "-v", label, "-N", serial, "::"]


def stage_busybox(arch: str = ARCH) -> tuple[Path, str]:
    """busybox-static's binary (of the Debian architecture ``arch``),
    unpacked into the cache once per package version, and that version."""
    deb, version = fetch_package("busybox-static", arch)
    bdir = CACHE / ("busybox-static" if arch == ARCH else f"busybox-static-{arch}")
    key = key_of({"deb": deb.name})
    if not up_to_date(bdir, key):
        shutil.rmtree(bdir, ignore_errors=True)
        extract_deb(deb, bdir)
        write_stamp(bdir, key)
    return bdir / "bin" / "busybox", version


@dataclass(frozen=True)
class EfiGrub:
    """How the lab OS's GRUB is made for one architecture: grub-mkimage's
    platform, its module directory (``None``: the host's), the removable
    media path the firmware boots and the package version (a cache input)."""

    platform: str
    moddir: Path | None
    efi_name: str
    version: str


def stage_efi_grub(arch: str = ARCH) -> EfiGrub:
    """The host's grub-efi-amd64-bin for amd64; for arm64 the modules of
    Debian's grub-efi-arm64-bin, unpacked into the cache once per version
    (the host's grub-mkimage builds an arm64-efi image from them)."""
    if arch == ARCH:
        return EfiGrub("x86_64-efi", None, "BOOTX64.EFI",
                       read_package_version("grub-efi-amd64-bin"))
    if arch != "arm64":
        raise BuildError(f"no lab OS for {arch}: amd64 or arm64")
    deb, version = fetch_package("grub-efi-arm64-bin", arch)
    gdir = CACHE / "grub-efi-arm64-bin"
    key = key_of({"deb": deb.name})
    if not up_to_date(gdir, key):
        shutil.rmtree(gdir, ignore_errors=True)
        extract_deb(deb, gdir)
        write_stamp(gdir, key)
    return EfiGrub("arm64-efi", gdir / "usr/lib/grub/arm64-efi", "BOOTAA64.EFI", version)


def lab_os_name(arch: str = ARCH) -> str:
    """The lab OS's directory under images/build/ (``lab-os``, ``lab-os-arm64``)."""
    return "lab-os" if arch == ARCH else f"lab-os-{arch}"


def build_lab_os(*, force: bool = False, arch: str = ARCH) -> Path:
    """Build (or reuse) images/build/lab-os/lab-os.img (+ .sha256).  For
    another Debian architecture (``arm64``): images/build/lab-os-<arch>/,
    UEFI only (GRUB for that architecture, its kernel and busybox-static; no
    syslinux: BIOS is x86's)."""
    started = time.monotonic()
    kernel = stage_kernel(arch)
    busybox, bb_version = stage_busybox(arch)
    src_dir = HERE / "lab-os"
    grub = stage_efi_grub(arch)
    grub_version = grub.version
    bios = arch == ARCH
    syslinux_version = read_package_version("syslinux") if bios else "none"
    if not grub_version or not syslinux_version:
        raise BuildError("the lab OS build needs grub-efi-amd64-bin, syslinux, mtools and "
                         "fdisk: run 'scripts/setup.sh system'")
    inputs: dict[str, object] = {
        "kernel": kernel.package_version, "busybox": bb_version, "grub": grub_version,
        "syslinux": syslinux_version, "modules": LAB_OS_MODULES,
        "overlay": tree_digest([p for p in src_dir.rglob("*") if p.is_file()], src_dir),
        "code": code_digest(),
    }
    if not bios:
        inputs["arch"] = arch
    key = key_of(inputs)
    disk = LAB_OS_DISK if bios else LAB_OS_DISK_ARM64
    out = OUT / lab_os_name(arch)
    if not force and up_to_date(out, key, ["lab-os.img", "lab-os.img.sha256"]):
        log(f"lab-os image up to date ({out})")
        return out
    log("building the lab-os disk image")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), MTOOLS_SKIP_CHECK="1",
               TZ="UTC")
    with tempfile.TemporaryDirectory(prefix="lab-os-", dir=CACHE) as tmpname:
        tmp = Path(tmpname)
        initrd = pack_lab_os_initramfs(kernel, busybox, src_dir / "rootfs", tmp)
        cfg = src_dir / ("grub.cfg" if bios else f"grub-{arch}.cfg")
        efi = write_grub_efi(cfg, tmp, env, grub)
        img = tmp / "lab-os.img"
        write_lab_os_disk(img, key, env, disk)
        shutil.copy2(kernel.vmlinuz, tmp / "vmlinuz")
        files = [(tmp / "vmlinuz", "::/vmlinuz"), (initrd, "::/initrd.img"),
                 (efi, f"::/EFI/BOOT/{grub.efi_name}")]
        if bios:
            syslinux_cfg = tmp / "syslinux.cfg"
            shutil.copyfile(src_dir / "syslinux.cfg", syslinux_cfg)
            files.append((syslinux_cfg, "::/syslinux/syslinux.cfg"))
        copy_to_esp(img, env, files, disk)
        if bios:
            install_syslinux(img, env)
        digest = sha256_file(img)
        tmp_out = fresh_dir(OUT / f"{lab_os_name(arch)}.tmp")
        img.rename(tmp_out / "lab-os.img")
        (tmp_out / "lab-os.img.sha256").write_text(digest + "\n")
        (tmp_out / "manifest.json").write_text(json.dumps(
            {"sha256": digest, "size": disk.total, "kernel": kernel.version,
             "inputs": inputs}, indent=2, sort_keys=True) + "\n")
        publish(tmp_out, out, key)
    log(f"{lab_os_name(arch)} image: {disk.total >> 20} MiB, sha256 {digest[:16]}... in "
        f"{time.monotonic() - started:.0f} s")
    return out


def pack_lab_os_initramfs(kernel: Kernel, busybox: Path, overlay: Path, tmp: Path) -> Path:
    """tmp/initrd.img: busybox-static, the overlay and a few modules (gzip)."""
    root = tmp / "root"
    for d in LAB_OS_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(busybox, root / "bin" / "busybox")
    (root / "bin" / "sh").symlink_to("busybox")
    copy_overlay(overlay, root)
    install_modules(kernel, LAB_OS_MODULES, root)
    set_times(root)
    initrd = tmp / "initrd.img"
    pack_initramfs(root, initrd, compressor="gzip")
    return initrd


def write_grub_efi(grub_cfg: Path, tmp: Path, env: dict[str, str],
                   grub: EfiGrub | None = None) -> Path:
    """tmp/BOOTX64.EFI (``grub``: its platform and name, e.g. BOOTAA64.EFI):
    GRUB for UEFI, one standalone EFI binary with its config inside.
    grub-mkimage gets a memdisk tar packed here with fixed times:
    grub-mkstandalone's tar carries the build time, so no two builds would
    give the same bytes."""
    memdisk = tmp / "memdisk.tar"
    info = tarfile.TarInfo("boot/grub/grub.cfg")
    cfg = grub_cfg.read_bytes()
    info.size, info.mtime, info.mode = len(cfg), SOURCE_DATE_EPOCH, 0o644
    with tarfile.open(memdisk, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(cfg))
    grub = grub or stage_efi_grub()
    efi = tmp / grub.efi_name
    moddir = ["-d", str(grub.moddir)] if grub.moddir is not None else []
    run(["grub-mkimage", "-O", grub.platform, *moddir, "-o", str(efi),
         "-p", "(memdisk)/boot/grub", "-m", str(memdisk), *GRUB_MODULES],
        env=env, capture_output=True)
    return efi


def write_lab_os_disk(img: Path, key: str, env: dict[str, str],
                      disk: DiskGeometry = LAB_OS_DISK) -> None:
    """``img`` as the empty lab OS disk: the GPT, the ESP formatted with the
    directories the boot files go to, CIDATA formatted and empty (the agent
    writes the seed).  FAT serials derive from ``key``."""
    with img.open("wb") as fh:
        fh.truncate(disk.total)
    run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(img)],
        input=render_gpt_layout(key, disk).encode(), capture_output=True, env=env)
    serial = key[:8]
    run(mformat_command(img, disk.esp_start, disk.esp_size, "LABOSBOOT", serial),
        env=env, capture_output=True)
    run(mformat_command(img, disk.seed_start, disk.seed_size, "CIDATA", serial[::-1]),
        env=env, capture_output=True)
    run(["mmd", "-i", f"{img}@@{disk.esp_start}", "::/EFI", "::/EFI/BOOT", "::/syslinux"],
        env=env, capture_output=True)


def copy_to_esp(img: Path, env: dict[str, str], files: Iterable[tuple[Path, str]],
                disk: DiskGeometry = LAB_OS_DISK) -> None:
    """Copy (local file, ESP path) pairs into the ESP, each with its time
    set to SOURCE_DATE_EPOCH first (``mcopy -m`` keeps it)."""
    for src, dst in files:
        os.utime(src, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        run(["mcopy", "-i", f"{img}@@{disk.esp_start}", "-m", str(src), dst], env=env,
            capture_output=True)


def install_syslinux(img: Path, env: dict[str, str], disk: DiskGeometry = LAB_OS_DISK) -> None:
    """BIOS boot: syslinux's VBR and ldlinux.sys into the ESP, gptmbr.bin
    into the MBR's boot code (the first 440 bytes; the partition table stays)."""
    run(["syslinux", "--install", "--offset", str(disk.esp_start), "--directory", "/syslinux",
         str(img)], env=env, capture_output=True)
    mbr = Path("/usr/lib/syslinux/mbr/gptmbr.bin").read_bytes()[:440]
    with img.open("r+b") as fh:
        fh.write(mbr)
