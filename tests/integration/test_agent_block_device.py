"""The agent's install onto a real block device (a loop device over a file),
not a file: mtools, BLKZEROOUT and the disk's size behave differently on a
block device (``st_size`` is 0), which the file-target unit tests cannot
show.  The first lab run of the real Debian image failed exactly there
("mformat: Offset bigger than base image")."""

from __future__ import annotations

import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.install import install_image, parse_install
from tests.unit.test_agent_install import (  # noqa: F401  (the module fixture)
    DISK,
    GOOD,
    SEED,
    Backoff,
    MemorySource,
    check_cloud_install,
    cloud,
    needs_image_tools,
)


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    backing = tmp_path / "disk.img"
    with backing.open("wb") as fh:
        fh.truncate(DISK)
    done = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True,
                          text=True, timeout=30, check=False)
    if done.returncode != 0:
        pytest.fail(f"losetup failed: {done.stderr.strip()}")
    device = Path(done.stdout.strip())
    try:
        yield device, backing
    finally:
        subprocess.run(["losetup", "-d", str(device)], timeout=30, check=False)


@needs_image_tools
@pytest.mark.parametrize("fmt", ["qcow2-c", "raw.zst"])
def test_install_onto_a_block_device_adds_the_seed_at_its_end(
        loop_disk: tuple[Path, Path], cloud: dict[str, bytes], fmt: str) -> None:  # noqa: F811
    device, backing = loop_disk
    published = cloud[fmt]
    spec = parse_install({**GOOD, "size": len(published), "format": fmt.removesuffix("-c"),
                          "sha256": hashlib.sha256(published).hexdigest(), "seed": SEED})
    events: list[dict[str, object]] = []
    offset = install_image(MemorySource(published), spec, device, report=events.append,
                           allow_removable=False, backoff=Backoff(0.001, 0.002),
                           sleep=lambda s: None)
    subprocess.run(["losetup", "-d", str(device)], timeout=30, check=True)
    check_cloud_install(backing, cloud["raw"], offset)
