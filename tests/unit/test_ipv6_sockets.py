"""IPv6 beside IPv4 on the node's sockets (issue #20): the TFTP request
socket on ``::`` reports each request's destination address (so a
transfer answers from the address the client asked, as UEFI PXE over IPv6
requires on an interface with several addresses), IPv4 clients of a
dual-stack socket are recorded as plain IPv4, and an IPv6 URL keeps its
brackets on an iPXE command line."""

from __future__ import annotations

import socket

from bootsvc.netif import plain_address, url_host
from bootsvc.render import filter_ipxe, filter_ipxe_args
from bootsvc.tftp.sockets import open_request_socket, open_session_socket, pktinfo_dst


def _receive(sock: socket.socket) -> tuple[bytes, str | None, tuple[str, int]]:
    sock.settimeout(5)
    datagram, anc, _flags, addr = sock.recvmsg(2048, 64)
    return datagram, pktinfo_dst(anc), (addr[0], addr[1])


def test_tftp_request_socket_on_wildcard_v6_reports_the_destination() -> None:
    sock, pktinfo = open_request_socket("::", 0)
    port = sock.getsockname()[1]
    try:
        assert pktinfo
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as client:
            client.sendto(b"v6", ("::1", port))
            data, local, addr = _receive(sock)
            assert (data, local) == (b"v6", "::1")
            # the transfer socket bound to that address, connected to the client
            session = open_session_socket("::", addr, local)
            try:
                assert session.getsockname()[0] == "::1"
            finally:
                session.close()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client4:
            client4.sendto(b"v4", ("127.0.0.1", port))
            data, local, addr = _receive(sock)
            # an IPv4 client of the dual-stack socket: its address v4-mapped
            assert (data, local) == (b"v4", "::ffff:7f00:1")
            assert plain_address(addr[0]) == "127.0.0.1"
            session = open_session_socket("::", addr, local)
            try:
                assert session.getsockname()[0] == "::ffff:127.0.0.1"
            finally:
                session.close()
    finally:
        sock.close()


def test_plain_address() -> None:
    assert plain_address("::ffff:10.77.0.150") == "10.77.0.150"
    assert plain_address("fd77:77::101") == "fd77:77::101"
    assert plain_address("10.0.0.5") == "10.0.0.5"


def test_url_host_brackets_ipv6_literals_once() -> None:
    assert url_host("fd00::1") == "[fd00::1]"
    assert url_host("[fd00::1]") == "[fd00::1]"
    assert url_host("10.0.0.5") == "10.0.0.5"
    assert url_host("boot.example") == "boot.example"


def test_the_tftp_wildcard_socket_is_dual_stack_whatever_the_sysctl_says() -> None:
    sock, pktinfo = open_request_socket("::", 0)
    try:
        assert pktinfo
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
    finally:
        sock.close()


def test_ipxe_filter_keeps_ipv6_brackets_and_still_neutralises() -> None:
    assert filter_ipxe("http://[fd77:77::1]:8081") == "http://[fd77:77::1]:8081"
    assert filter_ipxe_args("lpmos.server=http://[fd00::1]:80 x=${y}") == \
        "lpmos.server=http://[fd00::1]:80 x=%24%7By%7D"
