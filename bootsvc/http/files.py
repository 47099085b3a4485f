"""Serving a file over HTTP: ETag and ``If-None-Match`` (304), one byte
range (``Range``, ``If-Range``: 206 or 416), streamed in 256 KiB blocks.

Installers fetch kernels, initrds and disk images of several GiB and
resume a broken download with a range; a multi-range or malformed
``Range`` is ignored and the whole file is sent (RFC 9110 allows it).  The
header decisions (:func:`parse_range`, :func:`etag_matches`) are pure.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Iterable, Iterator
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


def _etag(path: Path, st: os.stat_result, hint: str | None) -> str:
    return '"' + (hint or hashlib.sha256(
        f"{path}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:32]) + '"'


def serve_file(path: Path, *, etag_hint: str | None = None, metric: str = "file") -> Response:
    """``path`` as the answer, with the headers above; 404 when it is no
    file.  ``etag_hint`` (an image's sha256) replaces the ETag made of the
    path, size and mtime; ``metric`` labels ``http_files_total``.  The
    body goes through the server's ``wsgi.file_wrapper`` when it has one."""
    boot = current_boot()
    try:
        fh = path.open("rb")
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise HttpError(404, "not_found", "no such file") from None
    try:
        st = os.fstat(fh.fileno())
        size = st.st_size
        etag = _etag(path, st, etag_hint)
        headers = {"ETag": etag, "Accept-Ranges": "bytes",
                   "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                                  time.gmtime(st.st_mtime)),
                   "Cache-Control": "no-cache"}
        if etag_matches(request.headers.get("If-None-Match"), etag):
            fh.close()
            boot.metrics.inc("http_files_total", kind=metric, status="304")
            return Response(status=304, headers=headers)
        start, length, status = 0, size, 200
        rng = request.headers.get("Range")
        if_range = request.headers.get("If-Range")
        if rng and (not if_range or if_range.strip() == etag):
            try:
                chosen = parse_range(rng, size)
            except UnsatisfiableRange:
                fh.close()
                boot.metrics.inc("http_files_total", kind=metric, status="416")
                headers["Content-Range"] = f"bytes */{size}"
                return Response(status=416, headers=headers)
            if chosen is not None:
                first, last = chosen
                start, length, status = first, last - first + 1, 206
                headers["Content-Range"] = f"bytes {first}-{last}/{size}"
        fh.seek(start)
        headers["Content-Length"] = str(length)
        wrapper = request.environ.get("wsgi.file_wrapper")
        body: Iterable[bytes] = wrapper(fh, BLOCK) if wrapper else _read_blocks(fh, length)
        boot.metrics.inc("http_files_total", kind=metric, status=str(status))
        resp = Response(body, status=status, headers=headers,
                        mimetype="application/octet-stream", direct_passthrough=True)
        resp.call_on_close(fh.close)
        return resp
    except HttpError:
        raise
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
