"""One image file over HTTP(S) into a ``.part`` file, resumed with ``Range``,
verified before it is kept.

:func:`fetch_file` runs on the image sync's worker thread (never on the
event loop).  Every network step has a deadline: ``connect_timeout`` to
connect, ``read_timeout`` for each read (a source that accepts and then
says nothing fails the attempt with that reason).  A failed attempt that
may pass (connection refused or reset, timeout, 5xx, a body cut short) is
retried with jittered exponential back-off, ``retries`` times, counted
from the last attempt that brought bytes; one that will not (a 4xx, a
sha256 or size that does not match, a cache bound reached) fails at once.

Resume: the bytes already in the part file are hashed again, then asked
for with ``Range: bytes=N-``.  A ``206`` must start at ``N``; a ``200``
(the server ignores ranges) starts over.  Redirects (301, 302, 303, 307,
308) are followed, at most :data:`MAX_REDIRECTS`.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import random
import re
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

#: bytes per read and write
CHUNK = 1 << 20
MAX_REDIRECTS = 5
BACKOFF_MIN = 0.5
BACKOFF_MAX = 30.0

_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


class FetchError(Exception):
    """A download that failed.  ``code`` is the metric label (a fixed set:
    ``http_status``, ``timeout``, ``connect``, ``checksum``, ``size``,
    ``cache_full``, ``protocol``, ``io``, ``cancelled``); ``permanent``:
    trying again now would fail the same way."""

    def __init__(self, code: str, reason: str, *, permanent: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.permanent = permanent


@dataclass(frozen=True)
class FetchSettings:
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4


#: ``headers(path_with_query)`` -> extra request headers (the node signature)
HeaderSource = Callable[[str], Mapping[str, str]]
#: ``progress(bytes_done, total)``; total 0 when unknown
Progress = Callable[[int, int], None]


class _Attempt(Exception):
    """One attempt failed in a way another may not (``FetchError`` inside)."""

    def __init__(self, error: FetchError, progressed: bool) -> None:
        super().__init__(error.reason)
        self.error = error
        self.progressed = progressed


def _open(url: str, settings: FetchSettings) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    host = parts.hostname or ""
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = http.client.HTTPSConnection(host, parts.port, timeout=settings.connect_timeout,
                                           context=ssl.create_default_context())
    elif parts.scheme == "http":
        conn = http.client.HTTPConnection(host, parts.port, timeout=settings.connect_timeout)
    else:
        raise FetchError("protocol", f"not an http(s) URL: {url[:200]}", permanent=True)
    try:
        conn.connect()
    except TimeoutError:
        raise FetchError("timeout", f"no connection to {host} within "
                                    f"{settings.connect_timeout:g} s") from None
    except OSError as exc:
        raise FetchError("connect", f"cannot connect to {host}: {exc}") from None
    assert conn.sock is not None
    conn.sock.settimeout(settings.read_timeout)
    return conn


def _target(url: str) -> str:
    parts = urlsplit(url)
    return (parts.path or "/") + (f"?{parts.query}" if parts.query else "")


def _redact(url: str) -> str:
    """The URL for a reason or a log: no user info, no query (it may hold a
    signed token), at most 200 characters."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"[:200]


def fetch_file(url: str, part: Path, *, sha256: str, size: int, settings: FetchSettings,
               headers: HeaderSource | None = None, progress: Progress | None = None,
               cancelled: Callable[[], bool] = lambda: False, limit: int = 0,
               unauthorized: Callable[[], object] | None = None,
               sleep: Callable[[float], None] = time.sleep) -> int:
    """Download ``url`` into ``part`` (resuming what it holds) and check it:
    on return ``part`` holds exactly the bytes whose sha256 is ``sha256``
    (and whose length is ``size`` when non-zero); the byte count.  Raises
    :class:`FetchError`; on a checksum or size mismatch ``part`` is deleted.
    ``limit`` (non-zero): the most bytes the file may take in the cache;
    ``unauthorized()`` is called on a 401 (a signed request is then tried
    again, as after a 5xx: the signing key may have just been rotated)."""
    digest = hashlib.sha256()
    done = _rehash(part, digest, size, cancelled)
    failures = 0
    while True:
        if size and done == size:
            break
        try:
            done, digest, complete = _attempt(url, part, done, digest, size=size,
                                              settings=settings, headers=headers,
                                              progress=progress, cancelled=cancelled,
                                              limit=limit, unauthorized=unauthorized)
            if complete:
                break
            failures = 0
        except _Attempt as exc:
            done = part.stat().st_size if part.exists() else 0
            if exc.error.permanent:
                raise exc.error from None
            failures = 0 if exc.progressed else failures + 1
            if failures > settings.retries:
                raise FetchError(exc.error.code, f"{exc.error.reason} (after "
                                 f"{settings.retries + 1} attempts)") from None
            delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** max(0, failures - 1))
            sleep(random.uniform(delay / 2, delay))
            if cancelled():
                raise FetchError("cancelled", "cancelled") from None
            digest = hashlib.sha256()
            done = _rehash(part, digest, size, cancelled)
    got = digest.hexdigest()
    if size and done != size:
        part.unlink(missing_ok=True)
        raise FetchError("size", f"size mismatch: expected {size} bytes, got {done}",
                         permanent=True)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise FetchError("checksum", f"sha256 mismatch: expected {sha256}, got {got}",
                         permanent=True)
    return done


def _rehash(part: Path, digest: Any, size: int, cancelled: Callable[[], bool]) -> int:
    """Hash the bytes ``part`` already holds (a resume); a part longer than
    ``size`` starts over."""
    try:
        have = part.stat().st_size
    except FileNotFoundError:
        return 0
    if size and have > size:
        part.unlink()
        return 0
    done = 0
    with part.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if cancelled():
                raise FetchError("cancelled", "cancelled")
    return done



def _attempt(url: str, part: Path, done: int, digest: Any, *, size: int,
             settings: FetchSettings, headers: HeaderSource | None,
             progress: Progress | None, cancelled: Callable[[], bool],
             limit: int, unauthorized: Callable[[], object] | None) -> tuple[int, Any, bool]:
    """One connection (following redirects): ``(done, digest, complete)``."""
    start_done = done
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        try:
            conn = _open(current, settings)
        except FetchError as exc:
            raise _Attempt(exc, False) from None
        try:
            request_headers = {"Accept": "*/*", "User-Agent": "lpmos-node"}
            if headers is not None:
                try:
                    request_headers.update(headers(_target(current)))
                except FetchError as exc:
                    raise _Attempt(exc, False) from None
            if done:
                request_headers["Range"] = f"bytes={done}-"
            try:
                conn.request("GET", _target(current), headers=request_headers)
                resp = conn.getresponse()
            except TimeoutError:
                raise _Attempt(FetchError("timeout", f"no answer from {_redact(current)} "
                                          f"within {settings.read_timeout:g} s"), False) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Attempt(FetchError("connect", f"{_redact(current)}: {exc}"),
                               False) from None
            status = resp.status
            if status in (301, 302, 303, 307, 308) and resp.getheader("Location"):
                current = urljoin(current, resp.getheader("Location", ""))
                continue
            if status == 416 and done:
                # asked past the end: what we hold is all there is (or garbage)
                return done, digest, True
            if status >= 400:
                reason = f"HTTP {status} {resp.reason} from {_redact(current)}"
                # a signed request refused: the key may have been rotated (read again)
                retry = status >= 500 or (status == 401 and headers is not None)
                if status == 401 and unauthorized is not None:
                    unauthorized()
                raise _Attempt(FetchError("http_status", reason, permanent=not retry), False)
            if status not in (200, 206):
                raise _Attempt(FetchError("protocol", f"unexpected HTTP {status} from "
                                          f"{_redact(current)}", permanent=True), False)
            total = size
            if status == 206:
                m = _RANGE_RE.fullmatch(resp.getheader("Content-Range", "").strip())
                if m is None or int(m.group(1)) != done:
                    raise _Attempt(FetchError("protocol", "bad Content-Range "
                                              f"{resp.getheader('Content-Range', '')[:60]!r} "
                                              f"for a resume at {done}", permanent=True), False)
                if m.group(3) != "*":
                    total = total or int(m.group(3))
                    if size and int(m.group(3)) != size:
                        raise _Attempt(_size_error(size, int(m.group(3))), False)
            else:
                if done:     # the server ignores Range: start over
                    part.unlink(missing_ok=True)
                    done, digest = 0, hashlib.sha256()
                    start_done = 0
                length = resp.getheader("Content-Length")
                if length and length.isdigit():
                    if size and int(length) != size:
                        raise _Attempt(_size_error(size, int(length)), False)
                    total = total or int(length)
            if limit and total and total > limit:
                raise _Attempt(FetchError("cache_full", f"cache full: needs {total} bytes, "
                                          f"{limit} free", permanent=True), False)
            done, digest = _body(resp, part, done, digest, size=size, total=total,
                                 url=current, settings=settings, progress=progress,
                                 cancelled=cancelled, limit=limit, start_done=start_done)
            return done, digest, True
        finally:
            conn.close()
    raise _Attempt(FetchError("protocol", f"more than {MAX_REDIRECTS} redirects from "
                              f"{_redact(url)}", permanent=True), False)


def _size_error(size: int, got: int) -> FetchError:
    return FetchError("size", f"size mismatch: expected {size} bytes, the source has {got}",
                      permanent=True)


def _body(resp: http.client.HTTPResponse, part: Path, done: int, digest: Any, *, size: int,
          total: int, url: str, settings: FetchSettings, progress: Progress | None,
          cancelled: Callable[[], bool], limit: int, start_done: int) -> tuple[int, Any]:
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        if os.fstat(fd).st_size != done:
            os.ftruncate(fd, done)
        while True:
            if cancelled():
                raise _Attempt(FetchError("cancelled", "cancelled", permanent=True),
                               done > start_done)
            try:
                chunk = resp.read1(CHUNK)
            except TimeoutError:
                raise _Attempt(FetchError("timeout", f"no data from {_redact(url)} for "
                                          f"{settings.read_timeout:g} s at byte {done}"),
                               done > start_done) from None
            except (OSError, http.client.HTTPException) as exc:
                raise _Attempt(FetchError("connect", f"{_redact(url)} broke off at byte "
                                          f"{done}: {exc}"), done > start_done) from None
            if not chunk:
                break
            if size and done + len(chunk) > size:
                raise _Attempt(_size_error(size, done + len(chunk)), done > start_done)
            if limit and done + len(chunk) > limit:
                raise _Attempt(FetchError("cache_full", f"cache full: needs more than "
                                          f"{limit} bytes free", permanent=True), False)
            try:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
            except OSError as exc:
                raise _Attempt(FetchError("io", f"cannot write {part.name}: {exc}",
                                          permanent=True), False) from None
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress(done, total)
        if total and done < total:
            raise _Attempt(FetchError("connect", f"{_redact(url)} ended at byte {done} of "
                                      f"{total}"), done > start_done)
        os.fsync(fd)
    finally:
        os.close(fd)
    return done, digest
