"""The DHCP service's settings: the flag/env/file table and a typed record of it.

:data:`SETTINGS` is the only place a DHCP setting, its parser and its
default are written; ``lpmos regional`` and the standalone runner merge it
with the node's settings.  :class:`DhcpSettings` is what the code reads:
:meth:`DhcpSettings.from_config` takes every value from a resolved
:class:`lpmos.config.Config` (which holds each key once :data:`SETTINGS` is
part of its table), so no default is repeated at a use site.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from bootsvc.policy.bootfile import FAMILIES, BootPolicy, parse_bootfile
from bootsvc.state.dhcp_leases import parse_range
from lpmos.config import (
    Config,
    ConfigError,
    Setting,
    choice,
    float_range,
    int_range,
    parse_bool,
    parse_ip,
    parse_optional_ip,
    str_list,
)
from lpmos.models import ValidationError, normalize_mac

#: which socket a datagram came in on: the DHCP port (67) or the PXE boot
#: server port (4011)
PortKind = Literal["dhcp", "proxy"]
Mode = Literal["proxy", "full", "off"]

#: the firmware families that each have a boot file setting (``dhcp.bootfile_<family>``)
BOOT_FAMILIES = FAMILIES


def _ip_list(raw: Any) -> list[str]:
    return [parse_ip(x) for x in str_list(raw)]


def _mac_list(raw: Any) -> list[str]:
    try:
        return [normalize_mac(x) for x in str_list(raw)]
    except ValidationError:
        raise ValueError("a comma list of MAC addresses such as 52:54:00:12:34:56") from None


def _netmask(raw: Any) -> str:
    text = parse_ip(raw)
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{text}")
    except ValueError:
        raise ValueError("an IPv4 netmask such as 255.255.255.0") from None
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("dhcp.mode", "--dhcp-mode", "proxy", choice("proxy", "full", "off"),
            "proxy: answer only the boot part next to the site's DHCP server; full: lab mode, "
            "also hand out addresses from --dhcp-range; off: no DHCP"),
    Setting("dhcp.port", "--dhcp-port", 67, int_range(0, 65535),
            "UDP port of the DHCP/ProxyDHCP socket (clients use 67; 0 picks a free port, "
            "for tests)", metavar="PORT"),
    Setting("dhcp.proxy_port", "--dhcp-proxy-port", 4011, int_range(0, 65535),
            "UDP port of the PXE boot server that UEFI firmware and iPXE ask after the "
            "ProxyDHCP offer (clients use 4011; 0 disables it)", metavar="PORT"),
    Setting("dhcp.range", "--dhcp-range", None, parse_range,
            "lab mode: the address pool, FIRST-LAST such as 10.77.0.100-10.77.0.200",
            metavar="A-B"),
    Setting("dhcp.netmask", "--dhcp-netmask", "255.255.255.0", _netmask,
            "lab mode: subnet mask handed out (option 1)", metavar="MASK"),
    Setting("dhcp.router", "--dhcp-router", None, parse_optional_ip,
            "lab mode: default gateway handed out (option 3)", metavar="IP"),
    Setting("dhcp.dns", "--dhcp-dns", [], _ip_list,
            "lab mode: DNS servers handed out (option 6), comma list", metavar="IPS"),
    Setting("dhcp.lease_time", "--dhcp-lease-time", 3600, int_range(60, 7 * 86400),
            "lab mode: lease duration in seconds", metavar="SECONDS"),
    Setting("dhcp.allow_macs", "--dhcp-allow-macs", [], _mac_list,
            "answer only these MACs (comma list); empty answers every MAC", metavar="MACS"),
    Setting("dhcp.known_only", "--dhcp-known-only", False, parse_bool,
            "answer only machines known in etcd (a task or server record with that MAC)",
            metavar="BOOL"),
    Setting("dhcp.relays", "--dhcp-relays", [], _ip_list,
            "DHCP relay agents (giaddr) that may forward requests; packets from any other "
            "giaddr are dropped, and replies never go to an unlisted giaddr", metavar="IPS"),
    Setting("dhcp.bootfile_bios", "--dhcp-bootfile-bios", "undionly.kpxe", parse_bootfile,
            "TFTP boot file for BIOS PXE clients (arch 0); none: do not answer them",
            metavar="FILE"),
    Setting("dhcp.bootfile_efi32", "--dhcp-bootfile-efi32", None, parse_bootfile,
            "boot file for 32-bit UEFI clients (arch 6, HTTP boot 15), an i386 EFI build of "
            "iPXE you put under the TFTP root (the x86-64 ipxe.efi does not run there); "
            "none (default): do not answer them", metavar="FILE"),
    Setting("dhcp.bootfile_efi64", "--dhcp-bootfile-efi64", "ipxe.efi", parse_bootfile,
            "boot file for x86-64 UEFI clients (arch 7, 9; HTTP boot 16), e.g. snponly.efi, or "
            "shimx64.efi for Secure Boot (Debian's signed shim, then GRUB, over TFTP; never "
            "offered to HTTP boot); none: do not answer", metavar="FILE"),
    Setting("dhcp.bootfile_arm64", "--dhcp-bootfile-arm64", None, parse_bootfile,
            "boot file for arm64 UEFI clients (arch 11, HTTP boot 19); none (default): do not "
            "answer them", metavar="FILE"),
    Setting("dhcp.rcvbuf", "--dhcp-rcvbuf", 4 * 1024 * 1024, int_range(65536, 256 * 1024 * 1024),
            "socket receive buffer in bytes (a burst of simultaneous DISCOVERs must fit)",
            metavar="BYTES"),
    Setting("dhcp.max_age", "--dhcp-max-age", 2.0, float_range(0.05, 30.0),
            "seconds a request may have waited in the socket buffer and still be answered; "
            "older ones are dropped unread and counted "
            "(lpmos_dhcp_dropped_total{reason=\"stale\"}): "
            "iPXE waits about 2 s for ProxyDHCP offers and retransmits, a PXE ROM after 4 s, "
            "so a later answer is work for a client that has moved on", metavar="SECONDS"),
)


@dataclass(frozen=True, slots=True)
class DhcpSettings:
    """The resolved ``dhcp.*`` settings (see :data:`SETTINGS` for each one's
    meaning and default).  ``bootfiles`` maps each of :data:`BOOT_FAMILIES`
    to its boot file, or ``None`` for "do not answer that family"."""

    mode: Mode
    port: int
    proxy_port: int
    range: tuple[str, str] | None
    netmask: str
    router: str | None
    dns: tuple[str, ...]
    lease_time: int
    allow_macs: frozenset[str]
    known_only: bool
    relays: frozenset[str]
    bootfiles: Mapping[str, str | None]
    rcvbuf: int
    max_age: float = 2.0

    @classmethod
    def from_config(cls, config: Config) -> DhcpSettings:
        """The record of ``config``'s ``dhcp.*`` values (a ``KeyError`` if
        :data:`SETTINGS` was not part of the table it was resolved from)."""
        return cls(
            mode=config["dhcp.mode"],
            port=config["dhcp.port"],
            proxy_port=config["dhcp.proxy_port"],
            range=config["dhcp.range"],
            netmask=config["dhcp.netmask"],
            router=config["dhcp.router"],
            dns=tuple(config["dhcp.dns"]),
            lease_time=config["dhcp.lease_time"],
            allow_macs=frozenset(config["dhcp.allow_macs"]),
            known_only=config["dhcp.known_only"],
            relays=frozenset(config["dhcp.relays"]),
            bootfiles={family: config[f"dhcp.bootfile_{family}"] for family in BOOT_FAMILIES},
            rcvbuf=config["dhcp.rcvbuf"],
            max_age=config["dhcp.max_age"],
        )

    def lab_range(self) -> tuple[str, str]:
        """The lab-mode address pool; lab mode without one is a configuration
        error (raised when the service is built, before any socket)."""
        if not self.range:
            raise ConfigError("dhcp.range: lab mode (--dhcp-mode full) needs --dhcp-range A-B")
        return self.range

    def listen_ports(self) -> list[tuple[int, PortKind]]:
        """The UDP ports to bind, by kind: always the DHCP port, and the PXE
        boot server port unless it is 0."""
        wanted: list[tuple[int, PortKind]] = [(self.port, "dhcp")]
        if self.proxy_port:
            wanted.append((self.proxy_port, "proxy"))
        return wanted

    def policy(self, advertise_url: str) -> BootPolicy:
        """The boot policy these settings describe, for a node whose boot
        HTTP is reached at ``advertise_url`` (empty: no HTTP answers)."""
        base = advertise_url.rstrip("/")
        return BootPolicy(
            bootfiles=dict(self.bootfiles),
            script_url=f"{base}/boot.ipxe" if base else "",
            http_base=f"{base}/ipxe" if base else "",
        )


def policy_from_config(config: Config, advertise_url: str) -> BootPolicy:
    """The boot policy ``config``'s settings describe (:meth:`DhcpSettings.policy`)."""
    return DhcpSettings.from_config(config).policy(advertise_url)
