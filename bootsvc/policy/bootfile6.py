"""The boot file URL a DHCPv6 client gets (RFC 5970): one pure decision.

DHCPv6 boot is the DHCPv4 decision in other clothes, so the rules are
:func:`bootsvc.policy.bootfile.decide_bootfile`'s, word for word; this
module only reads the DHCPv6 options into its :class:`ClientInfo` and
writes the answer as the URL option 59 must carry:

| DHCPv6 option                         | becomes                                    |
| ------------------------------------- | ------------------------------------------ |
| 61 client architecture types          | the architecture (the first one we know)   |
| 16 vendor class, first data item      | the vendor class (``PXEClient:…``, ``HTTPClient:…``) |
| 15 user class containing ``iPXE``     | "already iPXE": the boot script URL        |

A TFTP answer becomes ``tftp://[address]/file`` (an IPv6 literal in
brackets, RFC 3986), an HTTP boot or script answer is already a URL (the
policy's URLs must be ones an IPv6 client can reach).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from bootsvc.policy.bootfile import (
    ARCHITECTURES,
    BootAnswer,
    BootPolicy,
    BootRefusal,
    ClientInfo,
    decide_bootfile,
)
from bootsvc.wire import dhcp6


@dataclass(frozen=True, slots=True)
class Boot6Policy:
    """``boot``: the same policy as DHCPv4's (boot files per family, the
    script URL and the HTTP base, here reachable over IPv6);
    ``tftp_address``: the node's IPv6 address TFTP URLs name."""

    boot: BootPolicy
    tftp_address: str = ""


@dataclass(frozen=True, slots=True)
class Boot6Answer:
    url: str
    answer: BootAnswer


Boot6Decision = Boot6Answer | BootRefusal


def client_info(msg: dhcp6.Dhcp6Message) -> ClientInfo:
    """What the client said about itself, as the DHCPv4 decision reads it."""
    arches = msg.client_arches
    arch = next((a for a in arches if a in ARCHITECTURES), arches[0] if arches else None)
    vendor = b""
    for _enterprise, items in msg.vendor_classes:
        if items:
            vendor = items[0]
            break
    is_ipxe = any(item == b"iPXE" for item in msg.user_classes)
    return ClientInfo(arch=arch, vendor_class=vendor, user_class=None, ipxe_options=is_ipxe)


def decide_bootfile6(msg: dhcp6.Dhcp6Message, policy: Boot6Policy) -> Boot6Decision:
    decision = decide_bootfile(client_info(msg), policy.boot)
    if isinstance(decision, BootRefusal):
        return decision
    if decision.kind != "tftp":
        return Boot6Answer(decision.filename, decision)
    if not policy.tftp_address:
        return BootRefusal("no_tftp_address", "no IPv6 address configured for TFTP URLs")
    return Boot6Answer(tftp_url(policy.tftp_address, decision.filename), decision)


def tftp_url(address: str, filename: str) -> str:
    addr = ipaddress.IPv6Address(address)
    return f"tftp://[{addr.compressed}]/{filename}"
