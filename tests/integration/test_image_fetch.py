"""bootsvc.images.fetch.fetch_file against a real HTTP source on loopback
(tests/image_source.py): resume, a source that ignores Range, redirects,
a body cut short, size and digest checks, the cache bound, timeouts."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bootsvc.images.fetch import FetchError, FetchSettings, fetch_file
from tests.image_source import ImageSource

MiB = 1 << 20
QUICK = FetchSettings(connect_timeout=1.0, read_timeout=1.0, retries=2)


@pytest.fixture
def source() -> Iterator[ImageSource]:
    src = ImageSource()
    yield src
    src.close()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(source: ImageSource, path: str, part: Path, data: bytes, **kw: object) -> int:
    args: dict[str, object] = {"sha256": sha(data), "size": len(data), "settings": QUICK,
                               "sleep": lambda _s: None}
    args.update(kw)
    return fetch_file(source.url(path), part, **args)  # type: ignore[arg-type]


def test_a_part_file_is_resumed_with_a_range(source: ImageSource, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB)
    source.files["/f"] = data
    part = tmp_path / "f.part"
    part.write_bytes(data[:MiB + 5])
    seen: list[tuple[int, int]] = []
    assert fetch(source, "/f", part, data, progress=lambda d, t: seen.append((d, t))) == len(data)
    assert part.read_bytes() == data
    assert source.seen == [("/f", f"bytes={MiB + 5}-")]
    assert seen[-1] == (len(data), len(data)) and seen[0][0] > MiB + 5


def test_a_source_that_ignores_range_is_read_from_the_start(source: ImageSource,
                                                             tmp_path: Path) -> None:
    data = os.urandom(MiB)
    source.files["/f"] = data
    source.ignore_range.add("/f")
    part = tmp_path / "f.part"
    part.write_bytes(b"\0" * 1000)            # not even the right bytes
    assert fetch(source, "/f", part, data) == len(data)
    assert part.read_bytes() == data


def test_a_body_cut_short_is_resumed(source: ImageSource, tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    source.files["/f"] = data
    source.cut["/f"] = 512 * 1024
    part = tmp_path / "f.part"
    assert fetch(source, "/f", part, data) == len(data)
    assert [r for _p, r in source.seen] == ["", f"bytes={512 * 1024}-"]


def test_redirects_are_followed(source: ImageSource, tmp_path: Path) -> None:
    data = os.urandom(1000)
    source.files["/real"] = data
    source.redirect["/old"] = "/real"
    assert fetch(source, "/old", tmp_path / "p", data) == 1000


def test_a_wrong_digest_deletes_the_part_and_names_both(source: ImageSource,
                                                        tmp_path: Path) -> None:
    data = os.urandom(1000)
    source.files["/f"] = data
    part = tmp_path / "p"
    with pytest.raises(FetchError) as err:
        fetch(source, "/f", part, data, sha256="0" * 64)
    assert err.value.code == "checksum" and err.value.permanent
    assert err.value.reason == f"sha256 mismatch: expected {'0' * 64}, got {sha(data)}"
    assert not part.exists()


def test_a_size_other_than_the_records_is_refused_before_the_body(
        source: ImageSource, tmp_path: Path) -> None:
    data = os.urandom(1000)
    source.files["/f"] = data
    with pytest.raises(FetchError) as err:
        fetch(source, "/f", tmp_path / "p", data, size=999)
    assert err.value.code == "size"
    assert err.value.reason == "size mismatch: expected 999 bytes, the source has 1000"


def test_the_cache_bound_stops_a_download_of_unknown_size(source: ImageSource,
                                                         tmp_path: Path) -> None:
    data = os.urandom(2 * MiB)
    source.files["/f"] = data
    with pytest.raises(FetchError) as err:
        fetch(source, "/f", tmp_path / "p", data, size=0, limit=MiB)
    assert err.value.code == "cache_full" and err.value.permanent


def test_a_404_fails_at_once_and_a_5xx_is_retried(source: ImageSource, tmp_path: Path) -> None:
    with pytest.raises(FetchError) as err:
        fetch(source, "/none", tmp_path / "p", b"x")
    assert err.value.reason == f"HTTP 404 Not Found from {source.url('/none')}"
    assert err.value.permanent and len(source.seen) == 1
    data = os.urandom(1000)
    source.files["/busy"] = data
    source.errors["/busy"] = [503, 502]
    assert fetch(source, "/busy", tmp_path / "q", data) == 1000
    assert [p for p, _r in source.seen].count("/busy") == 3
    source.errors["/busy"] = [503, 503, 503]
    with pytest.raises(FetchError) as err:
        fetch(source, "/busy", tmp_path / "r", data)
    assert err.value.reason == (f"HTTP 503 Service Unavailable from {source.url('/busy')} "
                                "(after 3 attempts)")


def test_a_silent_source_times_out_after_the_retries(source: ImageSource,
                                                    tmp_path: Path) -> None:
    source.hang.add("/h")
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        fetch(source, "/h", tmp_path / "p", b"x")
    assert err.value.code == "timeout" and not err.value.permanent
    assert err.value.reason == (f"no answer from {source.url('/h')} within 1 s "
                                "(after 3 attempts)")
    assert time.monotonic() - started < 6
    assert len(source.seen) == 3


def test_a_refused_connection_is_a_clear_reason(tmp_path: Path) -> None:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # closed when the block ends: nobody listens
    with pytest.raises(FetchError) as err:
        fetch_file(f"http://127.0.0.1:{port}/f", tmp_path / "p", sha256="0" * 64, size=1,
                   settings=QUICK, sleep=lambda _s: None)
    assert err.value.code == "connect"
    assert err.value.reason.startswith("cannot connect to 127.0.0.1: ")
    assert err.value.reason.endswith("(after 3 attempts)")


def test_a_cancelled_download_stops(source: ImageSource, tmp_path: Path) -> None:
    data = os.urandom(4 * MiB)
    source.files["/f"] = data
    source.rate["/f"] = 2 * MiB
    stop = threading.Event()
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(FetchError) as err:
        fetch(source, "/f", tmp_path / "p", data, cancelled=stop.is_set)
    assert err.value.code == "cancelled"
    assert 0 < (tmp_path / "p").stat().st_size < len(data)     # kept for a resume
