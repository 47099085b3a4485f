"""The pure parts of the image build as tables: the lab OS disk's geometry,
its sfdisk script and its mformat commands (the build itself runs in the
lab tests)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from images.lab_os import (
    LAB_OS_DISK,
    MIB,
    DiskGeometry,
    _uuid_from,
    mformat_command,
    render_gpt_layout,
)

KEY = "0123456789abcdef" * 4


def test_lab_os_disk_geometry() -> None:
    disk = LAB_OS_DISK
    assert (disk.esp_start, disk.esp_size, disk.seed_start, disk.seed_size) == (
        1 * MIB, 24 * MIB, 25 * MIB, 4 * MIB)
    assert disk.total == 30 * MIB            # 1 MiB after CIDATA for the backup GPT


def test_render_gpt_layout_golden() -> None:
    assert render_gpt_layout(KEY) == (
        "label: gpt\n"
        "label-id: DAC357C2-C62E-4430-872C-838A0793CE22\n"
        "first-lba: 2048\n"
        "start=2048, size=49152, type=C12A7328-F81F-11D2-BA4B-00A0C93EC93B, "
        'uuid=EA0B41B8-8C97-4E4F-8C90-24F33A121764, name="lab-os-boot", '
        'attrs="LegacyBIOSBootable"\n'
        "start=51200, size=8192, type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7, "
        'uuid=FA2BB051-07A6-44F0-80C0-A48D89AC2A3B, name="cidata"\n')


@pytest.mark.parametrize(("disk", "starts"), [
    (DiskGeometry(), ("start=2048, size=49152", "start=51200, size=8192")),
    (DiskGeometry(esp_size=8 * MIB, seed_size=1 * MIB),
     ("start=2048, size=16384", "start=18432, size=2048")),
    (DiskGeometry(esp_start=2 * MIB), ("start=4096, size=49152", "start=53248, size=8192")),
])
def test_render_gpt_layout_follows_geometry(disk: DiskGeometry, starts: tuple[str, str]) -> None:
    lines = render_gpt_layout(KEY, disk).splitlines()
    assert lines[3].startswith(starts[0] + ", ") and lines[4].startswith(starts[1] + ", ")


@pytest.mark.parametrize(("key", "same"), [(KEY, True), ("f" * 64, False)])
def test_render_gpt_layout_ids_come_from_the_key(key: str, same: bool) -> None:
    assert (render_gpt_layout(key) == render_gpt_layout(KEY)) is same


@pytest.mark.parametrize("what", ["disk", "esp", "seed"])
def test_uuid_from_is_a_version_4_guid(what: str) -> None:
    value = _uuid_from(KEY, what)
    assert re.fullmatch(r"[0-9A-F]{8}-[0-9A-F]{4}-4[0-9A-F]{3}-8[0-9A-F]{3}-[0-9A-F]{12}", value)
    assert value == _uuid_from(KEY, what) != _uuid_from(KEY, what + "x")


@pytest.mark.parametrize(("start", "size", "label", "serial", "command"), [
    (LAB_OS_DISK.esp_start, LAB_OS_DISK.esp_size, "LABOSBOOT", "01234567",
     ["mformat", "-i", "/t/lab-os.img@@1048576", "-T", "49152", "-h", "64", "-s", "32",
      "-H", "2048", "-v", "LABOSBOOT", "-N", "01234567", "::"]),
    (LAB_OS_DISK.seed_start, LAB_OS_DISK.seed_size, "CIDATA", "76543210",
     ["mformat", "-i", "/t/lab-os.img@@26214400", "-T", "8192", "-h", "64", "-s", "32",
      "-H", "51200", "-v", "CIDATA", "-N", "76543210", "::"]),
])
def test_mformat_command(start: int, size: int, label: str, serial: str,
                         command: list[str]) -> None:
    assert mformat_command(Path("/t/lab-os.img"), start, size, label, serial) == command
