"""The pure parts of the DHCP sockets: IP_PKTINFO ancillary data, when it
is needed, the bind error text and the send drop reasons."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from bootsvc.dhcp.sockets import (
    bind_error,
    needs_pktinfo,
    parse_pktinfo,
    send_drop_reason,
    udp_port_holders,
)

IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)


def _pktinfo(ifindex: int, local: str) -> bytes:
    return struct.pack("=i4s4s", ifindex, socket.inet_aton(local), socket.inet_aton("0.0.0.0"))


@pytest.mark.parametrize(("ancdata", "expected"), [
    ([], (0, None)),
    ([(socket.IPPROTO_IP, IP_PKTINFO, _pktinfo(3, "10.0.0.1"))], (3, "10.0.0.1")),
    ([(socket.IPPROTO_IP, IP_PKTINFO, _pktinfo(3, "10.0.0.1")[:8])], (0, None)),   # short
    ([(socket.SOL_SOCKET, IP_PKTINFO, _pktinfo(3, "10.0.0.1"))], (0, None)),  # other level
    ([(socket.IPPROTO_IP, IP_PKTINFO + 1, _pktinfo(3, "10.0.0.1"))], (0, None)),  # other type
])
def test_parse_pktinfo(ancdata: list[tuple[int, int, bytes]],
                       expected: tuple[int, str | None]) -> None:
    assert parse_pktinfo(ancdata) == expected


@pytest.mark.parametrize(("interface", "server_ip", "expected"), [
    ("eth0", "10.0.0.1", False),        # one interface, known address: plain recvfrom
    ("eth0", "", True),                 # answer as the arrival address: learn it
    (None, "10.0.0.1", True),           # every interface: learn which one
    (None, "", True),
])
def test_needs_pktinfo(interface: str | None, server_ip: str, expected: bool) -> None:
    assert needs_pktinfo(interface, server_ip) is expected


@pytest.mark.parametrize(("err", "expected"), [
    (errno.EAGAIN, "send_buffer_full"), (errno.ENOBUFS, "send_buffer_full"),
    (errno.ENETUNREACH, "send_failed"), (errno.EPERM, "send_failed"), (None, "send_failed"),
])
def test_send_drop_reason(err: int | None, expected: str) -> None:
    assert send_drop_reason(err) == expected


@pytest.mark.parametrize(("err", "interface", "expected"), [
    (errno.EADDRINUSE, None, "dhcp: cannot bind UDP 0.0.0.0:67: Address already in use "
                             "(another program holds the port without SO_REUSEADDR, so it "
                             "cannot be shared: run that DHCP server so that it shares it "
                             "(dnsmasq: --bind-interfaces or --bind-dynamic, as libvirt does) "
                             "or on other interfaces, or stop it, or run this node with "
                             "--dhcp-mode off)"),
    (errno.EACCES, None, "dhcp: cannot bind UDP 0.0.0.0:67: Permission denied (ports below "
                         "1024 need CAP_NET_BIND_SERVICE, an interface binding CAP_NET_RAW)"),
    (errno.EPERM, "eth0", "dhcp: cannot bind UDP 0.0.0.0:67 on eth0: Operation not permitted "
                          "(ports below 1024 need CAP_NET_BIND_SERVICE, an interface binding "
                          "CAP_NET_RAW)"),
])
def test_bind_error(err: int, interface: str | None, expected: str) -> None:
    exc = bind_error(OSError(err, os.strerror(err)), "0.0.0.0", 67, interface)
    assert exc.errno == err and exc.strerror == expected and "\n" not in str(exc)


def test_bind_error_names_who_holds_the_port() -> None:
    exc = bind_error(OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE)), "0.0.0.0", 67,
                     "virbr1", ["dnsmasq (pid 812)"])
    assert exc.strerror.startswith(
        "dhcp: cannot bind UDP 0.0.0.0:67 on virbr1: Address already in use (dnsmasq (pid 812) "
        "holds the port without SO_REUSEADDR, so it cannot be shared: ")


def test_udp_port_holders_finds_this_process() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as held:
        held.bind(("127.0.0.1", 0))
        port = held.getsockname()[1]
        comm = Path("/proc/self/comm").read_text().strip()
        assert udp_port_holders(port) == [f"{comm} (pid {os.getpid()})"]
    assert udp_port_holders(port) == []
