"""Settings of the node's DHCPv6 service (``lpmos regional --dhcp6-mode``).

The boot files are DHCPv4's (``--dhcp-bootfile-*``): one decision for both.
"""

from __future__ import annotations

import ipaddress
from typing import Any

from bootsvc.state.dhcp_leases import parse_range6
from lpmos.config import Setting, choice, int_range, parse_optional_str, parse_optional_url


def parse_optional_ipv6(raw: Any) -> str | None:
    if raw in (None, ""):
        return None
    try:
        return ipaddress.IPv6Address(str(raw).strip()).compressed
    except ValueError:
        raise ValueError("an IPv6 address such as fd00::1") from None


SETTINGS: tuple[Setting, ...] = (
    Setting("dhcp6.mode", "--dhcp6-mode", "off", choice("off", "proxy", "full"),
            "DHCPv6 network boot (RFC 5970): proxy: boot options only, next to the site's "
            "DHCPv6 server (UEFI PXE's proxy offer, then port 4011); full: lab segments, "
            "addresses from --dhcp6-range too, leases in etcd; off (default)"),
    Setting("dhcp6.interface", "--dhcp6-interface", None, parse_optional_str,
            "interface the DHCPv6 service serves (default: --interface)", metavar="IFACE"),
    Setting("dhcp6.address", "--dhcp6-address", None, parse_optional_ipv6,
            "this node's IPv6 address that TFTP boot file URLs name (default: the first "
            "global address of the interface)", metavar="ADDR"),
    Setting("dhcp6.advertise_url", "--dhcp6-advertise-url", None, parse_optional_url,
            "boot HTTP over IPv6: the base of every URL a machine that comes over IPv6 "
            "gets (DHCPv6 boot file, scripts, kernel line, install spec; default: "
            "http://[ADDRESS]:HTTP_PORT with --dhcp6-mode)", metavar="URL"),
    Setting("dhcp6.range", "--dhcp6-range", None, parse_range6,
            "full mode: the addresses to hand out, FIRST-LAST such as fd00::1:100-fd00::1:1ff",
            metavar="A-B"),
    Setting("dhcp6.lease_time", "--dhcp6-lease-time", 3600, int_range(60, 7 * 86400),
            "full mode: preferred lifetime in seconds (valid: twice it)", metavar="SECONDS"),
    Setting("dhcp6.port", "--dhcp6-port", 547, int_range(1, 65535),
            "UDP port of the DHCPv6 server (clients send to 547; tests)", metavar="PORT"),
    Setting("dhcp6.client_port", "--dhcp6-client-port", 546, int_range(1, 65535),
            "UDP port answers go to (clients listen on 546; tests)", metavar="PORT"),
    Setting("dhcp6.proxy_port", "--dhcp6-proxy-port", 4011, int_range(1, 65535),
            "proxy mode: the boot service port UEFI PXE asks again (4011)", metavar="PORT"),
)
