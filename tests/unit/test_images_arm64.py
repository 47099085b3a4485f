"""The arm64 image build's pure parts: the foreign index's parsers, the names
that keep arm64 caches apart from x86 ones, the arm64 QEMU command."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from images import common, debian, lab_os, live, netboot
from lab.arm64 import AAVMF_CODE, arm64_command
from lab.vm import VM

RELEASE = """Origin: Debian
Suite: stable
MD5Sum:
 3b716e59badbf5fabc139c31e360ddf4 49434864 main/binary-arm64/Packages
SHA256:
 c7c883a61f3482 49434864 main/binary-arm64/Packages
 2ddb1737692e8c  8689464 main/binary-arm64/Packages.xz
"""

PACKAGES = """Package: busybox-static
Version: 1:1.35.0-4+deb12u1+b1
Architecture: arm64
Depends: libc6 (>= 2.36)
Description: Standalone rescue shell
 with tons of builtin utilities
Filename: pool/main/b/busybox/busybox-static_1.35.0-4+deb12u1+b1_arm64.deb
SHA256: 00aa

Package: linux-image-arm64
Version: 6.1.176-1
Depends: linux-image-6.1.0-50-arm64 (= 6.1.176-1)
Filename: pool/main/l/linux-signed-arm64/linux-image-arm64_6.1.176-1_arm64.deb
SHA256: 11bb
"""


def test_release_sha256_is_read_from_the_sha256_section_only() -> None:
    digest, size = debian.parse_release_sha256(RELEASE, "main/binary-arm64/Packages.xz")
    assert digest.startswith("2ddb1737") and size == 8689464
    digest, _ = debian.parse_release_sha256(RELEASE, "main/binary-arm64/Packages")
    assert digest.startswith("c7c883a6")          # not the MD5Sum line of the same name
    with pytest.raises(common.BuildError, match="names no main/binary-armhf"):
        debian.parse_release_sha256(RELEASE, "main/binary-armhf/Packages.xz")


def test_packages_index_gives_each_package_its_fields() -> None:
    index = debian.parse_packages(PACKAGES)
    assert set(index) == {"busybox-static", "linux-image-arm64"}
    assert index["busybox-static"]["Version"] == "1:1.35.0-4+deb12u1+b1"
    assert index["busybox-static"]["SHA256"] == "00aa"
    assert index["linux-image-arm64"]["Depends"].startswith("linux-image-6.1.0-50-arm64")


@pytest.mark.parametrize("arch", [common.ARCH, "../x", "ARM64", ""])
def test_foreign_dir_refuses_the_host_arch_and_odd_names(arch: str) -> None:
    with pytest.raises(common.BuildError):
        debian.foreign_dir(arch)


def test_arm64_caches_and_outputs_never_share_a_name_with_x86() -> None:
    assert debian.foreign_dir("arm64").name == "debs-arm64"
    assert (live.live_name(), live.live_name("arm64")) == ("live", "live-arm64")
    assert (lab_os.lab_os_name(), lab_os.lab_os_name("arm64")) == ("lab-os", "lab-os-arm64")
    assert netboot.netboot_name("arm64") == "netboot-arm64"
    assert live.TRIPLETS["arm64"] == "aarch64-linux-gnu"
    assert live.target_command(Path("/r"), common.ARCH) == []


def test_arm64_lab_os_disk_fits_the_uncompressed_kernel() -> None:
    disk = lab_os.LAB_OS_DISK_ARM64
    assert disk.esp_size >= 40 * lab_os.MIB        # Debian's arm64 Image is 33 MB
    layout = lab_os.render_gpt_layout("k" * 64, disk)
    assert f"size={disk.esp_size // lab_os.SECTOR}" in layout
    assert f"start={disk.seed_start // lab_os.SECTOR}" in layout


def test_arm64_qemu_command_boots_aavmf_pxe_without_an_x86_rom(tmp_path: Path) -> None:
    vm = VM("a", "uefi", "52:54:00:a6:00:01", "SN-1", "00000000-0000-4000-8000-000000000001",
            tmp_path)
    cmd = arm64_command(vm, tap="arm0", disk=tmp_path / "d.img", vars_fd=tmp_path / "v.fd",
                        memory_mb=1024)
    assert cmd[0] == "qemu-system-aarch64" and "-accel" in cmd and "tcg" in cmd
    assert cmd[cmd.index("-machine") + 1] == "virt"
    assert f"if=pflash,format=raw,unit=0,readonly=on,file={AAVMF_CODE}" in cmd
    nic = next(a for a in cmd if a.startswith("virtio-net-pci"))
    assert "romfile=," in nic and "mac=52:54:00:a6:00:01" in nic and "bootindex=2" in nic
    assert any(a.startswith("virtio-blk-pci") and "bootindex=1" in a for a in cmd)
    assert "serial=SN-1" in cmd[cmd.index("-smbios") + 1]


def test_unpacking_a_deb_keeps_the_merged_usr_links(tmp_path: Path) -> None:
    """A package that ships /bin/x lands in usr/bin/x of a merged-/usr root,
    and ``bin`` stays a link (``dpkg-deb -x`` would make it a directory)."""
    pkg = tmp_path / "pkg"
    (pkg / "DEBIAN").mkdir(parents=True)
    (pkg / "DEBIAN" / "control").write_text(
        "Package: lpmos-test\nVersion: 1\nArchitecture: all\nMaintainer: t <t@t>\n"
        "Description: test\n")
    (pkg / "bin").mkdir()
    (pkg / "bin" / "hello").write_text("#!/bin/sh\n")
    deb = tmp_path / "t.deb"
    subprocess.run(["dpkg-deb", "--root-owner-group", "-b", str(pkg), str(deb)], check=True,
                   capture_output=True)
    root = tmp_path / "root"
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "bin").symlink_to("usr/bin")
    debian.unpack_deb_into_root(deb, root)
    assert (root / "bin").is_symlink()
    assert (root / "usr" / "bin" / "hello").read_text() == "#!/bin/sh\n"
