"""decide_bootfile as a table: every architecture row, client kind and refusal."""

from __future__ import annotations

import pytest

from bootsvc.dhcp.settings import SETTINGS, policy_from_config
from bootsvc.policy.bootfile import (
    BootAnswer,
    BootPolicy,
    BootRefusal,
    ClientInfo,
    decide_bootfile,
    parse_bootfile,
)
from bootsvc.wire import dhcp
from lpmos.config import Config

BASE = "http://10.77.0.1:8081"
POLICY = BootPolicy(
    bootfiles={"bios": "undionly.kpxe", "efi32": None, "efi64": "ipxe.efi", "arm64": None},
    script_url=f"{BASE}/boot.ipxe", http_base=f"{BASE}/ipxe")
ARM = BootPolicy(bootfiles={**POLICY.bootfiles, "arm64": "arm64/ipxe.efi"},
                 script_url=POLICY.script_url, http_base=POLICY.http_base)
IA32 = BootPolicy(bootfiles={**POLICY.bootfiles, "efi32": "i386/ipxe.efi"},
                  script_url=POLICY.script_url, http_base=POLICY.http_base)
SNP = BootPolicy(bootfiles={**POLICY.bootfiles, "efi64": "snponly.efi"},
                 script_url=POLICY.script_url, http_base=POLICY.http_base)
NO_URL = BootPolicy(bootfiles=POLICY.bootfiles)
SHIM = BootPolicy(bootfiles={**POLICY.bootfiles, "efi64": "shimx64.efi"},
                  script_url=POLICY.script_url, http_base=POLICY.http_base)
#: arm64 as the lab boots it: Debian's signed GRUB for arm64
GRUB_ARM = BootPolicy(bootfiles={**SHIM.bootfiles, "arm64": "grubaa64.efi"},
                      script_url=POLICY.script_url, http_base=POLICY.http_base)

PXE = b"PXEClient:Arch:00000:UNDI:002001"
HTTP = b"HTTPClient:Arch:00016:UNDI:003001"

# (arch, vendor class, user class, option 175, policy) -> (kind, filename) | refusal reason
TABLE = [
    # PXE ROMs
    (0, PXE, None, False, POLICY, ("tftp", "undionly.kpxe")),
    (6, PXE, None, False, POLICY, "no_bootfile"),       # ipxe.efi is x86-64: it cannot run
    (6, PXE, None, False, SNP, "no_bootfile"),
    (6, PXE, None, False, IA32, ("tftp", "i386/ipxe.efi")),
    (7, PXE, None, False, IA32, ("tftp", "ipxe.efi")),
    (7, PXE, None, False, POLICY, ("tftp", "ipxe.efi")),
    (9, PXE, None, False, POLICY, ("tftp", "ipxe.efi")),
    (7, PXE, None, False, SNP, ("tftp", "snponly.efi")),
    (9, PXE, None, False, SNP, ("tftp", "snponly.efi")),
    (11, PXE, None, False, POLICY, "no_bootfile"),
    (11, PXE, None, False, ARM, ("tftp", "arm64/ipxe.efi")),
    (10, PXE, None, False, POLICY, "unsupported_arch"),
    (2, PXE, None, False, POLICY, "unsupported_arch"),
    (None, PXE, None, False, POLICY, "missing_arch"),
    # UEFI HTTP boot
    (16, HTTP, None, False, POLICY, ("http", f"{BASE}/ipxe/ipxe.efi")),
    (15, HTTP, None, False, POLICY, "no_bootfile"),
    (15, HTTP, None, False, IA32, ("http", f"{BASE}/ipxe/i386/ipxe.efi")),
    (16, HTTP, None, False, IA32, ("http", f"{BASE}/ipxe/ipxe.efi")),
    (15, PXE, None, False, IA32, "arch_class_mismatch"),
    (6, HTTP, None, False, IA32, "arch_class_mismatch"),
    (16, HTTP, None, False, SNP, ("http", f"{BASE}/ipxe/snponly.efi")),
    (19, HTTP, None, False, POLICY, "no_bootfile"),
    (19, HTTP, None, False, ARM, ("http", f"{BASE}/ipxe/arm64/ipxe.efi")),
    (16, PXE, None, False, POLICY, "arch_class_mismatch"),
    (7, HTTP, None, False, POLICY, "arch_class_mismatch"),
    (16, HTTP, None, False, NO_URL, "no_script_url"),
    # Secure Boot: shim (then Debian's signed GRUB) over TFTP, never over HTTP boot
    (7, PXE, None, False, SHIM, ("tftp", "shimx64.efi")),
    (9, PXE, None, False, SHIM, ("tftp", "shimx64.efi")),
    (0, PXE, None, False, SHIM, ("tftp", "undionly.kpxe")),
    (16, HTTP, None, False, SHIM, "grub_over_http"),
    # arm64: Debian's signed GRUB for arm64 (no arm64 iPXE in Debian), TFTP only
    (11, PXE, None, False, GRUB_ARM, ("tftp", "grubaa64.efi")),
    (19, HTTP, None, False, GRUB_ARM, "grub_over_http"),
    (9, PXE, None, False, GRUB_ARM, ("tftp", "shimx64.efi")),
    (10, PXE, None, False, GRUB_ARM, "unsupported_arch"),      # 32-bit ARM
    (7, PXE, b"iPXE", False, SHIM, ("script", f"{BASE}/boot.ipxe")),
    # iPXE already running: the script, never the binary again
    (0, PXE, b"iPXE", False, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (7, PXE, b"iPXE", False, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (9, PXE, None, True, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (11, PXE, b"iPXE", False, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (6, PXE, b"iPXE", False, POLICY, ("script", f"{BASE}/boot.ipxe")),  # a 32-bit iPXE runs
    (16, HTTP, b"iPXE", True, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (7, PXE, b"\x04iPXE", False, POLICY, ("script", f"{BASE}/boot.ipxe")),
    (7, PXE, b"gPXE", False, POLICY, ("tftp", "ipxe.efi")),
    (7, PXE, b"iPXE", False, NO_URL, "no_script_url"),
    # not boot clients
    (7, b"", None, False, POLICY, "not_boot_client"),
    (7, b"udhcp 1.36.1", None, False, POLICY, "not_boot_client"),
    (0, b"MSFT 5.0", b"iPXE", True, POLICY, "not_boot_client"),
    (7, b"pxeclient", None, False, POLICY, "not_boot_client"),
]


@pytest.mark.parametrize(("arch", "vc", "uc", "o175", "policy", "expected"), TABLE)
def test_decide_boot_table(arch: int | None, vc: bytes, uc: bytes | None, o175: bool,
                           policy: BootPolicy, expected: object) -> None:
    decision = decide_bootfile(ClientInfo(arch, vc, uc, o175), policy)
    if isinstance(expected, str):
        assert isinstance(decision, BootRefusal), decision
        assert decision.reason == expected
    else:
        assert isinstance(decision, BootAnswer), decision
        assert (decision.kind, decision.filename) == expected
        assert decision.vendor_class == ("HTTPClient" if vc.startswith(b"HTTP") else "PXEClient")


def _default_config() -> Config:
    return Config({s.key: s.parse(s.default) for s in SETTINGS}, {})


@pytest.mark.parametrize(("arch", "vc"), [(6, PXE), (15, HTTP)])
def test_ia32_uefi_refused_with_the_default_settings(arch: int, vc: bytes) -> None:
    """Debian ships no 32-bit UEFI iPXE: out of the box an IA32 client gets
    no answer rather than the x86-64 ipxe.efi it cannot run."""
    for policy in (policy_from_config(_default_config(), BASE), BootPolicy()):
        decision = decide_bootfile(ClientInfo(arch, vc), policy)
        assert isinstance(decision, BootRefusal), decision
        assert decision.reason == "no_bootfile" and "efi32" in decision.detail


def test_efi32_setting_configures_ia32() -> None:
    config = _default_config().with_values(dhcp__bootfile_efi32="i386/ipxe.efi")
    decision = decide_bootfile(ClientInfo(6, PXE), policy_from_config(config, BASE))
    assert isinstance(decision, BootAnswer) and decision.filename == "i386/ipxe.efi"


def test_ipxe_never_gets_an_ipxe_binary() -> None:
    for arch in (0, 6, 7, 9, 11, 15, 16, 19):
        for vc in (PXE, HTTP):
            decision = decide_bootfile(ClientInfo(arch, vc, b"iPXE", True), ARM)
            assert isinstance(decision, BootAnswer)
            assert decision.filename == ARM.script_url


def test_client_info_from_packet() -> None:
    pkt = dhcp.parse_packet(dhcp.build_request("52:54:00:00:00:01", arch=9, user_class=b"iPXE",
                                               extra={175: b"\x13\x01\x01"}))
    info = ClientInfo.from_packet(pkt)
    assert info.arch == 9 and info.is_ipxe and info.ipxe_options
    assert info.vendor_class.startswith(b"PXEClient")


@pytest.mark.parametrize("raw", ["ipxe.efi", "arm64/ipxe.efi", "snponly.efi", "undionly.kpxe"])
def test_parse_bootfile_accepts(raw: str) -> None:
    assert parse_bootfile(raw) == raw


@pytest.mark.parametrize("raw", ["none", "", "NONE", None])
def test_parse_bootfile_none(raw: object) -> None:
    assert parse_bootfile(raw) is None


@pytest.mark.parametrize("raw", ["../etc/passwd", "/abs.efi", "a b.efi", "x/../y", "a\nb",
                                 "a" * 200, "dir/", "-rf"])
def test_parse_bootfile_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_bootfile(raw)
