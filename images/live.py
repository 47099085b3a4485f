"""The live agent image: images/build/live/{vmlinuz,initrd.img,manifest.json}.

A debootstrapped minbase root (the ``rootfs`` stage, cached), trimmed to
what the agent and an operator on the console need, plus a module subset of
the Debian kernel, the project's ``lpmos/`` and ``agent/`` (compiled) and
the overlay under ``images/live/rootfs`` (``/init`` and the agent runner),
packed as a sorted newc cpio compressed with zstd.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from images.common import (
    ARCH,
    CACHE,
    HERE,
    OUT,
    REPO,
    SUITE,
    ZSTD_LEVEL,
    BuildError,
    code_digest,
    copy_overlay,
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
from images.debian import debian_mirror, unpack_deb_into_root
from images.kernel import Kernel, install_modules, stage_kernel

#: What the live image needs beyond minbase.  python3-psutil and
#: python3-pyudev are the agent's only dependencies; udev populates the
#: device database pyudev reads (by-path, serials) and loads modules by
#: modalias; busybox is init, udhcpc, reboot; mtools writes the NoCloud seed
#: into the installed image's CIDATA partition without mounting it; fdisk
#: (sfdisk) and dmidecode are there for the agent's disk and DIMM inventory;
#: gdisk (sgdisk) and util-linux's wipefs and blkdiscard wipe disks on release;
#: python3-zstandard decodes .zst images (its dependency on the virtual
#: python3-cffi-backend-api-* is named through the package that provides it:
#: debootstrap does not resolve virtual packages).
LIVE_PACKAGES = ("python3", "python3-psutil", "python3-pyudev", "udev", "busybox",
                 "kmod", "mtools", "fdisk", "dmidecode", "zstd", "ca-certificates",
                 "python3-zstandard", "python3-cffi-backend", "gdisk")

#: Kernel modules in the live image (their dependencies come along).  Enough
#: for QEMU (virtio, e1000) and common servers (AHCI, NVMe, SCSI disks, Intel
#: and virtio NICs); extend with LPMOS_LIVE_EXTRA_MODULES="mod1 mod2".
LIVE_MODULES = (
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_rng",
    "e1000", "e1000e", "igb", "ixgbe",
    "ahci", "sd_mod", "sr_mod", "nvme", "usb_storage",
    "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8", "efivarfs", "af_packet",
)


#: Programs kept in the live image (everything else under bin/ and sbin/ is
#: removed, and of the shared libraries only those these programs, Python's
#: extension modules and udev's helpers link to stay).  The agent runs
#: python3 and calls mcopy and reboot; udev, kmod and busybox run the boot;
#: the rest is there for an operator on the console.
LIVE_PROGRAMS = (
    "usr/bin/python3.11", "usr/bin/busybox", "usr/bin/dash", "usr/bin/udevadm",
    "usr/lib/systemd/systemd-udevd", "usr/bin/kmod", "usr/bin/mtools", "usr/sbin/ldconfig",
    "usr/sbin/sfdisk", "usr/sbin/blkid", "usr/bin/lsblk", "usr/sbin/blockdev",
    "usr/sbin/dmidecode", "usr/sbin/wipefs", "usr/bin/mount", "usr/bin/umount",
    "usr/sbin/blkdiscard", "usr/sbin/sgdisk",
)

#: Removed from the live root besides: documentation, locales, the package
#: manager's state, Python's test suite and GUI bits, the udev hardware
#: database (the agent reads vendor names from sysfs/DMI).
LIVE_TRIM = (
    "usr/share/doc", "usr/share/man", "usr/share/info", "usr/share/locale",
    "usr/share/i18n", "usr/share/lintian", "usr/share/common-licenses",
    "usr/share/bash-completion", "usr/share/zsh", "usr/share/menu", "usr/share/perl",
    "usr/share/perl5", "usr/share/debconf", "usr/share/pixmaps", "usr/share/gcc",
    "usr/share/gdb", "usr/share/python3", "usr/share/zoneinfo", "usr/share/keyrings",
    "usr/share/ca-certificates", "usr/share/terminfo", "usr/share/mime", "usr/share/dpkg",
    "usr/share/tabset", "usr/share/base-files", "usr/share/polkit-1", "usr/share/misc",
    "usr/lib/locale", "usr/lib/terminfo", "usr/lib/apt", "usr/lib/dpkg", "usr/libexec",
    "usr/lib/x86_64-linux-gnu/perl-base", "usr/lib/x86_64-linux-gnu/perl",
    "usr/lib/x86_64-linux-gnu/perl5",
    "var/lib/apt", "var/cache", "var/log", "var/lib/dpkg", "etc/apt", "etc/ssl",
    "usr/lib/python3.11/test", "usr/lib/python3.11/idlelib", "usr/lib/python3.11/tkinter",
    "usr/lib/python3.11/turtledemo", "usr/lib/python3.11/lib2to3",
    "usr/lib/python3.11/ensurepip", "usr/lib/python3.11/pydoc_data",
    "usr/lib/python3.11/config-3.11-x86_64-linux-gnu", "usr/lib/python3.11/distutils",
    "usr/lib/python3.11/unittest/test", "usr/lib/python3.11/sqlite3/test",
    "usr/lib/python3.11/ctypes/test", "usr/lib/python3.11/venv",
    "etc/udev/hwdb.bin", "usr/lib/udev/hwdb.bin", "usr/lib/udev/hwdb.d",
    "usr/lib/systemd/system", "usr/lib/systemd/network", "usr/lib/systemd/user",
    "usr/lib/python3.11/sqlite3", "usr/lib/python3.11/curses", "usr/lib/python3.11/dbm",
    "usr/lib/python3.11/__phello__",
)

#: Python extension modules the agent never imports (each drags in a library:
#: sqlite, ncurses, readline, Berkeley DB, NIS, Kerberos via nis/crypt ...).
LIVE_PY_DROP = ("_sqlite3", "_curses", "_curses_panel", "readline", "_dbm", "_gdbm",
                "nis", "_crypt", "ossaudiodev", "audioop", "_ctypes_test", "_testbuffer",
                "_testcapi", "_testclinic", "_testimportmultiple", "_testinternalcapi",
                "_testmultiphase", "_xxsubinterpreters", "_xxtestfuzz", "xxlimited",
                "xxlimited_35", "_codecs_cn", "_codecs_hk", "_codecs_jp", "_codecs_kr",
                "_codecs_tw", "_codecs_iso2022", "_lsprof")

#: The iconv (gconv) modules kept: mtools needs the DOS code pages.
LIVE_GCONV = ("gconv-modules", "gconv-modules.d", "IBM437.so", "IBM850.so")

#: Shared libraries the image keeps although nothing links to them: ctypes
#: loads libudev (pyudev) by name through ldconfig's cache.
LIVE_DLOPEN = ("libudev.so.1",)


def elf_needed(path: Path) -> list[str]:
    """DT_NEEDED names of an ELF file (readelf -d); [] for anything else."""
    done = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True,
                          check=False)
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", done.stdout)


def trim_live_root(root: Path, triplet: str = "x86_64-linux-gnu") -> dict[str, int]:
    """Remove LIVE_TRIM, then every program not in LIVE_PROGRAMS and every
    shared library nothing kept links to.  ``triplet`` names the library
    directory (``aarch64-linux-gnu`` for arm64).  Returns counts for the
    manifest."""
    for rel in LIVE_TRIM:
        target = root / rel.replace("x86_64-linux-gnu", triplet)
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    # iconv modules: mtools converts file names through the DOS code page
    # (850 by default) and fails without it; only those two are kept
    gconv = root / f"usr/lib/{triplet}/gconv"
    for path in sorted(gconv.iterdir()) if gconv.is_dir() else []:
        if path.name not in LIVE_GCONV:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for so in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if so.name.split(".")[0] in LIVE_PY_DROP:
            so.unlink()
    libdirs = [root / f"usr/lib/{triplet}", root / "usr/lib"]
    # the closure of DT_NEEDED over the kept programs, extension modules, udev helpers
    seeds = [root / p for p in LIVE_PROGRAMS if (root / p).exists()]
    for pattern in ("usr/lib/python3*/**/*.so", "usr/lib/udev/*"):
        seeds += [p for p in root.glob(pattern) if p.is_file() and not p.is_symlink()]
    wanted: set[Path] = set()
    queue = list(seeds) + [d / n for n in LIVE_DLOPEN for d in libdirs if (d / n).exists()]
    while queue:
        path = queue.pop()
        real = path.resolve() if path.is_symlink() else path
        if not str(real).startswith(str(root)):
            real = root / str(real).lstrip("/")
        if real in wanted:
            continue
        wanted.add(real)
        wanted.add(path)
        for name in elf_needed(real):
            for d in libdirs:
                if (d / name).exists():
                    queue.append(d / name)
                    break
    removed = 0
    for sub in ("usr/bin", "usr/sbin", f"usr/lib/{triplet}"):
        for path in sorted((root / sub).iterdir()):
            if path.is_dir() and not path.is_symlink():
                continue
            real = path.resolve() if path.is_symlink() else path
            if not str(real).startswith(str(root)):
                real = root / str(real).lstrip("/")
            is_lib = ".so" in path.name
            if path in wanted or real in wanted:
                continue
            if sub == f"usr/lib/{triplet}" and not is_lib:
                continue
            path.unlink()
            removed += 1
    return {"kept_elf": len(wanted), "removed_files": removed}


def stage_rootfs(arch: str = ARCH) -> tuple[Path, str]:
    """debootstrap once per suite, architecture and package list (the slowest
    stage; docs/lab.md says how slow).  The mirror is not part of the key.
    Another architecture than the host's: :func:`stage_foreign_rootfs`."""
    if arch != ARCH:
        return stage_foreign_rootfs(arch)
    mirror = debian_mirror()
    key = key_of({"suite": SUITE, "packages": sorted(LIVE_PACKAGES), "variant": "minbase",
                  "arch": ARCH})
    out = CACHE / "live-rootfs"
    if up_to_date(out, key, ["usr/bin/python3"]):
        return out, key
    if os.geteuid() != 0:
        raise BuildError("building the live image's root file system needs root (debootstrap)")
    shutil.rmtree(out, ignore_errors=True)
    tmp = CACHE / "live-rootfs.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap {SUITE} from {mirror} (about a minute)")
    started = time.monotonic()
    run(["debootstrap", "--variant=minbase", f"--arch={ARCH}",
         "--include=" + ",".join(LIVE_PACKAGES), SUITE, str(tmp), mirror],
        capture_output=True)
    log(f"debootstrap done in {time.monotonic() - started:.0f} s")
    tmp.rename(out)
    write_stamp(out, key)
    return out, key


#: Debian architecture -> the GNU triplet its libraries live under
TRIPLETS = {"amd64": "x86_64-linux-gnu", "arm64": "aarch64-linux-gnu"}
#: the user-mode emulator (qemu-user-static) that runs a foreign root's
#: programs at build time, called by name: no binfmt_misc registration (a
#: host-wide kernel setting) is needed or made
EMULATORS = {"arm64": "qemu-aarch64-static"}


def live_name(arch: str = ARCH) -> str:
    """The live image's directory under images/build/ (``live``, ``live-arm64``)."""
    return "live" if arch == ARCH else f"live-{arch}"


def target_command(root: Path, arch: str) -> list[str]:
    """What runs a program of ``root`` at build time: nothing for the host's
    architecture, else its emulator with ``root`` as the library prefix."""
    if arch == ARCH:
        return []
    emulator = EMULATORS.get(arch)
    if emulator is None or shutil.which(emulator) is None:
        raise BuildError(f"building an {arch} image needs {emulator or 'an emulator'}: "
                         "apt-get install qemu-user-static (scripts/setup.sh system)")
    return [emulator, "-L", str(root)]


def stage_foreign_rootfs(arch: str) -> tuple[Path, str]:
    """The live root of another architecture: debootstrap's first stage
    only (``--foreign``: the packages downloaded, verified and unpacked; no
    program of the target runs), then what its second stage would do that
    the live image needs (:func:`finish_foreign_root`).  Maintainer scripts
    never run: the image is built, not installed."""
    if arch not in TRIPLETS:
        raise BuildError(f"no live image for {arch}: one of {', '.join(TRIPLETS)}")
    mirror = debian_mirror()
    key = key_of({"suite": SUITE, "packages": sorted(LIVE_PACKAGES), "variant": "minbase",
                  "arch": arch, "stage": "foreign"})
    out = CACHE / f"live-rootfs-{arch}"
    if up_to_date(out, key, ["usr/bin/python3", "etc/ld.so.cache"]):
        return out, key
    if os.geteuid() != 0:
        raise BuildError("building the live image's root file system needs root (debootstrap)")
    shutil.rmtree(out, ignore_errors=True)
    tmp = CACHE / f"live-rootfs-{arch}.tmp"
    runner = target_command(tmp, arch)          # fails early without the emulator
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    log(f"debootstrap --foreign {SUITE} {arch} from {mirror}")
    started = time.monotonic()
    run(["debootstrap", "--foreign", "--variant=minbase", f"--arch={arch}",
         "--include=" + ",".join(LIVE_PACKAGES), SUITE, str(tmp), mirror],
        capture_output=True)
    finish_foreign_root(tmp, runner)
    log(f"debootstrap --foreign done in {time.monotonic() - started:.0f} s")
    tmp.rename(out)
    write_stamp(out, key)
    return out, key


def finish_foreign_root(root: Path, runner: list[str]) -> None:
    """The second stage, as far as the live image needs it: every package
    the first stage only downloaded (the ``--include`` ones and their
    dependencies) unpacked over it (:func:`unpack_deb_into_root`), then what their maintainer
    scripts would have left: /etc/passwd and /etc/group (base-passwd's
    masters), the dynamic linker's cache (ldconfig, run by ``runner``: ctypes
    finds libudev through it) and Python's byte code of the standard library
    and the agent's dependencies (compiled by the build's own Python 3.11,
    the same version: without it every boot compiles them, slowly, under
    emulation).  No alternatives are set up: a program reached only through
    one (awk) is busybox's applet.  The downloaded .debs and debootstrap's
    working directory go."""
    archives = root / "var/cache/apt/archives"
    for deb in sorted(archives.glob("*.deb")):
        unpack_deb_into_root(deb, root)
        deb.unlink()
    shutil.rmtree(root / "debootstrap", ignore_errors=True)
    # in a container, the first stage links /proc to the host's (the second
    # stage would mount it): the image mounts its own there
    for name in ("proc", "sys", "dev"):
        if (root / name).is_symlink():
            (root / name).unlink()
        (root / name).mkdir(exist_ok=True)
    for name in ("passwd", "group"):
        master = root / "usr/share/base-passwd" / f"{name}.master"
        if master.exists() and not (root / "etc" / name).exists():
            shutil.copyfile(master, root / "etc" / name)
    run([*runner, str(root / "sbin/ldconfig"), "-r", str(root)], capture_output=True)
    target = sorted(root.glob("usr/lib/python3.*[0-9]"))
    host = f"python{sys.version_info.major}.{sys.version_info.minor}"
    if not target or target[-1].name != host:
        raise BuildError(f"the {root.name} root has {[t.name for t in target]}, the build "
                         f"runs {host}: its byte code would not match")
    run([sys.executable, "-m", "compileall", "-q", "-j", "0", "-s", str(root), "-p", "/",
         str(target[-1]),
         str(root / "usr/lib/python3/dist-packages")], capture_output=True)


def source_files() -> list[Path]:
    """The project's Python packages the agent needs in the image."""
    files = []
    for pkg in ("lpmos", "agent"):
        files += [p for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def build_live(*, force: bool = False, arch: str = ARCH) -> Path:
    """Build (or reuse) images/build/live/{vmlinuz,initrd.img}; returns the
    dir.  ``arch`` is a Debian architecture: another than the host's
    (``arm64``) builds images/build/live-<arch>/ from its own caches."""
    started = time.monotonic()
    rootfs, rootfs_key = stage_rootfs(arch)
    kernel = stage_kernel(arch)
    extra = tuple(os.environ.get("LPMOS_LIVE_EXTRA_MODULES", "").split())
    sources = source_files()
    live_dir = HERE / "live"
    inputs: dict[str, object] = {
        "rootfs": rootfs_key, "kernel": kernel.package_version, "modules": LIVE_MODULES + extra,
        "trim": LIVE_TRIM, "programs": LIVE_PROGRAMS, "py_drop": LIVE_PY_DROP,
        "gconv": LIVE_GCONV,
        "sources": tree_digest(sources, REPO),
        "overlay": tree_digest([p for p in live_dir.rglob("*") if p.is_file()], live_dir),
        "code": code_digest(), "zstd": ZSTD_LEVEL,
    }
    if arch != ARCH:
        inputs["arch"] = arch
    key = key_of(inputs)
    name = live_name(arch)
    out = OUT / name
    if not force and up_to_date(out, key, ["vmlinuz", "initrd.img"]):
        log(f"live image up to date ({out})")
        return out
    log("building the live image")
    stage = CACHE / ("live-stage" if arch == ARCH else f"live-stage-{arch}")
    trimmed = copy_live_root(rootfs, stage, TRIPLETS[arch])
    install_sources(sources, stage / "opt" / "lpmos")
    link_busybox_applets(stage, target_command(stage, arch))
    install_live_overlay(live_dir / "rootfs", stage, kernel)
    modules = install_modules(kernel, LIVE_MODULES + extra, stage)
    set_times(stage)
    tmp_out = fresh_dir(OUT / f"{name}.tmp")
    shutil.copy2(kernel.vmlinuz, tmp_out / "vmlinuz")
    pack_initramfs(stage, tmp_out / "initrd.img")
    manifest = {
        "kernel": kernel.version, "kernel_package": kernel.package_version,
        "modules": len(modules), "trim": trimmed,
        "initrd_bytes": (tmp_out / "initrd.img").stat().st_size,
        "vmlinuz_bytes": (tmp_out / "vmlinuz").stat().st_size,
        "initrd_sha256": sha256_file(tmp_out / "initrd.img"),
        "vmlinuz_sha256": sha256_file(tmp_out / "vmlinuz"),
        "inputs": inputs,
    }
    (tmp_out / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    publish(tmp_out, out, key)
    shutil.rmtree(stage, ignore_errors=True)
    log(f"live image: vmlinuz {(out / 'vmlinuz').stat().st_size >> 20} MiB, initrd "
        f"{(out / 'initrd.img').stat().st_size >> 20} MiB in {time.monotonic() - started:.0f} s")
    return out


def copy_live_root(rootfs: Path, stage: Path,
                   triplet: str = "x86_64-linux-gnu") -> dict[str, int]:
    """``stage`` as a trimmed copy of the debootstrapped ``rootfs`` with the
    empty directories the boot mounts on; returns the trim counts."""
    shutil.rmtree(stage, ignore_errors=True)
    # cp -a keeps hard links, devices and symlinks; reflinks when the fs can
    run(["cp", "-a", "--reflink=auto", str(rootfs), str(stage)])
    (stage / ".stamp").unlink(missing_ok=True)
    trimmed = trim_live_root(stage, triplet)
    for rel in ("var/cache", "var/log", "var/lib/dpkg", "tmp", "run", "proc", "sys", "dev",
                "mnt", "root"):
        (stage / rel).mkdir(parents=True, exist_ok=True)
    os.chmod(stage / "tmp", 0o1777)  # noqa: S103  /tmp of the image
    return trimmed


def install_sources(sources: list[Path], app: Path) -> None:
    """The project's sources under ``app``, compiled: python byte code the
    image would otherwise compile at every boot under emulation is kept;
    unchecked-hash pycs are reproducible."""
    app.mkdir(parents=True, exist_ok=True)
    for src in sources:
        dest = app / src.relative_to(REPO)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    run([sys.executable, "-m", "compileall", "-q", "--invalidation-mode", "unchecked-hash",
         str(app)], capture_output=True)


def link_busybox_applets(stage: Path, runner: list[str] | None = None) -> None:
    """busybox applets in /usr/local/bin for what Debian's minbase lacks
    (init, udhcpc, reboot...); minbase's own programs win.  ``runner``
    prefixes the busybox command (an emulator, for another architecture)."""
    bbin = stage / "usr" / "local" / "bin"
    bbin.mkdir(parents=True, exist_ok=True)
    applets = subprocess.run([*(runner or []), str(stage / "usr/bin/busybox"), "--list"],
                             capture_output=True, text=True, check=True).stdout.split()
    for applet in sorted(set(applets)):
        if not any((stage / d / applet).exists() for d in ("usr/bin", "usr/sbin")):
            (bbin / applet).symlink_to("/bin/busybox")
    (stage / "sbin" / "init").unlink(missing_ok=True)


def install_live_overlay(overlay: Path, stage: Path, kernel: Kernel) -> None:
    """The overlay (/init, inittab, the udhcpc script, the agent runner),
    /init pointing at lpmos-init, the host name and the release file."""
    copy_overlay(overlay, stage)
    (stage / "init").unlink(missing_ok=True)
    (stage / "init").symlink_to("/usr/local/sbin/lpmos-init")
    (stage / "etc" / "hostname").write_text("lpmos-live\n")
    (stage / "etc" / "lpmos-live-release").write_text(
        f"lpmos live image\nkernel {kernel.version} ({kernel.package_version})\n")
