"""The pure parts of the image build as tables: the lab OS disk's geometry,
its sfdisk script and its mformat commands; the Debian cloud image's layout,
GRUB's BIOS embedding and its configs (the builds themselves run in the lab
tests)."""

from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from images.debian_cloud import (
    BOOT_DRIVE_CHECK,
    BOOT_KERNEL_SECTOR,
    CLOUD_DISK,
    BuildError,
    CloudDisk,
    build_bios_boot,
    esp_grub_cfg,
    grub_cfg,
    render_cloud_gpt,
)
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


# --- the real Debian cloud image (images/debian_cloud.py) -------------------------



def test_cloud_disk_puts_root_last_and_leaves_room_for_the_backup_gpt() -> None:
    disk = CLOUD_DISK
    assert (disk.bios_start, disk.esp_start, disk.root_start) == (MIB, 2 * MIB, 128 * MIB)
    assert disk.root_start + disk.root_size == disk.total - MIB
    lines = render_cloud_gpt(KEY).splitlines()
    assert [re.search(r'name="(\w+)"', line).group(1)  # type: ignore[union-attr]
            for line in lines[3:]] == ["bios", "esp", "root"]
    assert lines[3].startswith("start=2048, size=2048, type=21686148-")
    assert lines[5].startswith(f"start=262144, size={disk.root_size // 512}, ")
    assert render_cloud_gpt(KEY) == render_cloud_gpt(KEY) != render_cloud_gpt("f" * 64)


def _boot_img() -> bytes:
    return bytes(range(256)) * 2


@pytest.mark.parametrize(("core_len", "lba", "sectors"), [
    (512 * 60, 2048, 60), (512 * 60 + 7, 2048, 61), (1024, 4096, 2)])
def test_build_bios_boot_points_mbr_and_blocklist_at_the_core(core_len: int, lba: int,
                                                              sectors: int) -> None:
    mbr = b"\xaa" * 440 + b"TABLE-AND-SIG".ljust(72, b"t")
    core = b"\x11" * core_len
    new_mbr, new_core = build_bios_boot(_boot_img(), core, mbr, lba)
    assert len(new_mbr) == 512 and new_mbr[440:] == mbr[440:]       # the table stays
    assert struct.unpack_from("<Q", new_mbr, BOOT_KERNEL_SECTOR)[0] == lba
    assert new_mbr[BOOT_DRIVE_CHECK:BOOT_DRIVE_CHECK + 2] == b"\x90\x90"
    assert new_mbr[:BOOT_KERNEL_SECTOR] == _boot_img()[:BOOT_KERNEL_SECTOR]
    assert len(new_core) == sectors * 512
    start, length, segment = struct.unpack_from("<QHH", new_core, 500)
    assert (start, length, segment) == (lba + 1, sectors - 1, 0x820)
    assert new_core[488:500] == b"\0" * 12                          # the list ends
    assert new_core[512:core_len] == core[512:]


@pytest.mark.parametrize(("boot", "core", "mbr"), [
    (b"x" * 511, b"c" * 1024, b"m" * 512), (b"x" * 512, b"c" * 512, b"m" * 512),
    (b"x" * 512, b"c" * 1024, b"m" * 100)])
def test_build_bios_boot_refuses_what_cannot_be_embedded(boot: bytes, core: bytes,
                                                          mbr: bytes) -> None:
    with pytest.raises(BuildError):
        build_bios_boot(boot, core, mbr, 2048)


def test_grub_configs_find_the_root_by_uuid_and_boot_its_kernel() -> None:
    cfg = grub_cfg("1234-abcd", "6.1.0-57-amd64")
    assert "search --no-floppy --fs-uuid --set=root 1234-abcd" in cfg
    assert "linux /boot/vmlinuz-6.1.0-57-amd64 root=UUID=1234-abcd ro console=tty0" in cfg
    assert "initrd /boot/initrd.img-6.1.0-57-amd64" in cfg
    assert "insmod" not in cfg      # signed GRUB under Secure Boot loads no module
    assert esp_grub_cfg("1234-abcd").splitlines() == [
        "search.fs_uuid 1234-abcd root", "set prefix=($root)'/boot/grub'",
        "configfile $prefix/grub.cfg"]
    assert CloudDisk(total=4096 * MIB).root_size == 4096 * MIB - 129 * MIB
