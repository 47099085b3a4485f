"""The image catalog's rule of what a task may install (lpmos.catalog)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lpmos.catalog import CatalogError, load_catalog, parse_catalog
from lpmos.models import ValidationError

REPO = Path(__file__).resolve().parent.parent.parent

LIVE = {"name": "live", "os_type": "LPMOS live", "os_family": "lab", "role": "live",
        "mode": "installer", "kernel": "live/vmlinuz", "initrd": "live/initrd.img"}
LAB_OS = {"name": "lab-os", "os_type": "LPMOS lab OS", "os_family": "lab", "version": "1",
          "disk_image": "lab-os.img"}


def test_the_live_role_is_not_installable_and_not_offered() -> None:
    cat = parse_catalog({"image": [LIVE, LAB_OS]})
    assert cat.images["lab-os"].installable and cat.images["lab-os"].role == "install"
    assert not cat.images["live"].installable
    assert [i.name for i in cat.installable()] == ["lab-os"]
    # the node still finds it (it boots it for discovery)
    assert cat.find("LPMOS live") is cat.images["live"]


@pytest.mark.parametrize("os_type,image,field", [
    ("LPMOS live", "", "os_type"),
    ("lpmos LIVE", "", "os_type"),       # os_type is matched case-blind
    ("live", "", "os_type"),             # by name in os_type
    ("anything", "live", "image"),       # by image name
])
def test_a_task_for_the_live_image_is_refused_with_the_reason(os_type: str, image: str,
                                                              field: str) -> None:
    cat = parse_catalog({"image": [LIVE, LAB_OS]})
    with pytest.raises(ValidationError) as err:
        cat.resolve(os_type, image=image)
    assert err.value.field == field
    assert "live is the live agent image" in err.value.message
    assert "cannot be installed" in err.value.message
    assert "installable: LPMOS lab OS (lab-os)" in err.value.message
    assert "(live)" not in err.value.message.split("installable:")[1]


def test_an_unknown_os_lists_only_installable_entries() -> None:
    cat = parse_catalog({"image": [LIVE, LAB_OS]})
    with pytest.raises(ValidationError) as err:
        cat.resolve("Plan 9")
    assert err.value.message == "not in the image catalog; installable: LPMOS lab OS (lab-os)"
    assert cat.resolve("LPMOS lab OS").name == "lab-os"


@pytest.mark.parametrize("entry,words", [
    (dict(LIVE, role="discovery"), "role must be one of install, live"),
    # the live image is booted as kernel + initrd, whatever its mode says
    (dict(LIVE, mode="image", disk_image="x.img", kernel="", initrd=""),
     "the live image needs kernel and initrd"),
])
def test_bad_roles_are_refused_at_load(entry: dict[str, str], words: str) -> None:
    with pytest.raises(CatalogError, match=words):
        parse_catalog({"image": [entry]})


def test_the_shipped_catalog_offers_everything_but_the_live_images() -> None:
    cat = load_catalog(REPO / "images" / "catalog.toml")
    lives = {"live", "live-arm64"}
    assert all(name in cat.images and not cat.images[name].installable for name in lives)
    offered = {i.name for i in cat.installable()}
    assert offered == set(cat.images) - lives and "lab-os" in offered
    assert cat.images["live-arm64"].arch == cat.images["lab-os-arm64"].arch == "arm64"


@pytest.mark.parametrize(("disk_image", "fmt", "expected"), [
    ("debian-12.raw", "", "raw"),
    ("debian-12.qcow2", "", "qcow2"),
    ("debian-12.raw.zst", "", "raw.zst"),
    ("http://mirror/x/debian-12.img.XZ", "", "raw.xz"),
    ("debian-12.raw.gz", "", "raw.gz"),
    ("lab-os.img", "", "raw"),              # unknown suffix: raw
    ("debian-12.bin", "qcow2", "qcow2"),    # the entry's format wins
])
def test_disk_format_from_the_entry_or_the_suffix(disk_image: str, fmt: str,
                                                  expected: str) -> None:
    entry = {**LAB_OS, "disk_image": disk_image, "format": fmt}
    assert parse_catalog({"image": [entry]}).images["lab-os"].disk_format == expected


def test_disk_size_is_kept() -> None:
    entry = {**LAB_OS, "disk_image": "d.raw.zst", "disk_size": 2 << 30}
    assert parse_catalog({"image": [entry]}).images["lab-os"].disk_size == 2 << 30


@pytest.mark.parametrize(("change", "match"), [
    ({"format": "vmdk"}, "format must be one of raw, qcow2"),
    ({"disk_size": -1}, "disk_size must be a non-negative integer"),
    ({"disk_size": "2G"}, "disk_size must be a non-negative integer"),
    ({"disk_size": True}, "disk_size must be a non-negative integer"),
    ({"format": "raw", "size": 10, "disk_size": 20}, "a raw image's disk_size is its size"),
])
def test_bad_format_or_disk_size_refused(change: dict, match: str) -> None:
    with pytest.raises(CatalogError, match=match):
        parse_catalog({"image": [{**LAB_OS, **change}]})


@pytest.mark.parametrize("arch", ["amd64", "aarch64", "riscv64", ""])
def test_an_architecture_the_catalog_does_not_name_is_refused_at_load(arch: str) -> None:
    with pytest.raises(CatalogError, match="arch must be one of x86_64, arm64"):
        parse_catalog({"image": [{**LAB_OS, "arch": arch}]})


@pytest.mark.parametrize("image_arch,machine,reason", [
    ("x86_64", "x86_64", ""), ("x86_64", "i386", ""), ("x86_64", "AMD64", ""),
    ("x86_64", "", ""), ("x86_64", "mips", ""),
    ("x86_64", "aarch64", "lab-os is built for x86_64, and this machine is arm64 (aarch64)"),
    ("arm64", "aarch64", ""), ("arm64", "arm64", ""),
    ("arm64", "x86_64", "lab-os is built for arm64, and this machine is x86_64 (x86_64)"),
])
def test_arch_mismatch_names_both_architectures(image_arch: str, machine: str,
                                                reason: str) -> None:
    img = parse_catalog({"image": [{**LAB_OS, "arch": image_arch}]}).images["lab-os"]
    got = img.arch_mismatch(machine)
    assert (reason in got) if reason else got == ""
    assert bool(got) == bool(reason)
