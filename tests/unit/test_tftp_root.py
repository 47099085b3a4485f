"""The TFTP root: name normalisation, confinement, cache, virtual files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootsvc.tftp.root import (
    FileNotFound,
    PathRejected,
    TftpRoot,
    normalize_name,
    prepare_tftp_root,
)
from bootsvc.wire.tftp import ErrorCode

CLIENT = ("192.0.2.1", 1234)


@pytest.mark.parametrize("name, expected", [
    ("undionly.kpxe", "undionly.kpxe"),
    ("pxelinux.cfg\\default", "pxelinux.cfg/default"),
    ("./a//b/./c", "a/b/c"),
    ("a\\\\b", "a/b"),
    ("dir/", "dir"),
    # a leading separator is the root (GRUB asks for /grub/grub.cfg), never "/"
    ("/grub/grub.cfg", "grub/grub.cfg"),
    ("/etc/passwd", "etc/passwd"),
    ("\\etc\\passwd", "etc/passwd"),
    ("//x", "x"),
])
def test_normalize_name_accepts(name, expected):
    assert normalize_name(name) == expected


@pytest.mark.parametrize("name, reason", [
    ("", "empty_name"),
    (".", "empty_name"),
    ("./", "empty_name"),
    ("../etc/passwd", "traversal"),
    ("a/../../b", "traversal"),
    ("a/..", "traversal"),
    ("..\\..\\windows", "traversal"),
    ("/", "empty_name"),
    ("/../etc/passwd", "traversal"),
    ("C:\\boot.ini", "absolute"),
    ("c:boot.ini", "absolute"),
    ("a\x00b", "non_printable"),
    ("a\nb", "non_printable"),
    ("caf\u00e9", "non_printable"),
    ("a" * 256, "name_too_long"),
    ("/".join(["d"] * 17), "too_deep"),
])
def test_normalize_name_refuses(name, reason):
    with pytest.raises(PathRejected) as err:
        normalize_name(name)
    assert err.value.reason == reason
    assert err.value.code == ErrorCode.ACCESS_VIOLATION


@pytest.fixture
def layout(tmp_path: Path) -> tuple[Path, Path]:
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "secret").write_bytes(b"secret")
    (root / "sub").mkdir()
    (root / "sub" / "file.bin").write_bytes(b"inside")
    (root / "hello").write_bytes(b"hello\nworld")
    return root, outside


def test_open_serves_file_and_subdir_with_backslashes(layout):
    root, _ = layout
    r = TftpRoot(root)
    assert r.open("hello", CLIENT).data == b"hello\nworld"
    assert r.open("sub\\file.bin", CLIENT).data == b"inside"


def test_open_netascii_converts_line_ends(layout):
    root, _ = layout
    assert TftpRoot(root).open("hello", CLIENT, netascii=True).data == b"hello\r\nworld"


def test_open_missing_is_not_found(layout):
    root, _ = layout
    with pytest.raises(FileNotFound) as err:
        TftpRoot(root).open("nope", CLIENT)
    assert err.value.code == ErrorCode.FILE_NOT_FOUND
    with pytest.raises(FileNotFound):
        TftpRoot(root).open("hello/under-a-file", CLIENT)


def test_open_refuses_symlink_out_of_root(layout):
    root, outside = layout
    (root / "escape").symlink_to(outside / "secret")
    (root / "escapedir").symlink_to(outside)
    r = TftpRoot(root)
    for name in ("escape", "escapedir/secret"):
        with pytest.raises(PathRejected) as err:
            r.open(name, CLIENT)
        assert err.value.reason == "outside_root"
        assert err.value.code == ErrorCode.ACCESS_VIOLATION


def test_open_follows_symlink_inside_root(layout):
    root, _ = layout
    (root / "alias").symlink_to("sub/file.bin")
    assert TftpRoot(root).open("alias", CLIENT).data == b"inside"


def test_open_refuses_non_regular_files(layout):
    root, _ = layout
    os.mkfifo(root / "fifo")
    r = TftpRoot(root)
    for name in ("fifo", "sub"):
        with pytest.raises(PathRejected) as err:
            r.open(name, CLIENT)
        assert err.value.reason == "not_regular"


def test_open_refuses_file_over_size_limit(layout):
    root, _ = layout
    with pytest.raises(PathRejected) as err:
        TftpRoot(root, max_file_bytes=4).open("hello", CLIENT)
    assert err.value.reason == "too_large"


def test_cache_hit_then_invalidated_by_change(layout):
    root, _ = layout
    r = TftpRoot(root)
    r.open("hello", CLIENT)
    r.open("hello", CLIENT)
    assert (r.hits, r.misses) == (1, 1)
    path = root / "hello"
    path.write_bytes(b"changed!")
    os.utime(path, ns=(1, 1))
    assert r.open("hello", CLIENT).data == b"changed!"
    assert r.misses == 2


def test_cache_bound_evicts_least_recent(tmp_path):
    for i in range(4):
        (tmp_path / f"f{i}").write_bytes(bytes([i]) * 100)
    r = TftpRoot(tmp_path, cache_bytes=250)
    for i in range(4):
        r.open(f"f{i}", CLIENT)
    assert r.cached_bytes <= 250
    r.open("f3", CLIENT)
    assert r.hits == 1
    big = tmp_path / "big"
    big.write_bytes(b"x" * 1000)
    assert r.open("big", CLIENT).data == b"x" * 1000   # served, not cached
    assert r.cached_bytes <= 250


def test_virtual_pattern_is_anchored(layout):
    root, _ = layout
    (root / "boot.ipxe.bak").write_bytes(b"static")
    calls = []

    def gen(name, client):
        calls.append((name, client))
        return b"#!ipxe\n"

    r = TftpRoot(root, virtual=gen, virtual_pattern=r"boot\.ipxe")
    assert r.open("boot.ipxe", CLIENT).data == b"#!ipxe\n"
    assert r.open("./boot.ipxe", CLIENT).virtual
    assert r.open("boot.ipxe.bak", CLIENT).data == b"static"
    with pytest.raises(FileNotFound):
        r.open("sub/boot.ipxe", CLIENT)
    assert calls == [("boot.ipxe", CLIENT), ("boot.ipxe", CLIENT)]


def test_virtual_none_falls_back_to_static_file(layout):
    root, _ = layout
    (root / "x.ipxe").write_bytes(b"on disk")
    r = TftpRoot(root, virtual=lambda name, client: None)
    assert r.open("x.ipxe", CLIENT).data == b"on disk"


def test_virtual_never_sees_traversal(layout):
    root, _ = layout
    seen = []
    r = TftpRoot(root, virtual=lambda name, client: seen.append(name) or b"x",
                 virtual_pattern=r".*")
    with pytest.raises(PathRejected):
        r.open("../boot.ipxe", CLIENT)
    assert seen == []


def test_prepare_tftp_root_copies_and_is_idempotent(tmp_path):
    source = tmp_path / "ipxe"
    source.mkdir()
    (source / "undionly.kpxe").write_bytes(b"bios")
    (source / "ipxe.efi").write_bytes(b"uefi")
    root = tmp_path / "state" / "tftp"
    shim = tmp_path / "shimx64.efi.signed"
    shim.write_bytes(b"signed shim")
    loaders = {"shimx64.efi": shim, "grubx64.efi": tmp_path / "missing.efi.signed"}
    placed = prepare_tftp_root(root, source, loaders)
    assert sorted(placed) == ["ipxe.efi", "shimx64.efi", "undionly.kpxe"]
    assert (root / "shimx64.efi").read_bytes() == b"signed shim"
    assert (root / "ipxe.efi").read_bytes() == b"uefi"
    assert not (root / "ipxe.efi").is_symlink()
    assert prepare_tftp_root(root, source, loaders) == placed
    assert sorted(p.name for p in root.iterdir()) == ["ipxe.efi", "shimx64.efi",
                                                      "undionly.kpxe"]


def test_prepare_tftp_root_from_debian_ipxe(tmp_path):
    if not Path("/usr/lib/ipxe/undionly.kpxe").exists():
        pytest.skip("Debian's ipxe package is not installed")
    placed = prepare_tftp_root(tmp_path / "tftp")
    assert {"undionly.kpxe", "ipxe.efi", "snponly.efi"} <= set(placed)
    r = TftpRoot(tmp_path / "tftp")
    assert r.open("ipxe.efi", CLIENT).data == Path("/usr/lib/ipxe/ipxe.efi").read_bytes()
    # the Secure Boot chain: Debian's signed shim, and its signed GRUB network
    # image under the name shim loads next (setup.sh installs both packages)
    assert {"shimx64.efi", "grubx64.efi"} <= set(placed)
    assert r.open("grubx64.efi", CLIENT).data == Path(
        "/usr/lib/grub/x86_64-efi-signed/grubnetx64.efi.signed").read_bytes()
