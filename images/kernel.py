"""The Debian kernel both images boot, and the module subsets they carry."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from images.common import ARCH, CACHE, BuildError, key_of, log, run, up_to_date, write_stamp
from images.debian import apt_candidate, extract_deb, fetch_package, foreign_candidate


@dataclass(frozen=True)
class Kernel:
    """An unpacked Debian kernel package."""

    version: str          # the module directory name, e.g. 6.1.0-56-amd64
    package_version: str
    vmlinuz: Path
    moddir: Path          # .../lib/modules/<version>


def stage_kernel(arch: str = ARCH) -> Kernel:
    """The kernel ``linux-image-<arch>`` depends on (``arch`` a Debian
    architecture: the host's from apt, another from the mirror's index),
    unpacked into the cache with a modules.dep made by depmod (once per
    package: the package name carries the architecture)."""
    meta = f"linux-image-{arch}"
    if arch == ARCH:
        apt_candidate(meta)
        depends = subprocess.run(["apt-cache", "show", "--no-all-versions", meta],
                                 capture_output=True, text=True, check=True).stdout
    else:
        depends = "Depends: " + foreign_candidate(meta, arch).get("Depends", "")
    m = re.search(r"^Depends: (linux-image-[0-9][^ ,]*)", depends, re.M)
    if not m:
        raise BuildError(f"cannot tell which kernel {meta} depends on")
    package = m.group(1)
    deb, pkg_version = fetch_package(package, arch)
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
