"""Managed images: ``/api/v1/images`` (:mod:`lpmos.images`).

| method and path                          | role      | what                                  |
| ---------------------------------------- | --------- | ------------------------------------- |
| GET    /images                           | viewer    | every managed image, with its copies  |
| GET    /images/{name}                    | viewer    | one, per IDC and node                 |
| POST   /images                           | admin     | add: ``source`` ``url`` or ``upload`` |
| PUT    /images/{name}/files/{role}       | admin     | upload one file (streamed)            |
| GET    /images/{name}/files/{role}       | operator, | an uploaded file (Range); nodes sign  |
|                                          | or a node | with :mod:`lpmos.nodeapi`             |
| DELETE /images/{name}                    | admin     | remove (refused while a task needs it)|

An upload is streamed to ``--image-store`` in 1 MiB blocks (never held whole
in memory), hashed on the way, checked against the sha256 and size the
operator announced, and only then renamed into place and written into the
record, which turns ``available`` once every file is in: nodes fetch only
then.  A cut-off or mismatched upload leaves the record as it was and no
file behind.  The record and its audit entry are one transaction.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from flask import Blueprint, Response, current_app, jsonify, request, send_file
from werkzeug.exceptions import ClientDisconnected

from lpmos.auth import Role
from lpmos.images import MAX_SIZE, NAME_RE, ImageFile, ManagedImage, parse_add_request
from lpmos.nodeapi import SCHEME, SharedKey, verify
from lpmos.store import Compare, Conflict, Delete, Put
from web.audit import request_auditor
from web.auth import current_principal, requires
from web.context import WebContext, ctx
from web.http import ApiError, parse_json_body

bp = Blueprint("api_images", __name__, url_prefix="/api/v1")

#: the endpoint whose body is streamed, not read up front (web.app's hook)
UPLOAD_ENDPOINT = "api_images.upload_image_file"
BLOCK = 1 << 20
#: a client that sends nothing for this long is cut off
IDLE_TIMEOUT = 60.0


def image_store(c: WebContext) -> Path:
    configured = c.setting("web.image_store")
    return Path(configured) if configured else Path(c.config["state_dir"]) / "images"


def _user() -> str:
    p = current_principal()
    assert p is not None
    return p.user


def _found(name: str) -> tuple[ManagedImage, int]:
    found = ctx().index.image(name) if NAME_RE.fullmatch(name) else None
    if found is None:
        raise ApiError(404, "not_found", f"no managed image named {name!r} "
                                         "(see GET /api/v1/images)")
    return found


def _stored(name: str) -> tuple[ManagedImage, int]:
    """The record as etcd has it now (writes compare its revision)."""
    c = ctx()
    kv = c.store.get(c.keys.image(name)) if NAME_RE.fullmatch(name) else None
    if kv is None:
        raise ApiError(404, "not_found", f"no managed image named {name!r}")
    return ManagedImage.from_json(kv.value), kv.mod_revision


def _settle(revision: int) -> None:
    ctx().cache.wait_for_revision(revision, 2.0)


def image_view(img: ManagedImage, revision: int) -> dict[str, Any]:
    """The record with, per IDC that should hold it, each live node's copy."""
    c = ctx()
    copies = c.index.image_copies(img.name)
    idcs = []
    for idc in c.index.idcs():
        if not img.wanted_in(idc["name"]):
            continue
        nodes = []
        for node in idc["nodes"]:
            st = next((s for i, n, s in copies if (i, n) == (idc["name"], node["name"])), None)
            nodes.append({"node": node["name"], "alive": node["alive"],
                          "state": st.state if st else "missing",
                          "progress": round(st.progress, 4) if st else 0.0,
                          "bytes": st.bytes if st else 0, "total": st.total if st else 0,
                          "reason": st.reason if st else "",
                          "describe": st.describe(node["name"]) if st else
                          f"not on node {node['name']} yet"})
        ready = sum(1 for n in nodes if n["state"] == "ready")
        idcs.append({"idc": idc["name"], "nodes": nodes, "ready": ready,
                     "all_ready": bool(nodes) and ready == len(nodes)})
    for idc_name in img.idcs:
        if not any(i["idc"] == idc_name for i in idcs):
            idcs.append({"idc": idc_name, "nodes": [], "ready": 0, "all_ready": False})
    return {**img.public(), "revision": revision,
            "in_use_by": len(c.index.tasks_using(img.name)), "copies": idcs}


@bp.get("/images")
@requires(Role.VIEWER)
def list_images() -> Any:
    return jsonify({"items": [image_view(img, rev) for img, rev in ctx().index.images()]})


@bp.get("/images/<name>")
@requires(Role.VIEWER)
def get_image(name: str) -> Any:
    return jsonify({"image": image_view(*_found(name))})


@bp.post("/images")
@requires(Role.ADMIN)
def add_image() -> Any:
    """``{"name", "os_type", "os_family", "format", "source", "files", ...}``
    (see :func:`lpmos.images.parse_add_request`)."""
    c = ctx()
    body = parse_json_body(request.get_data(cache=True))
    img = parse_add_request(body, user=_user())
    seed = c.seed_catalog
    if seed is not None and img.name in seed.images:
        raise ApiError(409, "conflict", f"{img.name!r} is an image of the seed catalog "
                                        "file; choose another name")
    key = c.keys.image(img.name)
    try:
        revision = c.store.commit([Compare(key, 0)], [
            Put(key, img.to_json()),
            request_auditor(c).op("image.add", img.name, after=img.public())])
    except Conflict:
        raise ApiError(409, "conflict", f"a managed image named {img.name!r} exists; remove "
                                        "it first or choose another name") from None
    _settle(revision)
    upload = [f"/api/v1/images/{img.name}/files/{role}" for role in img.file_roles] \
        if img.source == "upload" else []
    resp = jsonify({"image": img.public(), "revision": revision, "upload": upload})
    resp.status_code = 201
    return resp


@bp.put("/images/<name>/files/<role>")
@requires(Role.ADMIN)
def upload_image_file(name: str, role: str) -> Any:
    """The bytes of one file of an ``upload`` image (``Content-Length``
    required; ``application/octet-stream``)."""
    c = ctx()
    img, _rev = _stored(name)
    if img.source != "upload":
        raise ApiError(409, "conflict", f"{name} is fetched from its URL; it takes no upload")
    if role not in img.file_roles:
        raise ApiError(404, "not_found", f"a {img.format} image has no file {role!r}; "
                                         f"its files: {', '.join(img.file_roles)}")
    if img.files.get(role) and img.files[role].url:
        raise ApiError(409, "conflict", f"{name}'s {role} is uploaded already; images are "
                                        "immutable: remove the image and add it again")
    length = request.content_length
    if length is None:
        raise ApiError(411, "length_required", "send the file with a Content-Length "
                                               "(e.g. curl -T FILE)")
    if length <= 0 or length > MAX_SIZE:
        raise ApiError(400, "bad_request", f"the file must be 1 to {MAX_SIZE} bytes")
    expected = img.files.get(role) or ImageFile(url="")
    if expected.size and expected.size != length:
        raise ApiError(422, "size_mismatch", f"{role} was announced as {expected.size} bytes; "
                                             f"this upload is {length}")
    directory = image_store(c) / name
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / role
    part = directory / f"{role}.part"
    fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
    with os.fdopen(fd, "wb") as out:
        try:
            fcntl.flock(out.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ApiError(409, "conflict", f"another upload of {name}'s {role} is in "
                                            "progress") from None
        try:
            digest = _receive(out, length)
            if expected.sha256 and digest != expected.sha256:
                raise ApiError(422, "checksum_mismatch",
                               f"{role} has sha256 {digest}; it was announced as "
                               f"{expected.sha256}. Nothing was kept")
            out.flush()
            os.fsync(out.fileno())
            os.replace(part, final)
        except BaseException:
            with contextlib.suppress(OSError):
                part.unlink()
            raise
    base = c.setting("web.public_url") or request.host_url.rstrip("/")
    file = ImageFile(url=f"{base}/api/v1/images/{name}/files/{role}", sha256=digest, size=length)
    try:
        img, revision = _record_file(c, name, role, file)
    except ApiError:
        with contextlib.suppress(OSError):
            final.unlink()
        raise
    _settle(revision)
    return jsonify({"image": img.public(), "revision": revision})


def _receive(out: Any, length: int) -> str:
    """Copy exactly ``length`` body bytes to ``out``; the sha256 hex."""
    sock = request.environ.get("gunicorn.socket")
    if isinstance(sock, socket.socket):
        sock.settimeout(IDLE_TIMEOUT)
    request.max_content_length = MAX_SIZE
    stream = request.stream
    digest = hashlib.sha256()
    got = 0
    try:
        while got < length:
            chunk = stream.read(min(BLOCK, length - got))
            if not chunk:
                break
            digest.update(chunk)
            out.write(chunk)
            got += len(chunk)
    except (OSError, TimeoutError, ClientDisconnected) as exc:
        raise ApiError(400, "upload_cut_off", f"the upload stopped after {got} of {length} "
                                              f"bytes ({exc}); nothing was kept") from None
    if got < length:
        raise ApiError(400, "upload_cut_off", f"the upload stopped after {got} of {length} "
                                              "bytes; nothing was kept")
    return digest.hexdigest()


def _record_file(c: WebContext, name: str, role: str, file: ImageFile
                 ) -> tuple[ManagedImage, int]:
    for _try in range(5):
        img, rev = _stored(name)
        if img.files.get(role) and img.files[role].url:
            raise ApiError(409, "conflict", f"{name}'s {role} was uploaded meanwhile")
        new = img.with_file(role, file)
        key = c.keys.image(name)
        ops = [Put(key, new.to_json())]
        if new.offered:
            ops.append(request_auditor(c).op("image.upload", name, before=img.public(),
                                             after=new.public()))
        try:
            return new, c.store.commit([Compare(key, rev)], ops)
        except Conflict:
            continue
    raise ApiError(409, "conflict", f"{name} kept changing; retry the upload")


@bp.get("/images/<name>/files/<role>")
def download_image_file(name: str, role: str) -> Any:
    """An uploaded file, with Range (206) and conditional requests: for
    regional nodes (a signed request) and operators."""
    c = ctx()
    header = request.headers.get("Authorization", "")
    if header.startswith(SCHEME + " "):
        query = request.query_string.decode("latin-1")
        target = request.path + (f"?{query}" if query else "")
        shared = current_app.extensions.get("lpmos_image_node_key")
        if shared is None:
            shared = current_app.extensions.setdefault("lpmos_image_node_key",
                                                       SharedKey(c.store, c.keys))
        why = verify(shared.get(), request.method, target, header, time.time())
        if why == "bad_signature" and shared.refresh():
            why = verify(shared.get(), request.method, target, header, time.time())
        if why:
            c.metrics.inc("web_refused_total", reason="node_signature")
            raise ApiError(401, "unauthorized", f"the node signature does not check ({why})",
                           reason="node_signature")
        return _send(name, role)
    return _operator_download(name, role)


download_image_file.lpmos_role = Role.OPERATOR  # type: ignore[attr-defined]
download_image_file.lpmos_mutating = False  # type: ignore[attr-defined]


@requires(Role.OPERATOR, mutating=False)
def _operator_download(name: str, role: str) -> Any:
    return _send(name, role)


def _send(name: str, role: str) -> Response:
    # etcd's record, not the watch cache's: a node that saw the upload
    # complete must never get a 404 from a cache a moment behind
    img, _rev = _stored(name)
    file = img.files.get(role)
    if img.source != "upload" or file is None or not file.url:
        raise ApiError(404, "not_found", f"{name} has no uploaded {role}")
    path = image_store(ctx()) / name / role
    if not path.is_file():
        raise ApiError(404, "not_found", f"{name}'s {role} is not in this control plane's "
                                         "image store (uploaded to another replica?)")
    resp = send_file(path, mimetype="application/octet-stream", conditional=True,
                     etag=file.sha256, max_age=0)
    resp.headers["X-Checksum-Sha256"] = file.sha256
    return resp


@bp.delete("/images/<name>")
@requires(Role.ADMIN)
def remove_image(name: str) -> Any:
    """Remove an image: refused while an active task installs it; nodes
    then free their copies."""
    c = ctx()
    img, rev = _stored(name)
    users = c.index.tasks_using(name)
    if users:
        shown = ", ".join(f"{t.idc}/{t.sn} ({t.status})" for t in users[:5])
        more = f" and {len(users) - 5} more" if len(users) > 5 else ""
        raise ApiError(409, "in_use", f"{name} is needed by {len(users)} active task(s): "
                                      f"{shown}{more}; cancel or finish them first",
                       tasks=[f"{t.idc}/{t.sn}" for t in users[:100]])
    key = c.keys.image(name)
    try:
        revision = c.store.commit([Compare(key, rev)], [
            Delete(key), request_auditor(c).op("image.remove", name, before=img.public())])
    except Conflict:
        raise ApiError(409, "conflict", f"{name} changed meanwhile; retry") from None
    shutil.rmtree(image_store(c) / name, ignore_errors=True)
    _settle(revision)
    return jsonify({"deleted": name, "revision": revision})

