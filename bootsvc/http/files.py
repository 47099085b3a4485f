"""Serving a file over HTTP: ETag and ``If-None-Match`` (304), one byte
range (``Range``, ``If-Range``: 206 or 416), streamed in 256 KiB blocks.

Installers fetch kernels, initrds and disk images of several GiB and
resume a broken download with a range; a multi-range or malformed
``Range`` is ignored and the whole file is sent (RFC 9110 allows it).  The
header decisions (:func:`plan_file`, :func:`parse_range`,
:func:`etag_matches`) are pure; the node's own server sends these files
itself with sendfile (:mod:`bootsvc.http.file_fastpath`), from the same plan.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from flask import Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import HttpError

#: bytes read and written per block
BLOCK = 1 << 18

_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")


class UnsatisfiableRange(ValueError):
    """A ``Range`` that asks for no byte of the file (416)."""


def parse_range(header: str, size: int) -> tuple[int, int] | None:
    """The one byte range ``header`` asks of a ``size``-byte file, as
    ``(first, last)`` inclusive and clamped to the file; ``None`` for a
    header to ignore (malformed, several ranges, no bound).  Raises
    :class:`UnsatisfiableRange` when it starts past the end."""
    m = _RANGE_RE.fullmatch(header.strip())
    if not m or not (m.group(1) or m.group(2)):
        return None
    if m.group(1):
        first = int(m.group(1))
        last = int(m.group(2)) if m.group(2) else size - 1
    else:                       # a suffix: the last N bytes
        first = max(0, size - int(m.group(2)))
        last = size - 1
    last = min(last, size - 1)
    if first >= size or first > last:
        raise UnsatisfiableRange(header)
    return first, last


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag`` (or is ``*``)."""
    if not if_none_match:
        return False
    return if_none_match.strip() == "*" or etag in [t.strip() for t in if_none_match.split(",")]


def file_etag(path: Path, st: os.stat_result, hint: str | None) -> str:
    """The ETag of ``path``: ``hint`` (an image's sha256) when given, else
    a digest of the path, size and mtime."""
    return '"' + (hint or hashlib.sha256(
        f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]) + '"'


@dataclass(frozen=True, slots=True)
class FilePlan:
    """What to answer for a file: ``status`` (200, 206, 304 or 416), the
    headers (without ``Content-Length`` for 304/416, which carry no body),
    and the byte span ``start`` / ``length`` of the file to send."""

    status: int
    headers: dict[str, str]
    start: int = 0
    length: int = 0


def plan_file(path: Path, st: os.stat_result, *, etag_hint: str | None = None,
              if_none_match: str | None = None, range_header: str | None = None,
              if_range: str | None = None) -> FilePlan:
    """The answer to a GET of ``path`` (stat ``st``) with these request
    headers: 304 when ``If-None-Match`` names the ETag; 416 for a range
    past the end; 206 for one satisfiable range (unless ``If-Range`` names
    another ETag: then the whole file, 200); else 200.  Pure: both the
    Flask route (:func:`serve_file`) and the node's inline file path
    (:mod:`bootsvc.http.file_fastpath`) answer from it."""
    size = st.st_size
    etag = file_etag(path, st, etag_hint)
    headers = {"ETag": etag, "Accept-Ranges": "bytes",
               "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                              time.gmtime(st.st_mtime)),
               "Cache-Control": "no-cache"}
    if etag_matches(if_none_match, etag):
        return FilePlan(304, headers)
    if range_header and (not if_range or if_range.strip() == etag):
        try:
            chosen = parse_range(range_header, size)
        except UnsatisfiableRange:
            headers["Content-Range"] = f"bytes */{size}"
            return FilePlan(416, headers)
        if chosen is not None:
            first, last = chosen
            headers["Content-Range"] = f"bytes {first}-{last}/{size}"
            headers["Content-Length"] = str(last - first + 1)
            return FilePlan(206, headers, first, last - first + 1)
    headers["Content-Length"] = str(size)
    return FilePlan(200, headers, 0, size)


def serve_file(path: Path, *, etag_hint: str | None = None, metric: str = "file") -> Response:
    """``path`` as the answer, with the headers of :func:`plan_file`; 404
    when it is no file.  ``etag_hint`` (an image's sha256) replaces the
    ETag made of the path, size and mtime; ``metric`` labels
    ``http_files_total``.  The body goes through the server's
    ``wsgi.file_wrapper`` when it has one."""
    boot = current_boot()
    try:
        fh = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HttpError(404, "not_found", "no such file") from None
    try:
        plan = plan_file(path, os.fstat(fh.fileno()), etag_hint=etag_hint,
                         if_none_match=request.headers.get("If-None-Match"),
                         range_header=request.headers.get("Range"),
                         if_range=request.headers.get("If-Range"))
        boot.metrics.inc("http_files_total", kind=metric, status=str(plan.status))
        if plan.status in (304, 416):
            fh.close()
            return Response(status=plan.status, headers=plan.headers)
        fh.seek(plan.start)
        # a file_wrapper sends to the end of the file: only for the whole file
        wrapper = request.environ.get("wsgi.file_wrapper") if plan.status == 200 else None
        body: Iterable[bytes] = wrapper(fh, BLOCK) if wrapper else _read_blocks(fh, plan.length)
        resp = Response(body, status=plan.status, headers=plan.headers,
                        mimetype="application/octet-stream", direct_passthrough=True)
        resp.call_on_close(fh.close)
        return resp
    except Exception:
        fh.close()
        raise


def _read_blocks(fh: IO[bytes], length: int) -> Iterator[bytes]:
    """At most ``length`` bytes of ``fh`` from where it stands, block by block."""
    remaining = length
    while remaining > 0:
        chunk = fh.read(min(BLOCK, remaining))
        if not chunk:
            break
        remaining -= len(chunk)
        yield chunk
