"""What a network-booting client gets: one pure decision, tested as a table.

:func:`decide_bootfile` takes what the client said about itself
(:class:`ClientInfo`: option 93 architecture, option 60 vendor class,
option 77 user class, option 175 presence) and the node's
:class:`BootPolicy` (a boot file per architecture family, the boot script
URL, the base URL of the iPXE binaries over HTTP) and returns either a
:class:`BootAnswer` or a :class:`BootRefusal` whose ``reason`` is a bounded
token (a metric label).

Rules, in order:

1. only boot clients: option 60 starting with ``PXEClient`` or
   ``HTTPClient``; anything else → ``not_boot_client``;
2. a client already running iPXE (user class ``iPXE`` or option 175
   present) → the boot script URL, never the iPXE binary again (this is
   what breaks the chainload loop);
3. the architecture (RFC 4578 / IANA "Processor Architecture Types") picks
   the family: 0 → bios; 6 → efi32; 7, 9 → efi64; 11 → arm64;
   15, 16, 19 → efi32, efi64, arm64 over UEFI HTTP boot;
4. UEFI HTTP boot types need ``HTTPClient`` and get
   ``{http_base}/{file}``; PXE types need ``PXEClient`` and get the TFTP
   file name; a mismatch is refused (``arch_class_mismatch``);
5. a family whose boot file is not configured is refused (``no_bootfile``):
   arm64 and efi32 by default, since Debian ships iPXE for BIOS and x86-64
   UEFI only, and 32-bit UEFI firmware cannot run the x86-64 ``ipxe.efi``
   (arm64 boots Debian's signed GRUB, ``--dhcp-bootfile-arm64 grubaa64.efi``);
6. shim and GRUB (:data:`GRUB_LOADERS`, the Secure Boot chain) are never
   offered over UEFI HTTP boot (``grub_over_http``): Debian 12's signed GRUB
   has no HTTP client under Secure Boot, so it would stop at its prompt.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from bootsvc.wire import dhcp

# --- architecture types (RFC 4578 section 2.1, IANA registry) -------------------

ARCH_BIOS = 0
ARCH_EFI_IA32 = 6
ARCH_EFI_BC = 7           # "EFI BC", used by x86-64 firmware
ARCH_EFI_X64 = 9
ARCH_EFI_ARM32 = 10
ARCH_EFI_ARM64 = 11
ARCH_HTTP_IA32 = 15
ARCH_HTTP_X64 = 16
ARCH_HTTP_ARM64 = 19

FAMILIES = ("bios", "efi32", "efi64", "arm64")

#: arch type → (family, over HTTP?)
ARCHITECTURES: dict[int, tuple[str, bool]] = {
    ARCH_BIOS: ("bios", False),
    ARCH_EFI_IA32: ("efi32", False),
    ARCH_EFI_BC: ("efi64", False),
    ARCH_EFI_X64: ("efi64", False),
    ARCH_EFI_ARM64: ("arm64", False),
    ARCH_HTTP_IA32: ("efi32", True),
    ARCH_HTTP_X64: ("efi64", True),
    ARCH_HTTP_ARM64: ("arm64", True),
}

#: boot files that start Debian's signed GRUB (through shim on x86-64;
#: ``grubaa64.efi`` directly on arm64): TFTP only
GRUB_LOADERS = frozenset({"shimx64.efi", "grubx64.efi", "grubaa64.efi"})

PXE_CLIENT = "PXEClient"
HTTP_CLIENT = "HTTPClient"

#: what a configured boot file may look like: a relative path under the
#: TFTP root, no traversal, no spaces or control characters
_BOOTFILE_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")


def parse_bootfile(raw: object) -> str | None:
    """Setting parser: a boot file name under the TFTP root, or ``none``."""
    text = str(raw).strip() if raw is not None else ""
    if text.lower() in ("", "none", "off"):
        return None
    if len(text) > 120 or not _BOOTFILE_RE.fullmatch(text) or ".." in text.split("/"):
        raise ValueError("a file name under the TFTP root such as ipxe.efi, or none")
    return text


@dataclass(frozen=True, slots=True)
class ClientInfo:
    """What a client told us about itself in its DHCP request."""

    arch: int | None = None
    vendor_class: bytes = b""
    user_class: bytes | None = None
    ipxe_options: bool = False        # option 175 present

    @classmethod
    def from_packet(cls, packet: dhcp.DhcpPacket) -> ClientInfo:
        opts = packet.options
        return cls(packet.client_arch, opts.get(dhcp.OPT_VENDOR_CLASS, b""),
                   opts.get(dhcp.OPT_USER_CLASS), dhcp.OPT_IPXE in opts)

    @property
    def is_ipxe(self) -> bool:
        if self.ipxe_options:
            return True
        return self.user_class is not None and b"iPXE" in dhcp.user_class_items(self.user_class)


@dataclass(frozen=True, slots=True)
class BootPolicy:
    """The node's boot configuration.

    ``bootfiles`` maps a family (``bios``, ``efi32``, ``efi64``, ``arm64``)
    to a file under the TFTP root, or ``None`` for "do not answer".
    ``script_url`` is the iPXE boot script (``{advertise_url}/boot.ipxe``);
    ``http_base`` is where the iPXE binaries are served over HTTP
    (``{advertise_url}/ipxe``).
    """

    bootfiles: Mapping[str, str | None] = field(default_factory=lambda: {
        "bios": "undionly.kpxe", "efi32": None, "efi64": "ipxe.efi", "arm64": None})
    script_url: str = ""
    http_base: str = ""


@dataclass(frozen=True, slots=True)
class BootAnswer:
    """Boot the client with ``filename``.

    ``kind``: ``tftp`` (a file under the TFTP root), ``http`` (the URL of an
    iPXE binary, UEFI HTTP boot) or ``script`` (the iPXE boot script URL).
    ``vendor_class`` is what the answer's option 60 must say.
    """

    kind: Literal["tftp", "http", "script"]
    filename: str
    vendor_class: str
    family: str
    arch: int | None


@dataclass(frozen=True, slots=True)
class BootRefusal:
    """No boot answer; ``reason`` is a bounded token, ``detail`` for logs."""

    reason: str
    detail: str = ""


BootfileDecision = BootAnswer | BootRefusal


def decide_bootfile(client: ClientInfo, policy: BootPolicy) -> BootfileDecision:
    """Choose the boot answer for ``client`` (see the module docstring)."""
    vc = client.vendor_class
    if vc.startswith(b"PXEClient"):
        klass = PXE_CLIENT
    elif vc.startswith(b"HTTPClient"):
        klass = HTTP_CLIENT
    else:
        return BootRefusal("not_boot_client", f"vendor class {vc[:32]!r}")
    arch = client.arch
    family = ARCHITECTURES.get(arch, ("", False))[0] if arch is not None else ""
    if client.is_ipxe:
        if not policy.script_url:
            return BootRefusal("no_script_url", "no advertise URL configured for iPXE clients")
        return BootAnswer("script", policy.script_url, klass, family, arch)
    if arch is None:
        return BootRefusal("missing_arch", "no option 93")
    entry = ARCHITECTURES.get(arch)
    if entry is None:
        return BootRefusal("unsupported_arch", f"architecture type {arch}")
    family, over_http = entry
    if over_http != (klass == HTTP_CLIENT):
        return BootRefusal("arch_class_mismatch", f"architecture {arch} with {klass}")
    filename = policy.bootfiles.get(family)
    if not filename:
        return BootRefusal("no_bootfile", f"no boot file configured for {family}")
    if over_http:
        if filename in GRUB_LOADERS:
            return BootRefusal("grub_over_http",
                               f"{filename} (GRUB) cannot boot over HTTP: no HTTP client in "
                               "Debian's signed GRUB")
        if not policy.http_base:
            return BootRefusal("no_script_url", "no advertise URL configured for HTTP boot")
        return BootAnswer("http", f"{policy.http_base.rstrip('/')}/{filename}", klass, family,
                          arch)
    return BootAnswer("tftp", filename, klass, family, arch)
