"""The catalog's files (kernel, initrd, disk image) without Flask.

``GET``/``HEAD /images/<name>/<file>`` is what a boot storm's installers
spend their bytes on: N machines pulling the same multi-GiB disk image.
:class:`CatalogFiles` answers it for the node's own server
(:class:`bootsvc.http.server.AsyncHttpServer`'s ``files`` handler), on the
event loop and without a thread: the answer is a
:class:`~bootsvc.http.sendfile.FileAnswer` whose body the server sends
with ``sendfile(2)`` (:func:`bootsvc.http.sendfile.send_span`).

It serves exactly what the ``files`` blueprint (:mod:`bootsvc.http.routes_files`)
serves, decided the same way:

* the file is found by :meth:`BootBackend.boot_file` (only a local file
  the catalog names for that image, whatever the catalog is built from);
* a disk image needs some machine's token (``Authorization: Bearer`` or
  ``?token=``), checked against the node's cache;
* ETag, ``If-None-Match`` (304), ``Range`` and ``If-Range`` (206, 416)
  come from :func:`bootsvc.http.files.plan_file`, the route's own rule;
* the same records: ``http_files_total{kind,status}``,
  ``http_requests_total``, and a ``kernel fetched`` / ``initrd fetched``
  timeline entry of the client's address.

Everything it does not serve itself — a refusal (no token: 401; not in
the catalog: 404), a name outside the pattern, a percent-encoded path, a
file that is gone or not a regular file — returns ``None`` and goes to the
Flask route, so every error answer and its counting stays in one place.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import BinaryIO
from urllib.parse import parse_qsl

from bootsvc.http.backend import BootBackend
from bootsvc.http.files import plan_file
from bootsvc.http.routes_files import FILE_RE
from bootsvc.http.sendfile import FileAnswer

_PREFIX = b"/images/"
_WANTED = {b"range": "range", b"if-range": "if_range", b"if-none-match": "if_none_match",
           b"authorization": "authorization"}


class CatalogFiles:
    """``answer(method, path, query, headers, peer)`` for the node's
    server: a :class:`FileAnswer`, or ``None`` to hand the request to the
    app.  Cheap to call for any request (a prefix check first)."""

    def __init__(self, boot: BootBackend) -> None:
        self.boot = boot
        m = boot.metrics
        m.describe("http_file_transfers_total",
                   "catalog file bodies sent by the node's sendfile path, by kind and outcome "
                   "(complete, disconnect, timeout, shutdown)")
        m.describe("http_file_sent_bytes_total",
                   "bytes of catalog files sent by the node's sendfile path, by kind")

    def answer(self, method: bytes, path: bytes, query: bytes,
               headers: list[tuple[bytes, bytes]], peer: str) -> FileAnswer | None:
        if not path.startswith(_PREFIX) or b"%" in path:
            return None
        parts = path[len(_PREFIX):].decode("latin-1").split("/")
        if len(parts) != 2 or not FILE_RE.fullmatch(parts[1]):
            return None
        name, file = parts
        boot = self.boot
        found = boot.boot_file(name, file, disk=True)
        if found is None:
            return None
        which, where = found
        wanted = _pick(headers)
        if which == "disk_image" and boot.tokens.owner(_token(wanted, query) or "") is None:
            return None         # the route refuses it (401) and counts it
        fh = _open_regular(where)
        if fh is None:
            return None
        try:
            image = boot.catalog.images[name]
            etag = image.sha256 if which == "disk_image" and image.sha256 else None
            plan = plan_file(where, os.fstat(fh.fileno()), etag_hint=etag,
                             if_none_match=wanted.get("if_none_match"),
                             range_header=wanted.get("range"), if_range=wanted.get("if_range"))
        except BaseException:
            fh.close()
            raise
        m = boot.metrics
        m.inc("http_files_total", kind=which, status=str(plan.status))
        m.inc("http_requests_total")
        if which != "disk_image":
            boot.ctx.timeline.record(f"ip:{peer}", f"{which} fetched", {
                "image": name, "file": file, "range": wanted.get("range", "")[:40],
                "ip": peer})
        out = list(plan.headers.items())
        if plan.status in (304, 416):
            fh.close()
            if plan.status == 416:
                out.append(("Content-Length", "0"))
            return FileAnswer(plan.status, out)
        out.append(("Content-Type", "application/octet-stream"))
        if method == b"HEAD" or not plan.length:
            fh.close()
            return FileAnswer(plan.status, out)

        def done(sent: int, outcome: str) -> None:
            m.inc("http_file_transfers_total", kind=which, outcome=outcome)
            m.inc("http_file_sent_bytes_total", sent, kind=which)

        return FileAnswer(plan.status, out, fh, plan.start, plan.length, done)


def _pick(headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The request headers this path reads; a repeated one joined with
    commas (as the WSGI environ has it)."""
    out: dict[str, str] = {}
    for raw_name, raw_value in headers:
        key = _WANTED.get(raw_name.lower())
        if key is not None:
            value = raw_value.decode("latin-1")
            out[key] = out[key] + ", " + value if key in out else value
    return out


def _token(wanted: dict[str, str], query: bytes) -> str | None:
    """The machine token as :func:`bootsvc.http.common.request_token` reads it."""
    header = wanted.get("authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    if b"token=" not in query:
        return None
    try:
        pairs = parse_qsl(query.decode("latin-1")[:2048], max_num_fields=16)
    except ValueError:
        return None
    return next((v for k, v in pairs if k == "token"), None) or None


def _open_regular(path: Path) -> BinaryIO | None:
    """``path`` opened for reading if it is a regular file (never blocks on
    a FIFO or device named by mistake), else ``None``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        os.set_blocking(fd, True)
    except OSError:
        os.close(fd)
        return None
    return os.fdopen(fd, "rb", buffering=0)


__all__ = ["CatalogFiles"]
