"""The ``files`` blueprint: the files a boot fetches, served by
:func:`bootsvc.http.files.serve_file` (ETag, Range).

| route                          | auth                                   |
| ------------------------------ | -------------------------------------- |
| GET /images/<name>/<file>      | kernel, initrd: none; disk image: any  |
|                                | machine's token                        |
| GET /ipxe/<file>               | none: the boot loaders of the TFTP     |
|                                | root (iPXE, shim, GRUB), for HTTP boot |

Each kernel, initrd and loader sent is a boot timeline entry of the
machine's address (``kernel fetched``, ``initrd fetched``, ``loader shim``
...), so a machine stuck between its loader and its kernel shows where.

On the node's own server, ``GET``/``HEAD /images/...`` that will be
served is answered before Flask by :mod:`bootsvc.http.file_fastpath`
(sendfile, the same rules and records); this route answers the rest (its
refusals) and any other WSGI server.

Only a file the catalog names for that image, or a plain file directly in
the TFTP root, is served; a name outside ``[A-Za-z0-9][A-Za-z0-9._+-]``
(at most 128 characters) is 404 before the disk is touched.
"""

from __future__ import annotations

import re

from flask import Blueprint, Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import HttpError
from bootsvc.http.files import serve_file
from bootsvc.tftp.chain import transfer_stage

#: the names a file may have (else 404 before the disk is touched)
FILE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")

files_bp = Blueprint("files", __name__)

@files_bp.get("/images/<name>/<file>")
def image_file(name: str, file: str) -> Response:
    boot = current_boot()
    found = boot.boot_file(name, file, disk=True) if FILE_RE.fullmatch(file) else None
    if found is None:
        raise HttpError(404, "not_found", "no such image file")
    which, path = found
    # the catalog may have been swapped since (a managed image removed or
    # evicted): no image then is a 404, never a KeyError's 500
    image = boot.catalog.images.get(name)
    if image is None:
        raise HttpError(404, "not_found", "no such image file")
    if which == "disk_image":
        boot.authenticate(None)        # any machine's token (a disk image is no secret of one)
    etag = image.sha256 if which == "disk_image" and image.sha256 else None
    response = serve_file(path, etag_hint=etag, metric=which)
    if which != "disk_image":
        _record(f"{which} fetched", {"image": name, "file": file})
    return response


def _record(stage: str, detail: dict[str, object]) -> None:
    """A timeline entry for the file this request is sent (its status and range)."""
    detail = {**detail, "range": request.headers.get("Range", "")[:40],
              "ip": request.remote_addr or ""}
    current_boot().ctx.timeline.record(f"ip:{request.remote_addr}", stage, detail)


@files_bp.get("/ipxe/<file>")
def ipxe_file(file: str) -> Response:
    boot = current_boot()
    if not FILE_RE.fullmatch(file):
        boot.metrics.inc("http_requests_refused_total", reason="bad_path")
        raise HttpError(404, "not_found", "no such file")
    root = boot.tftp_root.resolve()
    path = (root / file).resolve()
    if path.parent != root:
        boot.metrics.inc("http_requests_refused_total", reason="outside_root")
        raise HttpError(404, "not_found", "no such file")
    response = serve_file(path, metric="ipxe")
    _record(transfer_stage(file, "loader"), {"file": file, "via": "http"})
    return response
