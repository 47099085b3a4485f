"""The arm64 image build trusts only what the archive's signature covers
(issue #20): gpgv passes an InRelease file with unsigned text added around
the signed block, so a mirror or anyone on its plain-HTTP path could put a
forged SHA256 list there; the build reads the hashes from gpgv's output.
Uses the real InRelease of the Debian mirror apt is configured with (the
image build downloads it too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from images.common import SUITE, BuildError
from images.debian import _download, debian_mirror, parse_release_sha256, verified_release

NAME = "main/binary-arm64/Packages.xz"
FORGED = "0" * 64


@pytest.fixture(scope="module")
def inrelease(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("release") / "InRelease"
    _download(f"{debian_mirror()}/dists/{SUITE}/InRelease", path)
    return path


def test_unsigned_text_around_the_signed_block_is_not_read(inrelease: Path,
                                                           tmp_path: Path) -> None:
    real, _size = parse_release_sha256(verified_release(inrelease, "InRelease"), NAME)
    assert real != FORGED
    forged_section = f"Note: unsigned\nSHA256:\n {FORGED} 12345 {NAME}\n\n"
    before = forged_section + inrelease.read_text()
    # read as downloaded, the text before the signed block gives the forged hash
    assert parse_release_sha256(before, NAME)[0] == FORGED
    tampered = tmp_path / "InRelease"
    for text in (before, inrelease.read_text() + "\n" + forged_section):
        tampered.write_text(text)
        # what the signature covers gives the real one
        assert parse_release_sha256(verified_release(tampered, "InRelease"), NAME)[0] == real
    assert not (tmp_path / "InRelease.verified").exists()


def test_a_changed_signed_block_is_refused(inrelease: Path, tmp_path: Path) -> None:
    text = inrelease.read_text()
    real, _size = parse_release_sha256(verified_release(inrelease, "InRelease"), NAME)
    tampered = tmp_path / "InRelease"
    tampered.write_text(text.replace(real, FORGED, 1))
    with pytest.raises(BuildError, match="bad signature"):
        verified_release(tampered, "InRelease")
