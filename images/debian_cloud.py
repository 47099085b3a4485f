"""The real target image: Debian 12 as a distribution's generic cloud image,
images/build/debian-12/debian-12-generic-amd64.{raw,qcow2,raw.zst} (+ .sha256).

What is in it: systemd, ``linux-image-amd64``, GRUB for BIOS (``grub-pc``)
and for UEFI Debian's signed shim and GRUB (``shim-signed``,
``grub-efi-amd64-signed``, so the same disk boots with Secure Boot on),
``cloud-init``, ``openssh-server``, ``cloud-guest-utils`` (growpart) and the
usual server basics.  Like Debian's own genericcloud image it has no
``cidata`` partition (the agent adds the seed) and its root file system is
the last partition, which cloud-init's growpart grows to the disk at first
boot.

How it is built, and why not with an image builder: mkosi 14, vmdb2,
diskimage-builder and FAI all partition a loop device and mount its
partitions (``losetup --partscan`` or ``kpartx``).  On this machine, and in
CI, a loop device shows no partitions (the kernel does no partition scan for
it; there is no device-mapper for kpartx), so none of them can run.  The
build therefore uses Debian's own tools on files only, like the lab OS:

``stage_cloud_rootfs``  debootstrap minbase, then ``apt-get install
                        --no-install-recommends`` of :data:`CLOUD_PACKAGES`
                        inside the chroot (cached: the slow stage)
``build_debian_cloud``  the tree's clean-up (machine-id, SSH host keys, apt
                        lists), fstab and GRUB's configuration; the ext4
                        root made from the tree with ``mkfs.ext4 -d`` and the
                        ESP with ``mformat``/``mcopy`` (no mount); the GPT
                        with ``sfdisk``; GRUB's BIOS boot code written into
                        the MBR and the BIOS boot partition (see
                        :func:`install_bios_grub`); then ``qemu-img convert
                        -c`` (qcow2) and ``zstd`` (raw.zst), each with its
                        sha256.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from images.common import (
    ARCH,
    CACHE,
    OUT,
    SOURCE_DATE_EPOCH,
    SUITE,
    BuildError,
    code_digest,
    derived_uuid,
    fresh_dir,
    key_of,
    log,
    publish,
    run,
    sha256_file,
    up_to_date,
    write_stamp,
)
from images.cpio import set_times
from images.debian import debian_mirror

#: The image's packages beyond minbase (installed without recommends).
CLOUD_PACKAGES = (
    "systemd", "systemd-sysv", "udev", "dbus", "linux-image-amd64", "initramfs-tools",
    "grub-pc", "grub-efi-amd64-signed", "shim-signed",
    "cloud-init", "cloud-guest-utils", "openssh-server", "e2fsprogs", "fdisk",
    "ifupdown", "isc-dhcp-client", "ifenslave", "vlan", "iproute2", "iputils-ping",
    "netbase", "ca-certificates", "curl", "sudo", "less", "procps", "vim-tiny",
    "systemd-timesyncd", "locales", "python3-netifaces",
)

#: what dpkg leaves out of the image (as Debian's minimal images do): docs,
#: man pages and translations; copyright files stay
DPKG_EXCLUDES = (
    "path-exclude=/usr/share/doc/*", "path-include=/usr/share/doc/*/copyright",
    "path-exclude=/usr/share/man/*", "path-exclude=/usr/share/info/*",
    "path-exclude=/usr/share/locale/*", "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/lintian/*",
)

SECTOR = 512
MIB = 1 << 20
BIOS_BOOT_TYPE = "21686148-6449-6E6F-744E-656564454649"
ESP_TYPE = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B"
LINUX_ROOT_X86_64 = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709"
#: kernel command line: both consoles (a lab VM's log is its serial port)
KERNEL_ARGS = "ro console=tty0 console=ttyS0,115200n8"
#: the GRUB modules of the BIOS core image: enough to find the root file
#: system by UUID on a GPT disk and read /boot/grub from it
BIOS_GRUB_MODULES = ("biosdisk", "part_gpt", "part_msdos", "ext2", "search_fs_uuid",
                     "normal", "configfile", "echo", "test")


@dataclass(frozen=True)
class CloudDisk:
    """The disk layout (bytes): BIOS boot partition at 1 MiB, the ESP after
    it, the root file system to the end (1 MiB left for the backup GPT)."""

    total: int = 2048 * MIB
    bios_start: int = 1 * MIB
    bios_size: int = 1 * MIB
    esp_size: int = 126 * MIB

    @property
    def esp_start(self) -> int:
        return self.bios_start + self.bios_size

    @property
    def root_start(self) -> int:
        return self.esp_start + self.esp_size

    @property
    def root_size(self) -> int:
        return self.total - self.root_start - 1 * MIB


CLOUD_DISK = CloudDisk()
NAME = "debian-12-generic-amd64"


def _chroot_env() -> dict[str, str]:
    return {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "DEBIAN_FRONTEND": "noninteractive",
            "LC_ALL": "C.UTF-8", "HOME": "/root", "SOURCE_DATE_EPOCH": str(SOURCE_DATE_EPOCH)}


class Mounts:
    """/proc, /sys and /dev mounted into a chroot for the time of a block;
    unmounted (lazily, in reverse) whatever happens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.done: list[Path] = []

    def __enter__(self) -> Mounts:
        for what, fstype, opts in (("proc", "proc", None), ("sys", "sysfs", None),
                                   ("dev", None, "bind"), ("dev/pts", "devpts", None)):
            target = self.root / what
            target.mkdir(parents=True, exist_ok=True)
            cmd = ["mount"]
            if opts == "bind":
                cmd += ["--bind", f"/{what}", str(target)]
            else:
                cmd += ["-t", str(fstype), what, str(target)]
            run(cmd, capture_output=True)
            self.done.append(target)
        return self

    def __exit__(self, *exc: object) -> None:
        for target in reversed(self.done):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        self.done.clear()


def chroot(root: Path, *cmd: str, timeout: float = 1800) -> None:
    run(["chroot", str(root), *cmd], env=_chroot_env(), capture_output=True, timeout=timeout)


def stage_cloud_rootfs() -> tuple[Path, str]:
    """debootstrap + apt-get install of CLOUD_PACKAGES, once per package list
    (the mirror is not part of the key).  Returns the tree and its key."""
    mirror = debian_mirror()
    key = key_of({"suite": SUITE, "arch": ARCH, "packages": sorted(CLOUD_PACKAGES),
                  "excludes": DPKG_EXCLUDES, "step": 2})
    out = CACHE / "cloud-rootfs"
    if up_to_date(out, key, ["boot/grub", "usr/bin/cloud-init"]):
        return out, key
    if os.geteuid() != 0:
        raise BuildError("building the Debian cloud image needs root (debootstrap, chroot)")
    tmp = CACHE / "cloud-rootfs.tmp"
    for path in (out, tmp):
        _remove_tree(path)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    log(f"debootstrap {SUITE} for the Debian cloud image from {mirror}")
    run(["debootstrap", "--variant=minbase", f"--arch={ARCH}", SUITE, str(tmp), mirror],
        capture_output=True)
    (tmp / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
    (tmp / "etc/dpkg/dpkg.cfg.d/01-lpmos-nodoc").write_text("\n".join(DPKG_EXCLUDES) + "\n")
    (tmp / "etc/apt/sources.list").write_text(
        f"deb {mirror} {SUITE} main\ndeb {mirror} {SUITE}-updates main\n"
        f"deb {mirror}-security {SUITE}-security main\n")
    # no service starts inside the build's chroot
    policy = tmp / "usr/sbin/policy-rc.d"
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    # grub-pc's postinst must not ask where to install (the build does that)
    (tmp / "tmp/debconf.sel").write_text(
        "grub-pc grub-pc/install_devices multiselect\n"
        "grub-pc grub-pc/install_devices_empty boolean true\n")
    with Mounts(tmp):
        chroot(tmp, "debconf-set-selections", "/tmp/debconf.sel")
        log("apt-get install of the cloud image's packages (a few minutes)")
        chroot(tmp, "apt-get", "update", "-q")
        chroot(tmp, "apt-get", "install", "-y", "-q", "--no-install-recommends",
               *CLOUD_PACKAGES)
        chroot(tmp, "apt-get", "clean")
    policy.unlink()
    (tmp / "tmp/debconf.sel").unlink()
    log(f"cloud image root file system done in {time.monotonic() - started:.0f} s")
    tmp.rename(out)
    write_stamp(out, key)
    return out, key


def _remove_tree(path: Path) -> None:
    """rm -rf that first makes sure nothing is still mounted below ``path``."""
    if not path.exists():
        return
    mounts = Path("/proc/self/mounts").read_text().splitlines()
    for line in reversed(mounts):
        target = line.split()[1]
        if target.startswith(str(path) + "/"):
            subprocess.run(["umount", "-l", target], capture_output=True, check=False)
    shutil.rmtree(path)


def _uuid(key: str, what: str) -> str:
    return derived_uuid(key, what).lower()


def grub_cfg(root_uuid: str, kernel_version: str) -> str:
    """/boot/grub/grub.cfg of the image: what ``update-grub`` writes, reduced
    to the one kernel (the installed system's ``update-grub`` rewrites it
    at its first kernel upgrade).  Only commands built into Debian's signed
    GRUB, so Secure Boot loads nothing unsigned."""
    return (
        "set default=0\nset timeout=1\n"
        "serial --unit=0 --speed=115200\nterminal_input console serial\n"
        "terminal_output console serial\n"
        f"search --no-floppy --fs-uuid --set=root {root_uuid}\n"
        "menuentry 'Debian GNU/Linux' {\n"
        f"  linux /boot/vmlinuz-{kernel_version} root=UUID={root_uuid} {KERNEL_ARGS}\n"
        f"  initrd /boot/initrd.img-{kernel_version}\n"
        "}\n")


def esp_grub_cfg(root_uuid: str) -> str:
    """The ESP's grub.cfg (EFI/debian/, where Debian's signed GRUB looks):
    hand over to the root file system's /boot/grub/grub.cfg, as
    ``grub-install`` on Debian does."""
    return (f"search.fs_uuid {root_uuid} root\n"
            "set prefix=($root)'/boot/grub'\nconfigfile $prefix/grub.cfg\n")


def render_cloud_gpt(key: str, disk: CloudDisk = CLOUD_DISK) -> str:
    """The sfdisk script of the image: BIOS boot, ESP, root (last, so
    growpart can grow it), GUIDs derived from ``key``."""
    s = SECTOR
    return (
        "label: gpt\n"
        f"label-id: {_uuid(key, 'disk').upper()}\n"
        "first-lba: 2048\n"
        f"start={disk.bios_start // s}, size={disk.bios_size // s}, type={BIOS_BOOT_TYPE}, "
        f"uuid={_uuid(key, 'bios').upper()}, name=\"bios\"\n"
        f"start={disk.esp_start // s}, size={disk.esp_size // s}, type={ESP_TYPE}, "
        f"uuid={_uuid(key, 'esp').upper()}, name=\"esp\"\n"
        f"start={disk.root_start // s}, size={disk.root_size // s}, type={LINUX_ROOT_X86_64}, "
        f"uuid={_uuid(key, 'root-part').upper()}, name=\"root\"\n")


#: offsets in GRUB's boot.img (grub-core/boot/i386/pc/boot.S) and the
#: blocklist at the end of core.img's first sector (diskboot.S)
BOOT_KERNEL_SECTOR = 0x5C
BOOT_DRIVE_CHECK = 0x66
MBR_CODE_END = 440
BLOCKLIST_ENTRY = 12
KERNEL_SEGMENT = 0x820


def build_bios_boot(boot_img: bytes, core_img: bytes, mbr: bytes,
                    core_lba: int) -> tuple[bytes, bytes]:
    """(new MBR, core.img to write at ``core_lba``): what ``grub-bios-setup``
    does for a core image embedded in a BIOS boot partition, done on bytes
    because grub-bios-setup wants a block device.  boot.img's code goes into
    the MBR's first 440 bytes (the partition table and signature stay), with
    the LBA of core.img and the hard-disk NOPs in place of the floppy drive
    check; core.img's first sector (diskboot) gets one blocklist entry: the
    rest of core.img, contiguous after it, loaded at segment 0x820."""
    if len(boot_img) != SECTOR or len(mbr) != SECTOR:
        raise BuildError("boot.img and the MBR must be one sector each")
    if len(core_img) % SECTOR:
        core_img += b"\0" * (SECTOR - len(core_img) % SECTOR)
    sectors = len(core_img) // SECTOR
    if sectors < 2 or sectors - 1 > 0xFFFF:
        raise BuildError(f"core.img of {sectors} sectors cannot be embedded")
    code = bytearray(boot_img[:MBR_CODE_END])
    struct.pack_into("<Q", code, BOOT_KERNEL_SECTOR, core_lba)
    code[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] = b"\x90\x90"
    new_mbr = bytes(code) + mbr[MBR_CODE_END:]
    core = bytearray(core_img)
    entry = SECTOR - BLOCKLIST_ENTRY
    struct.pack_into("<QHH", core, entry, core_lba + 1, sectors - 1, KERNEL_SEGMENT)
    core[entry - BLOCKLIST_ENTRY:entry] = b"\0" * BLOCKLIST_ENTRY   # the list's end
    return new_mbr, bytes(core)


def prepare_tree(stage: Path, root_uuid: str, esp_serial: str, kernel_version: str) -> None:
    """What turns the chroot into an image: no machine identity (machine-id,
    SSH host keys: each machine makes its own at first boot), no apt lists,
    logs or resolv.conf of the build host; fstab; GRUB's config and its BIOS
    modules under /boot/grub; /etc/default/grub so the machine's own
    update-grub keeps the serial console."""
    (stage / "etc/machine-id").write_text("")
    (stage / "var/lib/dbus/machine-id").unlink(missing_ok=True)
    for key_file in (stage / "etc/ssh").glob("ssh_host_*"):
        key_file.unlink()
    for sub in ("var/lib/apt/lists", "var/cache/apt", "var/log", "tmp", "var/tmp"):
        target = stage / sub
        if target.is_dir():
            for child in target.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                elif child.name != "lock":
                    child.unlink()
    (stage / "var/lib/apt/lists/partial").mkdir(parents=True, exist_ok=True)
    resolv = stage / "etc/resolv.conf"
    if resolv.is_symlink() or resolv.exists():
        resolv.unlink()
    (stage / "etc/hostname").write_text("localhost\n")
    # C.UTF-8 needs no generation: cloud-init's locale module then has
    # nothing to do (with no /etc/default/locale it asks locale-gen for
    # en_US.UTF-8, which fails on a minimal system and marks the run failed)
    (stage / "etc/default/locale").write_text("LANG=C.UTF-8\n")
    (stage / "etc/hosts").write_text("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost "
                                     "ip6-loopback\n")
    (stage / "etc/fstab").write_text(
        f"UUID={root_uuid}\t/\text4\terrors=remount-ro\t0\t1\n"
        f"UUID={esp_serial[:4]}-{esp_serial[4:]}\t/boot/efi\tvfat\tumask=0077,nofail\t0\t1\n")
    (stage / "boot/efi").mkdir(parents=True, exist_ok=True)
    (stage / "etc/network/interfaces").write_text(
        "# cloud-init writes the machine's network to interfaces.d/50-cloud-init\n"
        "auto lo\niface lo inet loopback\n\nsource /etc/network/interfaces.d/*\n")
    (stage / "etc/default/grub.d").mkdir(parents=True, exist_ok=True)
    (stage / "etc/default/grub.d/50-lpmos-cloud.cfg").write_text(
        f'GRUB_CMDLINE_LINUX_DEFAULT="{KERNEL_ARGS.removeprefix("ro ")}"\n'
        'GRUB_TERMINAL="console serial"\nGRUB_SERIAL_COMMAND="serial --speed=115200"\n'
        "GRUB_TIMEOUT=1\n")
    grub = stage / "boot/grub"
    grub.mkdir(parents=True, exist_ok=True)
    (grub / "grub.cfg").write_text(grub_cfg(root_uuid, kernel_version))
    modules = grub / "i386-pc"
    shutil.rmtree(modules, ignore_errors=True)
    shutil.copytree(stage / "usr/lib/grub/i386-pc", modules)


def kernel_version_of(stage: Path) -> str:
    found = sorted(p.name.removeprefix("vmlinuz-") for p in (stage / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise BuildError(f"expected one kernel in the cloud image's /boot, found {found}")
    if not (stage / f"boot/initrd.img-{found[0]}").exists():
        raise BuildError(f"the cloud image has no initramfs for {found[0]}")
    return found[0]


ESP_FILES = (
    # (file in the tree, path on the ESP)
    ("usr/lib/shim/shimx64.efi.signed", "EFI/BOOT/BOOTX64.EFI"),
    ("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed", "EFI/BOOT/grubx64.efi"),
    ("usr/lib/shim/mmx64.efi.signed", "EFI/BOOT/mmx64.efi"),
    ("usr/lib/shim/shimx64.efi.signed", "EFI/debian/shimx64.efi"),
    ("usr/lib/grub/x86_64-efi-signed/grubx64.efi.signed", "EFI/debian/grubx64.efi"),
    ("usr/lib/shim/mmx64.efi.signed", "EFI/debian/mmx64.efi"),
)


def write_esp(img: Path, stage: Path, tmp: Path, root_uuid: str, serial: str,
              env: dict[str, str], disk: CloudDisk = CLOUD_DISK) -> None:
    """The ESP, FAT32, written with mtools at its offset: shim as the
    removable-media loader EFI/BOOT/BOOTX64.EFI beside Debian's signed GRUB,
    and the same under EFI/debian (where the signed GRUB reads grub.cfg,
    and where a boot entry would point).  shim's fallback (fbx64.efi) is
    left out on purpose: it would add a boot entry ahead of the network
    boot at the first disk boot, and LPMOS needs PXE to stay first."""
    at = f"{img}@@{disk.esp_start}"
    run(["mformat", "-i", at, "-F", "-T", str(disk.esp_size // SECTOR), "-h", "64", "-s", "32",
         "-H", str(disk.esp_start // SECTOR), "-v", "EFI", "-N", serial, "::"],
        env=env, capture_output=True)
    run(["mmd", "-i", at, "::/EFI", "::/EFI/BOOT", "::/EFI/debian"], env=env,
        capture_output=True)
    files = [(stage / src, dst) for src, dst in ESP_FILES]
    cfg = tmp / "grub.cfg"
    cfg.write_text(esp_grub_cfg(root_uuid))
    csv = tmp / "BOOTX64.CSV"
    csv.write_bytes("shimx64.efi,debian,,This is the boot entry for debian\n"
                    .encode("utf-16-le"))
    files += [(cfg, "EFI/debian/grub.cfg"), (cfg, "EFI/BOOT/grub.cfg"),
              (csv, "EFI/debian/BOOTX64.CSV")]
    for src, dst in files:
        if not src.exists():
            raise BuildError(f"the cloud image lacks {src}: is shim-signed installed?")
        local = tmp / "esp-file"
        shutil.copyfile(src, local)
        os.utime(local, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH))
        run(["mcopy", "-i", at, "-m", str(local), f"::/{dst}"], env=env, capture_output=True)


def install_bios_grub(img: Path, stage: Path, root_uuid: str,
                      disk: CloudDisk = CLOUD_DISK) -> None:
    """GRUB for BIOS: a core image made by the image's own grub-mkimage
    (grub-pc-bin), finding /boot/grub by the root file system's UUID,
    embedded into the BIOS boot partition; boot.img into the MBR."""
    early = stage / "tmp/lpmos-early.cfg"
    early.write_text(f"search.fs_uuid {root_uuid} root\nset prefix=($root)/boot/grub\n")
    chroot(stage, "grub-mkimage", "-O", "i386-pc", "-d", "/usr/lib/grub/i386-pc",
           "-o", "/tmp/lpmos-core.img", "-c", "/tmp/lpmos-early.cfg", "-p", "/boot/grub",
           *BIOS_GRUB_MODULES)
    core = (stage / "tmp/lpmos-core.img").read_bytes()
    for leftover in ("tmp/lpmos-early.cfg", "tmp/lpmos-core.img"):
        (stage / leftover).unlink()
    if len(core) > disk.bios_size:
        raise BuildError(f"GRUB's core image ({len(core)} bytes) does not fit the BIOS boot "
                         "partition")
    boot_img = (stage / "usr/lib/grub/i386-pc/boot.img").read_bytes()
    with img.open("r+b") as fh:
        mbr = fh.read(SECTOR)
        new_mbr, new_core = build_bios_boot(boot_img, core, mbr, disk.bios_start // SECTOR)
        fh.seek(0)
        fh.write(new_mbr)
        fh.seek(disk.bios_start)
        fh.write(new_core)


def write_root_fs(img: Path, stage: Path, root_uuid: str, key: str, env: dict[str, str],
                  disk: CloudDisk = CLOUD_DISK) -> None:
    """The ext4 root file system made from the tree at its offset in the
    disk file (``mkfs.ext4 -d``: no loop device, no mount).  The UUID, the
    directory hash seed and the file system's own times are fixed."""
    blocks = disk.root_size // 4096
    run(["mkfs.ext4", "-q", "-F", "-b", "4096", "-L", "root", "-U", root_uuid,
         "-E", f"offset={disk.root_start},hash_seed={_uuid(key, 'hash-seed')},"
               "lazy_itable_init=0,lazy_journal_init=0",
         "-d", str(stage), str(img), str(blocks)],
        env=dict(env, E2FSPROGS_FAKE_TIME=str(SOURCE_DATE_EPOCH)), capture_output=True)
    fix_inode_times(img, stage, disk.root_start, env)


def fix_inode_times(img: Path, stage: Path, offset: int, env: dict[str, str]) -> None:
    """Set every inode's change and creation times to SOURCE_DATE_EPOCH with
    debugfs.  ``mkfs.ext4 -d`` copies each file's ctime, which is when the
    build copied it and cannot be set from user space (e2fsprogs 1.47.0
    takes no SOURCE_DATE_EPOCH): without this, two builds differ in their
    inode tables and nowhere else."""
    lines = []
    for path in sorted(stage.rglob("*")):
        rel = "/" + str(path.relative_to(stage))
        if '"' in rel or "\n" in rel:   # debugfs reads names in double quotes
            raise BuildError(f"cannot fix the times of {rel!r}: an odd character in its name")
        for field in ("ctime", "crtime"):
            lines.append(f'sif "{rel}" {field} @{SOURCE_DATE_EPOCH}')
    for field in ("ctime", "crtime"):
        lines.append(f"sif / {field} @{SOURCE_DATE_EPOCH}")
    script = stage.parent / "debugfs-times.cmd"
    script.write_text("\n".join(lines) + "\n")
    done = run(["debugfs", "-w", "-f", str(script), f"{img}?offset={offset}"],
               env=dict(env, E2FSPROGS_FAKE_TIME=str(SOURCE_DATE_EPOCH)), capture_output=True)
    # debugfs echoes each command on stderr ("debugfs: sif ...") and exits 0
    # whatever happens; anything else it says is an error
    errors = [line for line in done.stderr.decode(errors="replace").splitlines()
              if line.strip() and not line.startswith("debugfs")]
    if errors:
        raise BuildError(f"debugfs could not set the inode times: {errors[:3]}")


def build_debian_cloud(*, force: bool = False) -> Path:
    """Build (or reuse) images/build/debian-12/: the raw disk, its qcow2
    (compressed clusters, as distributions publish) and raw.zst, each with
    a .sha256 file, and manifest.json."""
    started = time.monotonic()
    rootfs, rootfs_key = stage_cloud_rootfs()
    inputs: dict[str, object] = {"rootfs": rootfs_key, "code": code_digest(),
                                 "disk": dataclasses.asdict(CLOUD_DISK),
                                 "kernel_args": KERNEL_ARGS}
    key = key_of(inputs)
    out = OUT / "debian-12"
    names = [f"{NAME}.{ext}" for ext in ("raw", "qcow2", "raw.zst")]
    if not force and up_to_date(out, key, names + [f"{n}.sha256" for n in names]):
        log(f"Debian cloud image up to date ({out})")
        return out
    log("building the Debian 12 cloud image")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), MTOOLS_SKIP_CHECK="1",
               TZ="UTC")
    root_uuid = _uuid(key, "root-fs")
    esp_serial = key[:8].upper()
    tmp_out = fresh_dir(OUT / "debian-12.tmp")
    with tempfile.TemporaryDirectory(prefix="cloud-", dir=CACHE) as tmpname:
        tmp = Path(tmpname)
        stage = tmp / "root"
        run(["cp", "-a", "--reflink=auto", str(rootfs), str(stage)])
        (stage / ".stamp").unlink(missing_ok=True)
        kernel_version = kernel_version_of(stage)
        prepare_tree(stage, root_uuid, esp_serial, kernel_version)
        img = tmp_out / f"{NAME}.raw"
        with img.open("wb") as fh:
            fh.truncate(CLOUD_DISK.total)
        run(["sfdisk", "--no-reread", "--no-tell-kernel", "-q", str(img)],
            input=render_cloud_gpt(key).encode(), capture_output=True, env=env)
        install_bios_grub(img, stage, root_uuid)
        write_esp(img, stage, tmp, root_uuid, esp_serial, env)
        set_times(stage)
        write_root_fs(img, stage, root_uuid, key, env)
    log("converting to qcow2 (compressed) and raw.zst")
    qcow2 = tmp_out / f"{NAME}.qcow2"
    run(["qemu-img", "convert", "-q", "-c", "-f", "raw", "-O", "qcow2", str(img), str(qcow2)],
        capture_output=True)
    zst = tmp_out / f"{NAME}.raw.zst"
    run(["zstd", "-q", "-T0", "-10", "-f", str(img), "-o", str(zst)], capture_output=True)
    digests = {}
    for name in names:
        digests[name] = sha256_file(tmp_out / name)
        (tmp_out / f"{name}.sha256").write_text(digests[name] + "\n")
    manifest = {"kernel": kernel_version, "root_uuid": root_uuid, "disk_size": CLOUD_DISK.total,
                "files": {n: {"sha256": digests[n], "bytes": (tmp_out / n).stat().st_size}
                          for n in names},
                "packages": sorted(CLOUD_PACKAGES), "inputs": inputs}
    (tmp_out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    publish(tmp_out, out, key)
    sizes = ", ".join(f"{n.split('.', 1)[1]} {(out / n).stat().st_size >> 20} MiB" for n in names)
    log(f"Debian cloud image: {sizes} in {time.monotonic() - started:.0f} s")
    return out
