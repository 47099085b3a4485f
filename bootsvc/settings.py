"""Settings of a regional node that every one of its services reads.

Service-specific settings live with the service (``bootsvc.dhcp.settings``,
``bootsvc.tftp.server``, ``bootsvc.http.settings``) and are merged by
``bootsvc.cli``.
"""

from __future__ import annotations

import socket

from lpmos.config import (
    Config,
    Setting,
    choice_list,
    float_range,
    parse_name,
    parse_optional_ip,
    parse_optional_str,
    parse_optional_url,
    parse_str,
)

#: ``--listen`` values that name no address: bind every address
WILDCARD_LISTEN = frozenset({"", "0.0.0.0", "::"})


def listen_address(config: Config) -> str | None:
    """The address ``--listen`` names, or ``None`` for a wildcard."""
    listen = str(config.get("regional.listen") or "")
    return None if listen in WILDCARD_LISTEN else listen


NODE_SETTINGS: tuple[Setting, ...] = (
    Setting("regional.idc", "--idc", "dc1", parse_name,
            "the IDC (datacenter) this node serves; it watches only /os/{idc}/", metavar="IDC"),
    Setting("regional.node_name", "--node-name", socket.gethostname().split(".")[0].lower()[:32]
            or "node", parse_name,
            "this node's name in /os/{idc}/nodes/ (default: the host name)", metavar="NAME"),
    Setting("regional.services", "--services", ["dhcp", "tftp", "http"],
            choice_list("dhcp", "tftp", "http"),
            "which services to run, comma list of dhcp, tftp, http", metavar="LIST"),
    Setting("regional.listen", "--listen", "0.0.0.0", parse_str,
            "address the TFTP and HTTP sockets bind to; DHCP answers as this address but "
            "binds 0.0.0.0 on --interface (default: the interface holding it), since only "
            "such a socket hears broadcast DISCOVERs", metavar="ADDR"),
    Setting("regional.interface", "--interface", None, parse_optional_str,
            "network interface the ProxyDHCP binds to (SO_BINDTODEVICE) and takes its "
            "address from", metavar="IFACE"),
    Setting("regional.server_ip", "--server-ip", None, parse_optional_ip,
            "address machines reach this node at (DHCP option 54, TFTP next-server); "
            "default: --listen when it is an address, else the address of --interface",
            metavar="IP"),
    Setting("regional.agent_timeout", "--agent-timeout", 300.0, float_range(1.0, 86400.0),
            "an installing task whose agent's liveness lease stays gone this many seconds "
            "fails with the reason recorded", metavar="SECONDS"),
    Setting("regional.firstboot_timeout", "--firstboot-timeout", 1800.0,
            float_range(1.0, 86400.0),
            "after the agent rebooted into the installed OS, fail the task if its first boot "
            "has not called back within this many seconds", metavar="SECONDS"),
    Setting("regional.boot_timeout", "--boot-timeout", 3600.0, float_range(1.0, 7 * 86400.0),
            "fail a claimed (booting) task when nothing is heard from the machine for this "
            "many seconds (installer-mode installs report through their hooks), and an "
            "approved task no node has claimed this many seconds after its approval",
            metavar="SECONDS"),
    Setting("regional.advertise_url", "--advertise-url", None, parse_optional_url,
            "base URL machines use for boot HTTP (default: http://SERVER_IP:HTTP_PORT)",
            metavar="URL"),
)
