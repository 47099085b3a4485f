"""Build the live agent image and the lab's target OS disk image.

    python3 images/build.py live      # images/build/live/{vmlinuz,initrd.img,manifest.json}
    python3 images/build.py lab-os    # images/build/lab-os/{lab-os.img,lab-os.img.sha256}
    python3 images/build.py all       # both (what ``make images`` runs)

Everything comes from Debian packages fetched with Debian's own tools
(``debootstrap``, ``apt-get download``) from the mirror apt is configured
with; nothing is loop-mounted (the disk image is written with ``sfdisk``,
``mformat``/``mcopy`` and ``syslinux --offset``), so the build needs root only
for debootstrap's chroot.

Caching: every stage writes a ``.stamp`` holding the sha256 of its inputs (the
package list, the resolved package versions, the files it copies, this
script).  A stage whose stamp matches is skipped, so a second build with
nothing changed rebuilds nothing; changing ``agent/`` rebuilds only the live
initramfs.  Outputs are byte-reproducible for a given set of inputs:
file order is sorted, every timestamp is ``SOURCE_DATE_EPOCH`` (fixed below),
GPT and FAT identifiers are derived from the inputs' hash.

Stages (cache under ``images/build/cache``):

``rootfs``   debootstrap minbase bookworm + python3, psutil, pyudev, udev, ...
``kernel``   Debian's ``linux-image-amd64`` (vmlinuz + modules.dep + modules)
``busybox``  Debian's ``busybox-static`` (the lab OS's whole userland)
``live``     trimmed rootfs + a module subset + lpmos/ and agent/ + /init,
             packed as a sorted newc cpio compressed with zstd
``lab-os``   a GPT disk image: an EFI system partition (GRUB standalone for
             UEFI, syslinux with gptmbr.bin for BIOS, kernel + a busybox
             initramfs) and an empty FAT partition labelled CIDATA that the
             agent fills with the NoCloud seed
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BUILD = HERE / "build"
CACHE = BUILD / "cache"
#: where the artifacts go (the catalog expects build/; LPMOS_IMAGE_OUT is for
#: side builds, e.g. checking that a rebuild gives the same bytes)
OUT = Path(os.environ.get("LPMOS_IMAGE_OUT", str(BUILD)))

SUITE = "bookworm"
SOURCE_DATE_EPOCH = 1700000000
ARCH = "amd64"
#: zstd level of the live initramfs: higher levels cost more CPU than the
#: download they save in the lab (docs/lab.md has the numbers)
ZSTD_LEVEL = int(os.environ.get("LPMOS_IMAGE_ZSTD_LEVEL", "9"))

#: What the live image needs beyond minbase.  python3-psutil and
#: python3-pyudev are the agent's only dependencies; udev populates the
#: device database pyudev reads (by-path, serials) and loads modules by
#: modalias; busybox is init, udhcpc, reboot; mtools writes the NoCloud seed
#: into the installed image's CIDATA partition without mounting it; fdisk
#: (sfdisk) and dmidecode are there for the agent's disk and DIMM inventory.
LIVE_PACKAGES = ("python3", "python3-psutil", "python3-pyudev", "udev", "busybox",
                 "kmod", "mtools", "fdisk", "dmidecode", "zstd", "ca-certificates")

#: Kernel modules in the live image (their dependencies come along).  Enough
#: for QEMU (virtio, e1000) and common servers (AHCI, NVMe, SCSI disks, Intel
#: and virtio NICs); extend with LPMOS_LIVE_EXTRA_MODULES="mod1 mod2".
LIVE_MODULES = (
    "virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "virtio_rng",
    "e1000", "e1000e", "igb", "ixgbe",
    "ahci", "sd_mod", "sr_mod", "nvme", "usb_storage",
    "vfat", "nls_cp437", "nls_ascii", "nls_iso8859_1", "nls_utf8", "efivarfs", "af_packet",
)
#: The lab OS only needs to find its disk and its NIC under QEMU.
LAB_OS_MODULES = ("virtio_pci", "virtio_net", "virtio_blk", "virtio_scsi", "e1000",
                  "e1000e", "ahci", "sd_mod", "nvme", "vfat", "nls_cp437", "nls_ascii",
                  "nls_iso8859_1", "nls_utf8")

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


def trim_live_root(root: Path) -> dict[str, int]:
    """Remove LIVE_TRIM, then every program not in LIVE_PROGRAMS and every
    shared library nothing kept links to.  Returns counts for the manifest."""
    for rel in LIVE_TRIM:
        target = root / rel
        if target.is_symlink() or target.is_file():
            target.unlink()
        elif target.is_dir():
            shutil.rmtree(target)
    # iconv modules: mtools converts file names through the DOS code page
    # (850 by default) and fails without it; only those two are kept
    gconv = root / "usr/lib/x86_64-linux-gnu/gconv"
    for path in sorted(gconv.iterdir()) if gconv.is_dir() else []:
        if path.name not in LIVE_GCONV:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    for so in (root / "usr/lib/python3.11/lib-dynload").glob("*.so"):
        if so.name.split(".")[0] in LIVE_PY_DROP:
            so.unlink()
    libdirs = [root / "usr/lib/x86_64-linux-gnu", root / "usr/lib"]
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
    for sub in ("usr/bin", "usr/sbin", "usr/lib/x86_64-linux-gnu"):
        for path in sorted((root / sub).iterdir()):
            if path.is_dir() and not path.is_symlink():
                continue
            real = path.resolve() if path.is_symlink() else path
            if not str(real).startswith(str(root)):
                real = root / str(real).lstrip("/")
            is_lib = ".so" in path.name
            if path in wanted or real in wanted:
                continue
            if sub == "usr/lib/x86_64-linux-gnu" and not is_lib:
                continue
            path.unlink()
            removed += 1
    return {"kept_elf": len(wanted), "removed_files": removed}


class BuildError(RuntimeError):
    """A build step failed; ``str()`` says which and why."""


def log(msg: str) -> None:
    sys.stderr.write(f"[images] {msg}\n")
    sys.stderr.flush()


def run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
    try:
        return subprocess.run(cmd, check=True, **kw)  # type: ignore[call-overload, no-any-return]
    except FileNotFoundError:
        raise BuildError(f"{cmd[0]} not found: run 'scripts/setup.sh system'") from None
    except subprocess.CalledProcessError as exc:
        err = exc.stderr.decode(errors="replace")[-2000:] if exc.stderr else ""
        raise BuildError(f"{' '.join(cmd[:4])}... failed with exit {exc.returncode}\n"
                         f"{err}") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def tree_digest(paths: Iterable[Path], root: Path) -> str:
    """sha256 over the relative names and contents of the given files."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


def key_of(inputs: dict[str, object]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def up_to_date(out: Path, key: str, outputs: Iterable[str] = ()) -> bool:
    stamp = out / ".stamp"
    try:
        if stamp.read_text().strip() != key:
            return False
    except OSError:
        return False
    return all((out / name).exists() for name in outputs)


def write_stamp(out: Path, key: str) -> None:
    (out / ".stamp").write_text(key + "\n")


# --- Debian sources -------------------------------------------------------------


def debian_mirror() -> str:
    """The mirror apt is configured with (``LPMOS_DEBIAN_MIRROR`` overrides)."""
    env = os.environ.get("LPMOS_DEBIAN_MIRROR")
    if env:
        return env.rstrip("/")
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        try:
            text = path.read_text()
        except OSError:
            continue
        m = re.search(r"^URIs:\s*(\S+/debian)\s*$", text, re.M) or re.search(
            r"^deb\s+(?:\[[^\]]*\]\s+)?(\S+/debian)\s+" + SUITE, text, re.M)
        if m:
            return m.group(1).rstrip("/")
    return "http://deb.debian.org/debian"


def apt_candidate(package: str) -> tuple[str, str]:
    """(package, version) apt would install; follows a metapackage's first
    versioned dependency (``linux-image-amd64`` → ``linux-image-6.1.0-NN-amd64``)."""
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                         capture_output=True, text=True, check=False).stdout
    if not out.strip():
        run(["apt-get", "update", "-q"], capture_output=True)
        out = subprocess.run(["apt-cache", "show", "--no-all-versions", package],
                             capture_output=True, text=True, check=False).stdout
    fields = dict(re.findall(r"^([A-Za-z-]+): (.*)$", out, re.M))
    if "Version" not in fields:
        raise BuildError(f"apt knows no package {package}: check /etc/apt/sources.list*")
    return package, fields["Version"]


def fetch_deb(package: str) -> tuple[Path, str]:
    """Download one package with ``apt-get download`` into the cache (once)."""
    name, version = apt_candidate(package)
    debs = CACHE / "debs"
    debs.mkdir(parents=True, exist_ok=True)
    safe_version = version.replace(":", "%3a")
    path = debs / f"{name}_{safe_version}_{ARCH}.deb"
    if not path.exists():
        found = list(debs.glob(f"{name}_*{version.split(':')[-1]}_*.deb"))
        if found:
            return found[0], version
        log(f"downloading {name} {version}")
        os.chmod(debs, 0o777)   # noqa: S103  apt-get download drops privileges to _apt
        run(["apt-get", "download", "-q", f"{name}={version}"], cwd=debs, capture_output=True)
        found = list(debs.glob(f"{name}_*.deb"))
        if not found:
            raise BuildError(f"apt-get download {name} left no .deb in {debs}")
        return sorted(found)[-1], version
    return path, version


def extract_deb(deb: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    run(["dpkg-deb", "-x", str(deb), str(dest)])


# --- stages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    version: str          # the module directory name, e.g. 6.1.0-56-amd64
    package_version: str
    vmlinuz: Path
    moddir: Path          # .../lib/modules/<version>


def stage_kernel() -> Kernel:
    meta, _ = apt_candidate("linux-image-amd64")
    out = subprocess.run(["apt-cache", "show", "--no-all-versions", meta],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"^Depends: (linux-image-[0-9][^ ,]*)", out, re.M)
    if not m:
        raise BuildError("cannot tell which kernel linux-image-amd64 depends on")
    package = m.group(1)
    deb, pkg_version = fetch_deb(package)
    kdir = CACHE / f"kernel-{package}"
    key = key_of({"deb": deb.name, "size": deb.stat().st_size})
    if not up_to_date(kdir, key):
        shutil.rmtree(kdir, ignore_errors=True)
        log(f"unpacking {deb.name}")
        extract_deb(deb, kdir)
        version = next((kdir / "boot").glob("vmlinuz-*")).name.removeprefix("vmlinuz-")
        # the .deb ships no modules.dep (the postinst makes it)
        run(["depmod", "-b", str(kdir), version], capture_output=True)
        write_stamp(kdir, key)
    vmlinuz = next((kdir / "boot").glob("vmlinuz-*"))
    version = vmlinuz.name.removeprefix("vmlinuz-")
    moddir = kdir / "lib" / "modules" / version
    return Kernel(version, pkg_version, vmlinuz, moddir)


def stage_busybox() -> tuple[Path, str]:
    deb, version = fetch_deb("busybox-static")
    bdir = CACHE / "busybox-static"
    key = key_of({"deb": deb.name})
    if not up_to_date(bdir, key):
        shutil.rmtree(bdir, ignore_errors=True)
        extract_deb(deb, bdir)
        write_stamp(bdir, key)
    return bdir / "bin" / "busybox", version


def stage_rootfs() -> tuple[Path, str]:
    """debootstrap once per suite, architecture and package list (the slowest
    stage; docs/lab.md says how slow).  The mirror is not part of the key."""
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


# --- kernel modules ----------------------------------------------------------------


def module_closure(kernel: Kernel, wanted: Iterable[str]) -> list[str]:
    """Relative paths (under lib/modules/VER) of the wanted modules and their
    dependencies, from the kernel's modules.dep; unknown names are skipped
    (built into this kernel, or absent)."""
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (kernel.moddir / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        name = Path(path).name.split(".ko")[0].replace("-", "_")
        by_name[name] = path
    result: set[str] = set()
    stack = [by_name[n.replace("-", "_")] for n in wanted if n.replace("-", "_") in by_name]
    while stack:
        path = stack.pop()
        if path in result:
            continue
        result.add(path)
        stack.extend(deps.get(path, ()))
    return sorted(result)


def install_modules(kernel: Kernel, names: Iterable[str], root: Path) -> list[str]:
    """Copy a module subset into ROOT/lib/modules/VER and run depmod on it."""
    paths = module_closure(kernel, names)
    dest = root / "lib" / "modules" / kernel.version
    shutil.rmtree(dest, ignore_errors=True)
    for rel in paths:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(kernel.moddir / rel, target)
    for meta in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        if (kernel.moddir / meta).exists():
            shutil.copy2(kernel.moddir / meta, dest / meta)
    run(["depmod", "-b", str(root), kernel.version], capture_output=True)
    return paths


# --- cpio ------------------------------------------------------------------------


def _cpio_header(name: str, mode: int, size: int, ino: int, nlink: int = 1,
                 rdev: tuple[int, int] = (0, 0)) -> bytes:
    fields = (ino, mode, 0, 0, nlink, SOURCE_DATE_EPOCH, size, 0, 0, rdev[0], rdev[1],
              len(name) + 1, 0)
    head = b"070701" + b"".join(f"{f:08x}".encode() for f in fields)
    data = head + name.encode() + b"\0"
    return data + b"\0" * (-len(data) % 4)


def iter_tree(root: Path) -> Iterator[Path]:
    """Every path under root, sorted, directories before their contents."""
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath)
        if base != root:
            yield base
        # os.walk lists symlinks to directories with the directories: they
        # are entries of their own (bin -> usr/bin), not trees to descend
        links = [d for d in dirnames if (base / d).is_symlink()]
        dirnames[:] = sorted(d for d in dirnames if d not in links)
        for name in sorted(filenames + links):
            yield base / name


def write_cpio(root: Path, out: io.BufferedIOBase) -> int:
    """A newc archive of ROOT with root-owned entries and fixed times (the
    kernel's initramfs format).  Returns the number of entries."""
    count = 0
    ino = 1
    for path in iter_tree(root):
        rel = str(path.relative_to(root))
        st = path.lstat()
        mode = st.st_mode
        if stat.S_ISLNK(mode):
            target = os.readlink(path).encode()
            out.write(_cpio_header(rel, mode, len(target), ino))
            out.write(target + b"\0" * (-len(target) % 4))
        elif stat.S_ISREG(mode):
            data = path.read_bytes()
            out.write(_cpio_header(rel, mode, len(data), ino))
            out.write(data + b"\0" * (-len(data) % 4))
        elif stat.S_ISDIR(mode):
            out.write(_cpio_header(rel, mode, 0, ino, nlink=2))
        elif stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
            out.write(_cpio_header(rel, mode, 0, ino,
                                   rdev=(os.major(st.st_rdev), os.minor(st.st_rdev))))
        else:
            continue   # sockets, fifos: nothing an initramfs needs
        ino += 1
        count += 1
    out.write(_cpio_header("TRAILER!!!", 0, 0, 0, nlink=1))
    return count


def pack_initramfs(root: Path, dest: Path, compressor: str = "zstd") -> None:
    tmp = dest.with_suffix(".cpio.tmp")
    with tmp.open("wb") as fh:
        write_cpio(root, fh)  # type: ignore[arg-type]
    if compressor == "zstd":
        run(["zstd", "-q", "-f", f"-{ZSTD_LEVEL}", "-T0", str(tmp), "-o", str(dest)])
    else:
        with tmp.open("rb") as src, gzip.GzipFile(dest, "wb", mtime=SOURCE_DATE_EPOCH) as gz:
            shutil.copyfileobj(src, gz)
    tmp.unlink()


def _set_times(root: Path) -> None:
    for path in iter_tree(root):
        os.utime(path, (SOURCE_DATE_EPOCH, SOURCE_DATE_EPOCH), follow_symlinks=False)


# --- steps both images take ----------------------------------------------------------


def copy_overlay(src: Path, root: Path) -> None:
    """Copy every file under ``src`` to the same place under ``root``: mode
    0755 when executable, else 0644 (times are fixed later, for the whole
    tree)."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        dest = root / path.relative_to(src)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)
        os.chmod(dest, 0o755 if os.access(path, os.X_OK) else 0o644)


def fresh_dir(path: Path) -> Path:
    """``path`` as a new empty directory (whatever was there is removed)."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    return path


def publish(tmp_out: Path, out: Path, key: str) -> None:
    """Stamp ``tmp_out`` with ``key`` and put it in the place of ``out``: a
    half-written artifact never carries a stamp that matches."""
    write_stamp(tmp_out, key)
    shutil.rmtree(out, ignore_errors=True)
    tmp_out.rename(out)


# --- the live image -------------------------------------------------------------------


def source_files() -> list[Path]:
    """The project's Python packages the agent needs in the image."""
    files = []
    for pkg in ("lpmos", "agent"):
        files += [p for p in (REPO / pkg).rglob("*.py") if "__pycache__" not in p.parts]
    return sorted(files)


def build_live(*, force: bool = False) -> Path:
    """Build (or reuse) images/build/live/{vmlinuz,initrd.img}; returns the dir."""
    started = time.monotonic()
    rootfs, rootfs_key = stage_rootfs()
    kernel = stage_kernel()
    extra = tuple(os.environ.get("LPMOS_LIVE_EXTRA_MODULES", "").split())
    sources = source_files()
    live_dir = HERE / "live"
    inputs: dict[str, object] = {
        "rootfs": rootfs_key, "kernel": kernel.package_version, "modules": LIVE_MODULES + extra,
        "trim": LIVE_TRIM, "programs": LIVE_PROGRAMS, "py_drop": LIVE_PY_DROP,
        "gconv": LIVE_GCONV,
        "sources": tree_digest(sources, REPO),
        "overlay": tree_digest([p for p in live_dir.rglob("*") if p.is_file()], live_dir),
        "build.py": sha256_file(Path(__file__)), "zstd": ZSTD_LEVEL,
    }
    key = key_of(inputs)
    out = OUT / "live"
    if not force and up_to_date(out, key, ["vmlinuz", "initrd.img"]):
        log(f"live image up to date ({out})")
        return out
    log("building the live image")
    stage = CACHE / "live-stage"
    trimmed = copy_live_root(rootfs, stage)
    install_sources(sources, stage / "opt" / "lpmos")
    link_busybox_applets(stage)
    install_live_overlay(live_dir / "rootfs", stage, kernel)
    modules = install_modules(kernel, LIVE_MODULES + extra, stage)
    _set_times(stage)
    tmp_out = fresh_dir(OUT / "live.tmp")
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


def copy_live_root(rootfs: Path, stage: Path) -> dict[str, int]:
    """``stage`` as a trimmed copy of the debootstrapped ``rootfs`` with the
    empty directories the boot mounts on; returns the trim counts."""
    shutil.rmtree(stage, ignore_errors=True)
    # cp -a keeps hard links, devices and symlinks; reflinks when the fs can
    run(["cp", "-a", "--reflink=auto", str(rootfs), str(stage)])
    (stage / ".stamp").unlink(missing_ok=True)
    trimmed = trim_live_root(stage)
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


def link_busybox_applets(stage: Path) -> None:
    """busybox applets in /usr/local/bin for what Debian's minbase lacks
    (init, udhcpc, reboot...); minbase's own programs win."""
    bbin = stage / "usr" / "local" / "bin"
    bbin.mkdir(parents=True, exist_ok=True)
    applets = subprocess.run([str(stage / "usr/bin/busybox"), "--list"], capture_output=True,
                             text=True, check=True).stdout.split()
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


# --- the lab OS disk image -------------------------------------------------------------

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


def _uuid_from(seed: str, what: str) -> str:
    h = hashlib.sha256(f"{seed}:{what}".encode()).hexdigest()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-8{h[17:20]}-{h[20:32]}".upper()


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


def read_package_version(package: str) -> str:
    """The installed version of a Debian package ("" when it is not installed)."""
    return subprocess.run(["dpkg-query", "-W", "-f=${Version}", package],
                          capture_output=True, text=True, check=False).stdout


def build_lab_os(*, force: bool = False) -> Path:
    """Build (or reuse) images/build/lab-os/lab-os.img (+ .sha256)."""
    started = time.monotonic()
    kernel = stage_kernel()
    busybox, bb_version = stage_busybox()
    src_dir = HERE / "lab-os"
    grub_version = read_package_version("grub-efi-amd64-bin")
    syslinux_version = read_package_version("syslinux")
    if not grub_version or not syslinux_version:
        raise BuildError("the lab OS build needs grub-efi-amd64-bin, syslinux, mtools and "
                         "fdisk: run 'scripts/setup.sh system'")
    inputs: dict[str, object] = {
        "kernel": kernel.package_version, "busybox": bb_version, "grub": grub_version,
        "syslinux": syslinux_version, "modules": LAB_OS_MODULES,
        "overlay": tree_digest([p for p in src_dir.rglob("*") if p.is_file()], src_dir),
        "build.py": sha256_file(Path(__file__)),
    }
    key = key_of(inputs)
    out = OUT / "lab-os"
    if not force and up_to_date(out, key, ["lab-os.img", "lab-os.img.sha256"]):
        log(f"lab-os image up to date ({out})")
        return out
    log("building the lab-os disk image")
    env = dict(os.environ, SOURCE_DATE_EPOCH=str(SOURCE_DATE_EPOCH), MTOOLS_SKIP_CHECK="1",
               TZ="UTC")
    with tempfile.TemporaryDirectory(prefix="lab-os-", dir=CACHE) as tmpname:
        tmp = Path(tmpname)
        initrd = pack_lab_os_initramfs(kernel, busybox, src_dir / "rootfs", tmp)
        bootx64 = write_grub_efi(src_dir / "grub.cfg", tmp, env)
        img = tmp / "lab-os.img"
        write_lab_os_disk(img, key, env)
        shutil.copy2(kernel.vmlinuz, tmp / "vmlinuz")
        syslinux_cfg = tmp / "syslinux.cfg"
        shutil.copyfile(src_dir / "syslinux.cfg", syslinux_cfg)
        copy_to_esp(img, env, ((tmp / "vmlinuz", "::/vmlinuz"), (initrd, "::/initrd.img"),
                               (bootx64, "::/EFI/BOOT/BOOTX64.EFI"),
                               (syslinux_cfg, "::/syslinux/syslinux.cfg")))
        install_syslinux(img, env)
        digest = sha256_file(img)
        tmp_out = fresh_dir(OUT / "lab-os.tmp")
        img.rename(tmp_out / "lab-os.img")
        (tmp_out / "lab-os.img.sha256").write_text(digest + "\n")
        (tmp_out / "manifest.json").write_text(json.dumps(
            {"sha256": digest, "size": LAB_OS_DISK.total, "kernel": kernel.version,
             "inputs": inputs}, indent=2, sort_keys=True) + "\n")
        publish(tmp_out, out, key)
    log(f"lab-os image: {LAB_OS_DISK.total >> 20} MiB, sha256 {digest[:16]}... in "
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
    _set_times(root)
    initrd = tmp / "initrd.img"
    pack_initramfs(root, initrd, compressor="gzip")
    return initrd


def write_grub_efi(grub_cfg: Path, tmp: Path, env: dict[str, str]) -> Path:
    """tmp/BOOTX64.EFI: GRUB for UEFI, one standalone EFI binary with its
    config inside.  grub-mkimage gets a memdisk tar packed here with fixed
    times: grub-mkstandalone's tar carries the build time, so no two builds
    would give the same bytes."""
    memdisk = tmp / "memdisk.tar"
    info = tarfile.TarInfo("boot/grub/grub.cfg")
    cfg = grub_cfg.read_bytes()
    info.size, info.mtime, info.mode = len(cfg), SOURCE_DATE_EPOCH, 0o644
    with tarfile.open(memdisk, "w", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(cfg))
    bootx64 = tmp / "BOOTX64.EFI"
    run(["grub-mkimage", "-O", "x86_64-efi", "-o", str(bootx64),
         "-p", "(memdisk)/boot/grub", "-m", str(memdisk), *GRUB_MODULES],
        env=env, capture_output=True)
    return bootx64


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="images/build.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("target", choices=("live", "lab-os", "all"))
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        if args.target in ("live", "all"):
            build_live(force=args.force)
        if args.target in ("lab-os", "all"):
            build_lab_os(force=args.force)
    except BuildError as exc:
        log(f"error: {exc}")
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
