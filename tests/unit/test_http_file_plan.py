"""plan_file: the one answer rule both the Flask route and the node's
sendfile path follow (status, headers, the span to send)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bootsvc.http.files import FilePlan, file_etag, plan_file


@pytest.fixture
def stat(tmp_path: Path) -> tuple[Path, os.stat_result]:
    path = tmp_path / "disk.img"
    path.write_bytes(b"x" * 1000)
    return path, path.stat()


@pytest.mark.parametrize(("headers", "status", "span", "content_range"), [
    ({}, 200, (0, 1000), None),
    ({"range_header": "bytes=10-19"}, 206, (10, 10), "bytes 10-19/1000"),
    ({"range_header": "bytes=-10"}, 206, (990, 10), "bytes 990-999/1000"),
    ({"range_header": "bytes=990-5000"}, 206, (990, 10), "bytes 990-999/1000"),
    ({"range_header": "bytes=1000-"}, 416, (0, 0), "bytes */1000"),
    ({"range_header": "bytes=0-1,4-5"}, 200, (0, 1000), None),
    ({"range_header": "bytes=0-9", "if_range": '"other"'}, 200, (0, 1000), None),
    ({"range_header": "bytes=0-9", "if_range": '"sha"'}, 206, (0, 10), "bytes 0-9/1000"),
    ({"if_none_match": '"a", "sha"'}, 304, (0, 0), None),
    ({"if_none_match": "*", "range_header": "bytes=0-9"}, 304, (0, 0), None),
])
def test_plan_file_status_span_and_headers(stat: tuple[Path, os.stat_result],
                                           headers: dict[str, str], status: int,
                                           span: tuple[int, int],
                                           content_range: str | None) -> None:
    path, st = stat
    plan = plan_file(path, st, etag_hint="sha", **headers)
    assert isinstance(plan, FilePlan)
    assert (plan.status, (plan.start, plan.length)) == (status, span)
    assert plan.headers["ETag"] == '"sha"' and plan.headers["Accept-Ranges"] == "bytes"
    assert plan.headers.get("Content-Range") == content_range
    if status in (200, 206):
        assert plan.headers["Content-Length"] == str(span[1])
    else:
        assert "Content-Length" not in plan.headers


def test_etag_without_a_hint_follows_size_and_mtime(stat: tuple[Path, os.stat_result]) -> None:
    path, st = stat
    before = file_etag(path, st, None)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert file_etag(path, path.stat(), None) != before
    assert plan_file(path, st).headers["ETag"] == before
