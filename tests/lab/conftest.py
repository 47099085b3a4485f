"""Fixtures of the QEMU lab tests: the built images (cached by images/build.py)
and the root check every lab test needs."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from images import build
from images.common import BUILD


def require_lab_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("the QEMU lab needs root (network namespaces, taps, DHCP ports)")
    for tool in ("qemu-system-x86_64", "dnsmasq", "ip", "etcd", "curl"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run 'scripts/setup.sh system'")


@contextlib.contextmanager
def build_lock(name: str = "x86") -> Iterator[None]:
    """One image build at a time on this checkout: two pytest processes (two
    xdist workers, or a run beside another) would otherwise build into the
    same cache at once; the second waits, then finds the stamps fresh.  The
    arm64 set has a lock of its own: its cache directories and outputs are
    its own (``*-arm64``), so it builds while the x86 images do."""
    BUILD.mkdir(parents=True, exist_ok=True)
    with (BUILD / f".build-{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def lab_images() -> Iterator[dict[str, Path]]:
    """Build (or reuse) the live image and the lab-os disk image."""
    require_lab_host()
    try:
        with build_lock():
            live = build.build_live()
            lab_os = build.build_lab_os()
    except build.BuildError as exc:
        pytest.fail(f"image build failed: {exc}")
    yield {"live": live, "lab-os": lab_os}


@pytest.fixture(scope="session")
def arm64_images() -> Iterator[dict[str, Path]]:
    """Build (or reuse) the arm64 set: the live image, the lab OS and
    Debian's signed arm64 GRUB for the TFTP root (their own cache keys and
    directories, apart from the x86 ones)."""
    require_lab_host()
    for tool in ("qemu-system-aarch64", "qemu-aarch64-static"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} missing: run 'scripts/setup.sh system'")
    try:
        with build_lock("arm64"):
            images = build.build_arm64()
    except build.BuildError as exc:
        pytest.fail(f"arm64 image build failed: {exc}")
    yield images


@pytest.fixture(scope="session")
def cloud_image() -> Path:
    """Build (or reuse) the real Debian 12 cloud image (raw, qcow2, raw.zst)."""
    require_lab_host()
    try:
        with build_lock():
            return build.build_debian_cloud()
    except build.BuildError as exc:
        pytest.fail(f"Debian cloud image build failed: {exc}")


#: lab files, longest first (measured: real OS ~13 min and firmware paths ~9
#: min beside another file on 2 cores); the arm64 file second, so one xdist
#: worker builds the arm64 set while the other builds the x86 images.  With
#: ``--dist loadfile`` files go to the workers in this order, so the long
#: ones do not start last and leave one worker idle at the end.
LONGEST_FIRST = ("test_lab_real_os.py", "test_lab_arm64.py", "test_lab_firmware_paths.py",
                 "test_lab_bmc.py", "test_lab_vagrant.py", "test_lab_ipv6.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
