"""The image catalog (``images/catalog.toml``): what can be installed.

Each ``[[image]]`` entry:

| field        | meaning                                                        |
| ------------ | -------------------------------------------------------------- |
| name         | unique id, used in tasks (``image``) and URLs                  |
| os_type      | what operators type, e.g. ``Ubuntu 22.04`` (matched case-blind)|
| os_family    | ``ubuntu`` / ``debian`` / ``rhel`` / ``lab`` — picks templates |
| version      | e.g. ``22.04``                                                 |
| arch         | ``x86_64`` or ``arm64``                                        |
| mode         | ``image`` (agent streams ``disk_image``) or ``installer``      |
| kernel, initrd, disk_image | paths relative to the image root, or URLs        |
| sha256       | of ``disk_image`` as published (image mode)                    |
| format       | of ``disk_image``: ``raw``, ``qcow2``, ``raw.zst``, ``raw.xz``, |
|              | ``raw.gz``; inferred from its suffix when empty (else raw)     |
| disk_size    | bytes of the virtual disk (optional; lets the agent refuse a   |
|              | too small disk before writing a compressed raw image)          |
| sha256_file  | a file holding that checksum (written by the image build), read |
|              | at load time when ``sha256`` is empty                          |
| kernel_args  | default kernel arguments (installer mode)                      |
| role         | ``install`` (default): a task may install it; ``live``: the    |
|              | live agent image machines boot for discovery and image-mode    |
|              | installs, never a task's target (kernel and initrd required)   |

:func:`load_catalog` validates the file; :meth:`Catalog.check_files` reports
missing files and wrong checksums by name.

:attr:`Image.installable` is the one place that says whether a task may ask
for an entry; :meth:`Catalog.resolve` (every task and template the control
plane accepts) refuses the others by name, :meth:`Catalog.installable` is
what the API and the console offer, and the boot decision waits on such a
task (``bootsvc.policy.script``) until the node's reaper fails it.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

from lpmos.models import ValidationError

FAMILIES = ("ubuntu", "debian", "rhel", "lab")
MODES = ("image", "installer")

#: The architectures an image can be built for.
ARCHES = ("x86_64", "arm64")

#: What machines and firmware call their architecture (iPXE's ``${buildarch}``,
#: Python's ``platform.machine()`` in the agent's inventory, Debian's names)
#: → the catalog's name.  A BIOS machine's undionly.kpxe is an i386 build of
#: iPXE on an x86_64 machine: the same family.
ARCH_FAMILIES = {"x86_64": "x86_64", "amd64": "x86_64", "i386": "x86_64", "i686": "x86_64",
                 "x86": "x86_64", "arm64": "arm64", "aarch64": "arm64"}


def arch_family(name: str) -> str:
    """The catalog architecture of a machine's ``name`` for its
    architecture ("" when unknown or not one we know)."""
    return ARCH_FAMILIES.get(name.strip().lower(), "")
ROLES = ("install", "live")
DISK_FORMATS = ("raw", "qcow2", "raw.zst", "raw.xz", "raw.gz")
FORMAT_SUFFIXES = ((".qcow2", "qcow2"), (".zst", "raw.zst"), (".xz", "raw.xz"), (".gz", "raw.gz"))
_NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


class CatalogError(ValueError):
    pass


@dataclass(frozen=True)
class Image:
    name: str
    os_type: str
    os_family: str
    version: str = ""
    arch: str = "x86_64"
    mode: str = "image"
    kernel: str = ""
    initrd: str = ""
    disk_image: str = ""
    sha256: str = ""
    sha256_file: str = ""
    size: int = 0
    kernel_args: str = ""
    description: str = ""
    role: str = "install"
    format: str = ""
    disk_size: int = 0
    #: an image an operator added through the API (:mod:`lpmos.images`),
    #: not the seed file; its files are absolute paths in a node's cache
    managed: bool = False

    @property
    def installable(self) -> bool:
        """Whether a task may ask for this entry (``role = "install"``)."""
        return self.role == "install"

    @property
    def not_installable_reason(self) -> str:
        """Why a task may not ask for this entry ("" when it may)."""
        if self.installable:
            return ""
        return (f"{self.name} is the live agent image (role {self.role!r}), which machines "
                f"boot for discovery; it cannot be installed")

    def arch_mismatch(self, machine_arch: str) -> str:
        """Why this image must not go to a machine of ``machine_arch`` (""
        when it may, or when the machine's architecture is not known)."""
        family = arch_family(machine_arch)
        if not family or family == self.arch:
            return ""
        return (f"image {self.name} is built for {self.arch}, and this machine is "
                f"{family} ({machine_arch}): not installed")

    @property
    def disk_format(self) -> str:
        """The format of ``disk_image``: ``format``, else by its suffix
        (``.qcow2``, ``.zst``, ``.xz``, ``.gz``), else raw."""
        return self.format or infer_disk_format(self.disk_image)

    def is_url(self, value: str) -> bool:
        return value.startswith(("http://", "https://"))


@dataclass
class Catalog:
    images: dict[str, Image] = field(default_factory=dict)
    path: Path | None = None

    @property
    def root(self) -> Path:
        return self.path.parent if self.path else Path(".")

    def find(self, os_type: str, os_version: str = "", image: str = "") -> Image | None:
        """The image a task asks for: by ``image`` name, else by os_type
        (and version when given), case-blind."""
        if image:
            return self.images.get(image)
        wanted = os_type.strip().lower()
        for img in self.images.values():
            if wanted in (img.os_type.lower(), img.name) and (
                    not os_version or os_version == img.version):
                return img
        return None

    def with_images(self, extra: Iterable[Image]) -> Catalog:
        """This catalog plus ``extra`` (managed images), as a new catalog; a
        seed entry wins a name both have (the control plane refuses to add
        an image under a seed name, so this only guards a race)."""
        images = dict(self.images)
        for img in extra:
            images.setdefault(img.name, img)
        return Catalog(images, self.path)

    def installable(self) -> list[Image]:
        """The entries a task may ask for, by name: what the API and the
        console offer."""
        return sorted((i for i in self.images.values() if i.installable), key=lambda i: i.name)

    def resolve(self, os_type: str, os_version: str = "", image: str = "") -> Image:
        """The installable image a new task asks for, or :class:`ValidationError`
        naming the field: not in the catalog, or an entry no task may install."""
        found = self.find(os_type, os_version, image)
        field_name = "image" if image else "os_type"
        known = ", ".join(f"{i.os_type} ({i.name})" for i in self.installable()) or "none"
        if found is None:
            raise ValidationError(field_name,
                                  f"not in the image catalog; installable: {known}")
        if not found.installable:
            raise ValidationError(field_name,
                                  f"{found.not_installable_reason}; installable: {known}")
        return found

    def local_path(self, value: str) -> Path | None:
        if not value or value.startswith(("http://", "https://")):
            return None
        return (self.root / value).resolve()

    def check_files(self, *, verify_checksums: bool = True) -> list[str]:
        """Problems with the files the catalog names, one line each."""
        problems = []
        for img in self.images.values():
            for attr in ("kernel", "initrd", "disk_image"):
                value = getattr(img, attr)
                path = self.local_path(value)
                if path is None:
                    continue
                if not path.is_file():
                    problems.append(f"{img.name}: {attr} {value} does not exist")
                elif attr == "disk_image" and img.sha256 and verify_checksums:
                    digest = hashlib.sha256()
                    with path.open("rb") as fh:
                        for chunk in iter(lambda: fh.read(1 << 20), b""):
                            digest.update(chunk)
                    if digest.hexdigest() != img.sha256:
                        problems.append(f"{img.name}: disk_image {value} has sha256 "
                                        f"{digest.hexdigest()}, catalog says {img.sha256}")
        return problems


def infer_disk_format(disk_image: str) -> str:
    """A disk image's format by its file name's suffix; unknown is raw."""
    name = disk_image.rsplit("/", 1)[-1].lower()
    return next((fmt for suffix, fmt in FORMAT_SUFFIXES if name.endswith(suffix)), "raw")


def parse_catalog(data: dict[str, object], path: Path | None = None) -> Catalog:
    entries = data.get("image", [])
    if not isinstance(entries, list):
        raise CatalogError("catalog: [[image]] entries expected")
    images: dict[str, Image] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise CatalogError(f"catalog: image #{i + 1} is not a table")
        unknown = set(entry) - set(Image.__dataclass_fields__) | ({"managed"} & set(entry))
        if unknown:
            raise CatalogError(f"catalog: image #{i + 1} has unknown fields {sorted(unknown)}")
        try:
            img = Image(**entry)
        except TypeError as exc:
            raise CatalogError(f"catalog: image #{i + 1}: {exc}") from None
        where = f"catalog: image {img.name!r}"
        if not _NAME_RE.fullmatch(img.name):
            raise CatalogError(f"{where}: name must be 1-64 of a-z, 0-9, '.', '_', '-'")
        if img.name in images:
            raise CatalogError(f"{where}: duplicate name")
        if img.os_family not in FAMILIES:
            raise CatalogError(f"{where}: os_family must be one of {', '.join(FAMILIES)}")
        if img.mode not in MODES:
            raise CatalogError(f"{where}: mode must be one of {', '.join(MODES)}")
        if img.arch not in ARCHES:
            raise CatalogError(f"{where}: arch must be one of {', '.join(ARCHES)}")
        if img.role not in ROLES:
            raise CatalogError(f"{where}: role must be one of {', '.join(ROLES)}")
        if img.role == "live" and not (img.kernel and img.initrd):
            raise CatalogError(f"{where}: the live image needs kernel and initrd")
        if img.mode == "image" and not img.disk_image:
            raise CatalogError(f"{where}: image mode needs disk_image")
        if img.mode == "installer" and not (img.kernel and img.initrd):
            raise CatalogError(f"{where}: installer mode needs kernel and initrd")
        if img.sha256 and not re.fullmatch(r"[0-9a-f]{64}", img.sha256):
            raise CatalogError(f"{where}: sha256 must be 64 lowercase hex digits")
        if img.format and img.format not in DISK_FORMATS:
            raise CatalogError(f"{where}: format must be one of {', '.join(DISK_FORMATS)}")
        if isinstance(img.disk_size, bool) or not isinstance(img.disk_size, int) \
                or img.disk_size < 0:
            raise CatalogError(f"{where}: disk_size must be a non-negative integer (bytes)")
        if img.format == "raw" and img.disk_size and img.size and img.disk_size != img.size:
            raise CatalogError(f"{where}: a raw image's disk_size is its size")
        if img.sha256_file and not img.sha256:
            img = replace(img, sha256=_read_checksum(path, img.sha256_file))
        images[img.name] = img
    return Catalog(images, path)


def _read_checksum(catalog_path: Path | None, value: str) -> str:
    """The sha256 in a built artifact's checksum file ("" while it is not
    built yet; ``check_files`` then reports the missing image)."""
    root = catalog_path.parent if catalog_path else Path(".")
    try:
        text = (root / value).read_text()[:200].split()
    except OSError:
        return ""
    digest = text[0].lower() if text else ""
    return digest if re.fullmatch(r"[0-9a-f]{64}", digest) else ""


def load_catalog(path: Path) -> Catalog:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise CatalogError(f"catalog: {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise CatalogError(f"catalog: {path}: {exc}") from None
    return parse_catalog(data, path)


def default_catalog_path() -> Path | None:
    """``images/catalog.toml`` of the source tree, when running from one."""
    candidate = Path(__file__).resolve().parent.parent / "images" / "catalog.toml"
    return candidate if candidate.exists() else None
