"""Managed images: OS images an operator adds through the API, CLI or
console, which every wanted IDC's regional nodes fetch, verify and serve.

Two records in etcd (the bytes never go there):

* ``keys.image(name)`` (``/os/images/{name}``): the catalog record, written
  by the control plane only (:class:`ManagedImage`).  Its ``files`` map each
  role (``disk_image``; ``kernel`` and ``initrd`` for an installer) to where
  the bytes are and what they must hash to.  An upload's URL is the control
  plane's own ``/api/v1/images/{name}/files/{role}`` (nodes sign their
  requests with :mod:`lpmos.nodeapi`); a URL source is the operator's URL,
  always with its sha256.  ``state`` is ``uploading`` until every file is
  in, then ``available``: nodes fetch only available records.
* ``keys.node_image(idc, node, name)``: one node's copy of it
  (:class:`NodeImageState`: fetching with progress, ready, failed with a
  reason), under the node's registration lease, so a dead node's copies
  vanish with it.

The seed catalog (``images/catalog.toml``) stays what a fresh install and
the lab start from; a managed image may not take a seed entry's name.
:meth:`ManagedImage.catalog_image` is the :class:`lpmos.catalog.Image` a
node serves once the files are verified in its cache, and
:meth:`ManagedImage.catalog_entry` the one the control plane checks tasks
against.
"""

from __future__ import annotations

import builtins
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from lpmos.catalog import ARCHES, DISK_FORMATS, FAMILIES, Image
from lpmos.models import ValidationError

#: what an image can be: a disk image in one of the agent's formats, or an
#: installer's kernel and initrd
FORMATS = (*DISK_FORMATS, "installer")
ARCHITECTURES = ARCHES      # the catalog's, one list
SOURCES = ("upload", "url")
RECORD_STATES = ("uploading", "available")
NODE_STATES = ("fetching", "ready", "failed")
DISK_ROLES = ("disk_image",)
INSTALLER_ROLES = ("kernel", "initrd")

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SHA_RE = re.compile(r"[0-9a-f]{64}")
_IDC_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
MAX_URL = 2048
MAX_TEXT = 200
MAX_DESCRIPTION = 1000
MAX_IDCS = 256
#: the largest image file we accept (1 TiB): a bound, not a policy
MAX_SIZE = 1 << 40


class ImageRecordError(ValueError):
    """A record in etcd that does not parse: skipped and logged, never served."""


@dataclass(frozen=True)
class ImageFile:
    url: str
    sha256: str = ""
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"url": self.url, "sha256": self.sha256, "size": self.size}


@dataclass(frozen=True)
class ManagedImage:
    name: str
    os_type: str
    os_family: str
    format: str
    files: Mapping[str, ImageFile]
    source: str
    version: str = ""
    architectures: tuple[str, ...] = ("x86_64",)
    state: str = "available"
    idcs: tuple[str, ...] = ()
    disk_size: int = 0
    kernel_args: str = ""
    description: str = ""
    created_at: float = 0.0
    created_by: str = ""

    # -- what it is
    @property
    def installer(self) -> bool:
        return self.format == "installer"

    @property
    def file_roles(self) -> tuple[str, ...]:
        return INSTALLER_ROLES if self.installer else DISK_ROLES

    @property
    def offered(self) -> bool:
        """Whether nodes fetch it (every file is in)."""
        return self.state == "available"

    @property
    def sha256(self) -> str:
        """The digest a node's copy reports: the disk image's, or the
        kernel's for an installer."""
        main = self.files.get(self.file_roles[0])
        return main.sha256 if main else ""

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files.values())

    def wanted_in(self, idc: str) -> bool:
        """Whether ``idc``'s nodes should hold it (no ``idcs``: every IDC)."""
        return not self.idcs or idc in self.idcs

    # -- as a catalog entry
    def _image(self, paths: Mapping[str, str]) -> Image:
        disk = self.files.get("disk_image")
        return Image(
            name=self.name, os_type=self.os_type, os_family=self.os_family,
            version=self.version, arch=self.architectures[0],
            mode="installer" if self.installer else "image",
            kernel=paths.get("kernel", ""), initrd=paths.get("initrd", ""),
            disk_image=paths.get("disk_image", ""),
            sha256=disk.sha256 if disk else "", size=self.size,
            kernel_args=self.kernel_args, description=self.description,
            format="" if self.installer else self.format, disk_size=self.disk_size,
            managed=True)

    def catalog_image(self, paths: Mapping[str, str]) -> Image:
        """The entry a node serves once each role's verified file is at
        ``paths[role]`` (an absolute path in its cache)."""
        missing = [role for role in self.file_roles if not paths.get(role)]
        if missing:
            raise ValueError(f"{self.name}: no local file for {', '.join(missing)}")
        return self._image(paths)

    def catalog_entry(self) -> Image:
        """The entry the control plane resolves tasks against (files by
        their source URL: the control plane never serves them to machines)."""
        return self._image({role: f.url for role, f in self.files.items()})

    # -- records
    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["files"] = {role: f.to_dict() for role, f in self.files.items()}
        out["architectures"] = list(self.architectures)
        out["idcs"] = list(self.idcs)
        return out

    def public(self) -> dict[str, Any]:
        """What the API shows (the record holds no secret; the size and
        sha256 are the top-level summary)."""
        return {**self.to_dict(), "size": self.size, "sha256": self.sha256}

    def to_json(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> ManagedImage:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            return _build(data, strict_source=False)
        except (ValueError, TypeError, KeyError) as exc:
            raise ImageRecordError(f"bad image record: {exc}") from None

    def with_file(self, role: str, file: ImageFile) -> ManagedImage:
        files = {**self.files, role: file}
        done = all(r in files and files[r].url and files[r].sha256 for r in self.file_roles)
        return replace(self, files=files, state="available" if done else "uploading")


@dataclass(frozen=True)
class NodeImageState:
    """One regional node's copy of a managed image."""

    name: str
    sha256: str
    state: str
    bytes: int = 0
    total: int = 0
    reason: str = ""
    updated_at: float = field(default=0.0)

    @property
    def progress(self) -> float:
        if self.state == "ready":
            return 1.0
        return min(1.0, self.bytes / self.total) if self.total > 0 else 0.0

    def describe(self, node: str) -> str:
        """``fetching on node n1, 42 %``, ``ready on node n1``,
        ``failed on node n1: <reason>``."""
        if self.state == "fetching":
            return f"fetching on node {node}, {int(self.progress * 100)} %"
        if self.state == "failed":
            return f"failed on node {node}: {self.reason or 'no reason given'}"
        return f"{self.state} on node {node}"

    def to_json(self) -> builtins.bytes:
        return json.dumps(asdict(self), separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: builtins.bytes) -> NodeImageState:
        try:
            data = json.loads(raw)
            if not isinstance(data, dict):
                raise TypeError("not an object")
            state = cls(name=str(data["name"]), sha256=str(data.get("sha256", "")),
                        state=str(data["state"]), bytes=int(data.get("bytes", 0)),
                        total=int(data.get("total", 0)), reason=str(data.get("reason", "")),
                        updated_at=float(data.get("updated_at", 0.0)))
        except (ValueError, TypeError, KeyError) as exc:
            raise ImageRecordError(f"bad node image state: {exc}") from None
        if state.state not in NODE_STATES:
            raise ImageRecordError(f"bad node image state: state {state.state!r}")
        return state


# -- the add request ----------------------------------------------------------------

def parse_add_request(body: Any, *, user: str = "", now: float | None = None) -> ManagedImage:
    """A new image from an API body, or :class:`ValidationError` naming the
    field.  ``source`` ``url``: ``files`` give each role's http(s) URL and
    sha256 (required), so the record is available at once.  ``upload``:
    ``files`` may give the expected sha256 and size of each role; the record
    waits in ``uploading`` until each file is sent."""
    if not isinstance(body, dict):
        raise ValidationError("body", "a JSON object expected")
    allowed = {"name", "os_type", "os_family", "version", "architectures", "format",
               "files", "source", "idcs", "disk_size", "kernel_args", "description"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise ValidationError(unknown[0], f"unknown field; allowed: {', '.join(sorted(allowed))}")
    data = dict(body)
    data["state"] = "available" if data.get("source") == "url" else "uploading"
    data["created_at"] = time.time() if now is None else now
    data["created_by"] = user
    img = _build(data, strict_source=True)
    if img.source == "upload":
        img = replace(img, files={role: ImageFile(url="", sha256=f.sha256, size=f.size)
                                   for role, f in img.files.items()})
    return img


def _text(data: Mapping[str, Any], name: str, *, required: bool = False,
          limit: int = MAX_TEXT) -> str:
    value = data.get(name, "")
    if not isinstance(value, str):
        raise ValidationError(name, "a string expected")
    value = value.strip()
    if required and not value:
        raise ValidationError(name, "required")
    if len(value) > limit:
        raise ValidationError(name, f"at most {limit} characters")
    if _CONTROL_RE.search(value):
        raise ValidationError(name, "control characters are not allowed")
    return value


def _int(data: Mapping[str, Any], name: str, *, limit: int = MAX_SIZE, where: str = "") -> int:
    value = data.get(name, 0)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= limit:
        raise ValidationError(where or name, f"an integer from 0 to {limit} expected")
    return value


def _names(data: Mapping[str, Any], name: str, pattern: re.Pattern[str], allowed: tuple[str, ...]
           | None, default: tuple[str, ...]) -> tuple[str, ...]:
    value = data.get(name, list(default))
    if not isinstance(value, list) or len(value) > MAX_IDCS or \
            not all(isinstance(v, str) for v in value):
        raise ValidationError(name, "a list of names expected")
    out: list[str] = []
    for v in value:
        if allowed is not None and v not in allowed:
            raise ValidationError(name, f"{v!r} is not one of {', '.join(allowed)}")
        if not pattern.fullmatch(v):
            raise ValidationError(name, f"{v!r} is not a valid name")
        if v not in out:
            out.append(v)
    return tuple(out)


def _build(data: Mapping[str, Any], *, strict_source: bool) -> ManagedImage:
    name = _text(data, "name", required=True, limit=64)
    if not NAME_RE.fullmatch(name):
        raise ValidationError("name", "1-64 of a-z, 0-9, '.', '_', '-', starting with a letter "
                                      "or digit")
    fmt = _text(data, "format") or "raw"
    if fmt not in FORMATS:
        raise ValidationError("format", f"one of {', '.join(FORMATS)}")
    family = _text(data, "os_family", required=True)
    if family not in FAMILIES:
        raise ValidationError("os_family", f"one of {', '.join(FAMILIES)}")
    source = _text(data, "source", required=True)
    if source not in SOURCES:
        raise ValidationError("source", f"one of {', '.join(SOURCES)}")
    state = _text(data, "state") or "available"
    if state not in RECORD_STATES:
        raise ValidationError("state", f"one of {', '.join(RECORD_STATES)}")
    archs = _names(data, "architectures", re.compile(r"[a-z0-9_]+"), ARCHITECTURES, ("x86_64",))
    if not archs:
        raise ValidationError("architectures", "at least one")
    idcs = _names(data, "idcs", _IDC_RE, None, ())
    roles = INSTALLER_ROLES if fmt == "installer" else DISK_ROLES
    raw_files = data.get("files", {})
    if not isinstance(raw_files, dict):
        raise ValidationError("files", f"an object with {', '.join(roles)}")
    extra = sorted(set(raw_files) - set(roles))
    if extra:
        raise ValidationError("files", f"{extra[0]!r} is not a file of a {fmt} image; "
                                       f"expected {', '.join(roles)}")
    files: dict[str, ImageFile] = {}
    for role in roles:
        entry = raw_files.get(role)
        if entry is None:
            if source == "url" or not strict_source:
                if source == "url" or state == "available":
                    raise ValidationError(f"files.{role}", "required")
                continue
            entry = {}
        if not isinstance(entry, dict):
            raise ValidationError(f"files.{role}", "an object with url, sha256, size expected")
        files[role] = _file(entry, f"files.{role}", source=source,
                            need_url=source == "url" or state == "available")
    return ManagedImage(
        name=name, os_type=_text(data, "os_type", required=True), os_family=family,
        format=fmt, files=files, source=source, version=_text(data, "version", limit=32),
        architectures=archs, state=state, idcs=idcs, disk_size=_int(data, "disk_size"),
        kernel_args=_text(data, "kernel_args", limit=MAX_DESCRIPTION),
        description=_text(data, "description", limit=MAX_DESCRIPTION),
        created_at=float(data.get("created_at", 0.0) or 0.0),
        created_by=_text(data, "created_by", limit=64))


def _file(entry: Mapping[str, Any], where: str, *, source: str, need_url: bool) -> ImageFile:
    unknown = sorted(set(entry) - {"url", "sha256", "size"})
    if unknown:
        raise ValidationError(f"{where}.{unknown[0]}", "unknown field; allowed: url, sha256, size")
    url = _text(entry, "url", limit=MAX_URL)
    sha = _text(entry, "sha256").lower()
    size = _int(entry, "size", where=f"{where}.size")
    if need_url:
        if not url:
            raise ValidationError(f"{where}.url", "required")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValidationError(f"{where}.url", "an http:// or https:// URL expected")
    if sha and not _SHA_RE.fullmatch(sha):
        raise ValidationError(f"{where}.sha256", "64 hex digits expected")
    if source == "url" and not sha:
        raise ValidationError(f"{where}.sha256", "required for a URL source (the nodes verify "
                                                "the bytes against it)")
    return ImageFile(url=url, sha256=sha, size=size)
