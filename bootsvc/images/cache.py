"""The node's image cache directory (``--image-cache``, default
``STATE_DIR/images``): one directory per managed image name.

    {cache}/{name}/disk.raw                  verified files, served as
    {cache}/{name}/kernel, initrd            /images/{name}/{file}
    {cache}/{name}/{role}.{sha:16}.part      a download in progress (resumed
                                             by Range after a restart)
    {cache}/{name}/meta.json                 {"verified": {role: {"sha256",
                                             "file", "size"}}, "last_used",
                                             "record": the record verified}

A file is moved into place (``os.replace``) only after its sha256 (and
size) checked, and ``meta.json`` is rewritten atomically after that, so a
node killed at any point comes back with either a verified file listed in
``meta.json`` or a ``.part`` to resume.  On start the node trusts a listed
file whose size still matches (it does not re-hash gigabytes); a file not
listed, or of another size, is no copy and is deleted before it is fetched
again.  Nothing outside a directory named like an image is touched.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bootsvc.policy.images import LocalCopy
from lpmos.images import NAME_RE, ImageRecordError, ManagedImage

log = logging.getLogger(__name__)

META = "meta.json"


def file_name(record: ManagedImage, role: str) -> str:
    """The name a verified file of ``record`` is kept (and served) under."""
    if role == "disk_image":
        return f"disk.{record.format}"
    return role


class ImageCache:
    """The cache directory; safe to call from several threads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def dir(self, name: str) -> Path:
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"not an image name: {name!r}")
        return self.root / name

    def part_path(self, name: str, role: str, sha256: str) -> Path:
        return self.dir(name) / f"{role}.{sha256[:16]}.part"

    def final_path(self, record: ManagedImage, role: str) -> Path:
        return self.dir(record.name) / file_name(record, role)

    # -- reading
    def _meta(self, name: str) -> dict[str, Any]:
        try:
            data = json.loads((self.dir(name) / META).read_text())
        except (OSError, ValueError):
            return {"verified": {}, "last_used": 0.0}
        if not isinstance(data, dict) or not isinstance(data.get("verified"), dict):
            return {"verified": {}, "last_used": 0.0}
        return data

    def copy(self, name: str) -> LocalCopy | None:
        """What the directory of ``name`` holds (None: nothing)."""
        folder = self.dir(name)
        if not folder.is_dir():
            return None
        meta = self._meta(name)
        verified: dict[str, str] = {}
        for role, entry in meta["verified"].items():
            try:
                if (folder / str(entry["file"])).stat().st_size == int(entry["size"]):
                    verified[str(role)] = str(entry["sha256"])
            except (OSError, KeyError, TypeError, ValueError):
                continue
        total = 0
        for path in folder.iterdir():
            with contextlib.suppress(OSError):
                if path.is_file() and path.name != META:
                    total += path.stat().st_size
        try:
            last_used = float(meta.get("last_used", 0.0))
        except (TypeError, ValueError):
            last_used = 0.0
        return LocalCopy(name, verified, total, last_used)

    def scan(self) -> dict[str, LocalCopy]:
        """Every image directory's copy."""
        out: dict[str, LocalCopy] = {}
        with contextlib.suppress(OSError):
            for path in sorted(self.root.iterdir()):
                if path.is_dir() and NAME_RE.fullmatch(path.name):
                    found = self.copy(path.name)
                    if found is not None:
                        out[path.name] = found
        return out

    def records(self) -> dict[str, ManagedImage]:
        """The records of the copies, as they were when last verified (what
        a node serves until etcd answers: the records are etcd's)."""
        out: dict[str, ManagedImage] = {}
        with contextlib.suppress(OSError):
            for path in sorted(self.root.iterdir()):
                if not (path.is_dir() and NAME_RE.fullmatch(path.name)):
                    continue
                raw = self._meta(path.name).get("record")
                if not isinstance(raw, dict):
                    continue
                try:
                    rec = ManagedImage.from_json(json.dumps(raw).encode())
                except ImageRecordError:
                    continue
                if rec.name == path.name:
                    out[rec.name] = rec
        return out

    def paths(self, record: ManagedImage) -> dict[str, str]:
        """Each role's verified file (absolute path), for the catalog."""
        return {role: str(self.final_path(record, role).resolve()) for role in record.file_roles}

    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.scan().values())

    # -- writing
    def _write_meta(self, name: str, meta: Mapping[str, Any]) -> None:
        folder = self.dir(name)
        tmp = folder / (META + ".tmp")
        with tmp.open("w") as fh:
            json.dump(meta, fh, separators=(",", ":"))
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, folder / META)

    def prepare(self, record: ManagedImage, role: str) -> Path:
        """The part file to download ``role`` of ``record`` into (its folder
        made); every other part of that role (another digest) and a final
        file not listed as verified are deleted first."""
        folder = self.dir(record.name)
        folder.mkdir(parents=True, exist_ok=True)
        sha = record.files[role].sha256
        part = self.part_path(record.name, role, sha)
        for path in folder.glob(f"{role}.*.part"):
            if path != part:
                path.unlink(missing_ok=True)
        with self._lock:
            listed = self._meta(record.name)["verified"].get(role)
        final = self.final_path(record, role)
        if listed is None or listed.get("sha256") != sha:
            final.unlink(missing_ok=True)
        return part

    def commit(self, record: ManagedImage, role: str, part: Path) -> Path:
        """Move a verified part into place and list it in ``meta.json``
        (with the record, so a node started while etcd is down serves it)."""
        final = self.final_path(record, role)
        os.replace(part, final)
        with self._lock:
            meta = self._meta(record.name)
            meta["verified"][role] = {"sha256": record.files[role].sha256,
                                      "file": final.name, "size": final.stat().st_size}
            meta["record"] = record.to_dict()
            self._write_meta(record.name, meta)
        with contextlib.suppress(OSError):
            fd = os.open(self.dir(record.name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        return final

    def touch(self, name: str, when: float) -> None:
        """Record that ``name`` was used at ``when`` (the LRU order)."""
        with self._lock:
            if not self.dir(name).is_dir():
                return
            meta = self._meta(name)
            if float(meta.get("last_used", 0.0) or 0.0) >= when:
                return
            meta["last_used"] = when
            self._write_meta(name, meta)

    def remove(self, name: str) -> int:
        """Delete everything of ``name``; the bytes freed."""
        found = self.copy(name)
        with self._lock:
            shutil.rmtree(self.dir(name), ignore_errors=True)
        return found.bytes if found is not None else 0
