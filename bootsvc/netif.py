"""This host's network interfaces, as the node needs them: the address of an
interface, the interface of an address, and the address machines are sent to."""

from __future__ import annotations

import fcntl
import socket
import struct

from bootsvc.settings import listen_address
from lpmos.config import Config


def plain_address(address: str) -> str:
    """A peer's address as the node records it: an IPv4 client of a
    dual-stack socket (``::ffff:10.0.0.5``, ``--listen ::``) as plain IPv4,
    so its entries join those DHCP recorded for the same address."""
    if address.startswith("::ffff:") and "." in address:
        return address[7:]
    return address


def url_host(host: str) -> str:
    """``host`` as it goes into a URL: an IPv6 literal in brackets."""
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def read_interface_address(name: str) -> str | None:
    """The IPv4 address of a network interface (SIOCGIFADDR), or ``None``."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
        except OSError:
            return None
    return socket.inet_ntoa(packed[20:24])


def default_server_ip(config: Config, *, fallback: bool = True) -> str:
    """Where machines reach us: --server-ip, else --listen when it names an
    address (TFTP and HTTP are bound there, so machines must be sent there,
    even when it is not the interface's primary address), else --interface's
    address, else (with ``fallback``) the address of the default route's
    source (found without sending anything), else ``""``."""
    if config["regional.server_ip"]:
        return str(config["regional.server_ip"])
    listen = listen_address(config)
    if listen is not None:
        return listen
    iface = config["regional.interface"]
    if iface:
        addr = read_interface_address(iface)
        if addr:
            return addr
    if not fallback:
        return ""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))   # TEST-NET-1; connect() on UDP sends nothing
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


def read_address_interface(address: str) -> str | None:
    """The interface that holds the IPv4 ``address``, or ``None`` (also
    when psutil, a server dependency, is missing)."""
    try:
        import psutil
    except ImportError:
        return None
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == address for a in addrs):
            return str(name).split(":", 1)[0]      # an alias label (eth0:1) names no device
    return None
