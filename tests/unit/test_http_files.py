"""The header decisions of file serving: one byte range, and If-None-Match."""

from __future__ import annotations

import pytest

from bootsvc.http.files import UnsatisfiableRange, etag_matches, parse_range


@pytest.mark.parametrize(("header", "size", "expected"), [
    ("bytes=0-99", 1000, (0, 99)),
    ("bytes=100-", 1000, (100, 999)),
    ("bytes=-100", 1000, (900, 999)),
    ("bytes=-5000", 1000, (0, 999)),
    ("bytes=900-5000", 1000, (900, 999)),
    (" bytes=0-0 ", 1000, (0, 0)),
    ("bytes=0-", 1, (0, 0)),
    ("bytes=-", 1000, None),
    ("bytes=0-1,5-9", 1000, None),
    ("items=0-1", 1000, None),
    ("bytes=a-b", 1000, None),
    ("", 1000, None),
])
def test_parse_range_one_range_clamped_or_ignored(
        header: str, size: int, expected: tuple[int, int] | None) -> None:
    assert parse_range(header, size) == expected


@pytest.mark.parametrize(("header", "size"), [
    ("bytes=1000-", 1000),
    ("bytes=1000-2000", 1000),
    ("bytes=5-3", 1000),
    ("bytes=-0", 1000),
    ("bytes=0-", 0),
    ("bytes=-10", 0),
])
def test_parse_range_unsatisfiable_when_no_byte_is_asked(header: str, size: int) -> None:
    with pytest.raises(UnsatisfiableRange):
        parse_range(header, size)


@pytest.mark.parametrize(("header", "expected"), [
    (None, False),
    ("", False),
    ('"abc"', True),
    (' "abc" ', True),
    ('"x", "abc"', True),
    ('"x","y"', False),
    ("*", True),
    ('W/"abc"', False),
])
def test_etag_matches_if_none_match(header: str | None, expected: bool) -> None:
    assert etag_matches(header, '"abc"') is expected
