"""The DHCP sockets: where they bind, how they are opened, and the port guard.

Linux delivers a broadcast DISCOVER only to a socket bound to the wildcard
address, so every DHCP socket binds 0.0.0.0 (:func:`decide_bind`), on one
interface when the node has one; a unicast ``--listen`` becomes the
identity the node answers as, not the bind address.  Because the sockets
take SO_REUSEADDR, :func:`claim_port` keeps two LPMOS nodes of one host from
serving the same port on the same interface.  With IP_PKTINFO the arrival
interface and local address of each datagram are learnt
(:func:`parse_pktinfo`), so a broadcast reply leaves by the interface the
request came in on (:func:`send_datagram`).  The pure parts (the bind, the
ancillary data, the error texts and drop reasons) are functions of data.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bootsvc.wire import dhcp

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_PKTINFO = struct.Struct("=i4s4s")
_inet_ntoa = socket.inet_ntoa
_IPPROTO_IP = int(socket.IPPROTO_IP)        # a plain int: enum operators are slow

#: SO_TIMESTAMPNS: the kernel's receipt time of each datagram (Linux; the
#: socket module does not name it)
_SO_TIMESTAMPNS = 35
_TIMESPEC = struct.Struct("=qq")
#: ancillary buffer size for one IP_PKTINFO and one SCM_TIMESTAMPNS message
CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size) + socket.CMSG_SPACE(_TIMESPEC.size)
#: receive buffer: one byte more than the largest datagram accepted, so a
#: longer (truncated) one is recognised by its length
RECV_SIZE = dhcp.MAX_PACKET + 1
WILDCARD_IP = "0.0.0.0"


class NoDhcpInterface(OSError):
    """``--listen`` names an address, and no interface is known on which a
    wildcard socket would hear the broadcasts meant for it."""


@dataclass(frozen=True, slots=True)
class DhcpBind:
    """Where the DHCP sockets bind: the wildcard address, on ``interface``
    (SO_BINDTODEVICE) or, when ``None``, on every interface."""

    interface: str | None
    address: str = WILDCARD_IP


def decide_bind(listen: str | None, interface: str | None, owner: str | None) -> DhcpBind:
    """The DHCP bind for ``--listen`` (``None``: the wildcard) and
    ``--interface``; ``owner`` is the interface that holds ``listen``, if any.

    Linux delivers a broadcast (a DISCOVER from a client without an address)
    only to sockets bound to 0.0.0.0, never to one bound to a unicast
    address; such a ProxyDHCP would hear only unicast and relayed requests,
    and no PXE ROM would get an answer.  So the bind is always the wildcard,
    and an address in ``--listen`` says which interface (the one holding it,
    unless ``--interface`` says otherwise) and whom we answer as (see
    :func:`bootsvc.netif.default_server_ip`).  With an address and no
    interface to bind, raise :class:`NoDhcpInterface`: the sockets would
    answer on every interface as that address."""
    if interface:
        return DhcpBind(interface)
    if listen is None:
        return DhcpBind(None)
    if owner:
        return DhcpBind(owner)
    raise NoDhcpInterface(
        f"dhcp: --listen {listen} is not an IPv4 address of an interface of this host, and "
        "broadcast DISCOVERs reach only a socket bound to 0.0.0.0 on an interface: give "
        f"--interface IFACE (DHCP then answers there as {listen}), or --listen 0.0.0.0")


def needs_pktinfo(interface: str | None, server_ip: str) -> bool:
    """Whether each datagram's arrival interface and local address must be
    learnt (IP_PKTINFO): not when the sockets are bound to one interface and
    the address we answer as is known, which allows plain recvfrom/sendto
    (the cheapest path)."""
    return not (interface and server_ip)


def bind_error(exc: OSError, address: str, port: int, interface: str | None,
               holders: Sequence[str] = ()) -> OSError:
    """The error to raise when binding ``address:port`` failed with ``exc``:
    one line naming the port and interface, with the capability to grant
    when the failure was a permission, and for a port in use who holds it
    (``holders``, from :func:`udp_port_holders`) and how to share it.

    Our sockets take SO_REUSEADDR, so a DHCP server on the same host (the
    site's, or libvirt's dnsmasq on a network's bridge) shares the port when
    it takes SO_REUSEADDR too: dnsmasq does with --bind-interfaces or
    --bind-dynamic, which libvirt always gives it.  EADDRINUSE means the
    holder did not, on our interface or on every interface."""
    hint = ""
    if exc.errno in (errno.EACCES, errno.EPERM):
        hint = " (ports below 1024 need CAP_NET_BIND_SERVICE, an interface binding CAP_NET_RAW)"
    elif exc.errno == errno.EADDRINUSE:
        who = ", ".join(holders) or "another program"
        hint = (f" ({who} holds the port without SO_REUSEADDR, so it cannot be shared: run "
                "that DHCP server so that it shares it (dnsmasq: --bind-interfaces or "
                "--bind-dynamic, as libvirt does) or on other interfaces, or stop it, or run "
                "this node with --dhcp-mode off)")
    return OSError(exc.errno, f"dhcp: cannot bind UDP {address}:{port}"
                   f"{' on ' + interface if interface else ''}: {exc.strerror}{hint}")


def udp_port_holders(port: int, proc: Path = Path("/proc")) -> list[str]:
    """``"NAME (pid N)"`` of each process holding an IPv4 UDP socket on
    ``port``, read from ``/proc`` (the sockets of ``/proc/net/udp``, then
    the processes whose descriptors name them); empty when none is known or
    ``/proc`` cannot be read (another user's descriptors need root)."""
    try:
        rows = (proc / "net" / "udp").read_text().splitlines()[1:]
    except OSError:
        return []
    inodes = {f"socket:[{cols[9]}]" for cols in (row.split() for row in rows)
              if len(cols) > 9 and int(cols[1].rsplit(":", 1)[1], 16) == port}
    holders: list[str] = []
    if not inodes:
        return holders
    for entry in proc.iterdir():
        if entry.name.isdigit() and _holds_any(entry, inodes):
            try:
                name = (entry / "comm").read_text().strip()
            except OSError:
                name = "?"
            holders.append(f"{name} (pid {entry.name})")
    return sorted(holders)


def _holds_any(pid_dir: Path, targets: set[str]) -> bool:
    try:
        fds = list((pid_dir / "fd").iterdir())
    except OSError:
        return False
    for fd in fds:
        try:
            if os.readlink(fd) in targets:
                return True
        except OSError:
            continue
    return False


def parse_pktinfo(ancdata: Iterable[tuple[int, int, bytes]]) -> tuple[int, str | None]:
    """(arrival interface index, local address) from a datagram's ancillary
    data, or ``(0, None)`` when it carries no IP_PKTINFO."""
    ifindex, local_ip = 0, None
    for level, ctype, cdata in ancdata:
        if ctype == _IP_PKTINFO and level == _IPPROTO_IP and len(cdata) >= _PKTINFO.size:
            ifindex, spec_dst, _addr = _PKTINFO.unpack_from(cdata)
            local_ip = _inet_ntoa(spec_dst)
    return ifindex, local_ip


def parse_received(ancdata: Iterable[tuple[int, int, bytes]]) -> float | None:
    """The kernel's receipt time (``time.time()`` scale) from a datagram's
    ancillary data, or ``None`` when it carries no SCM_TIMESTAMPNS."""
    for level, ctype, cdata in ancdata:
        if ctype == _SO_TIMESTAMPNS and level == socket.SOL_SOCKET and \
                len(cdata) >= _TIMESPEC.size:
            sec, nsec = _TIMESPEC.unpack_from(cdata)
            return float(sec + nsec * 1e-9)
    return None


def send_drop_reason(err: int | None) -> str:
    """The drop reason a failed send counts as: a full send buffer (load)
    is told apart from every other failure."""
    return "send_buffer_full" if err in (errno.EAGAIN, errno.ENOBUFS) else "send_failed"


def send_datagram(sock: socket.socket, data: bytes, dest: tuple[str, int], ifindex: int,
                  local_ip: str | None) -> None:
    """Send ``data`` to ``dest``; a broadcast to a request whose arrival
    interface is known (``ifindex``) leaves by that interface, from its
    address.  Raises :class:`OSError` when the send fails."""
    if dest[0] == dhcp.BROADCAST_IP and ifindex:
        info = _PKTINFO.pack(ifindex, socket.inet_aton(local_ip or dhcp.ZERO_IP),
                             b"\x00\x00\x00\x00")
        sock.sendmsg([data], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0, dest)
    else:
        sock.sendto(data, dest)


def open_socket(listen: str, port: int, *, interface: str | None, rcvbuf: int,
                pktinfo: bool = True) -> socket.socket:
    """A non-blocking UDP socket for DHCP: broadcast allowed, a large receive
    buffer (forced past rmem_max when we may), each datagram stamped with
    its receipt time (SO_TIMESTAMPNS: how long it waited), optionally
    IP_PKTINFO (to learn the arrival interface and local address) and bound
    to one interface."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        try:
            sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, rcvbuf)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        if interface:
            sock.setsockopt(socket.SOL_SOCKET, _SO_BINDTODEVICE, interface.encode())
        if pktinfo:
            sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.setblocking(False)
        sock.bind((listen, port))
    except BaseException:
        sock.close()
        raise
    return sock


def claim_port(port: int, interface: str | None) -> socket.socket | None:
    """Hold a name for the wildcard DHCP ``port`` on ``interface`` (``None``:
    every interface) among the LPMOS nodes of this network namespace, or
    raise EADDRINUSE naming the clash.

    The DHCP sockets take SO_REUSEADDR, so that a ProxyDHCP can share port
    67 with the site's DHCP server on the same host and nodes can serve
    different interfaces on one port; the price is that a second node
    started by mistake on the same port binds too, and both answer.  An
    abstract unix socket (one name space per network namespace, released
    when the process dies however it dies) tells our own nodes apart from
    everyone else.  The name carries no --listen address: every DHCP socket
    binds the wildcard (:func:`decide_bind`), so two nodes on one interface
    hear the same broadcasts whatever addresses they answer as.  Port 0 (a
    test's ephemeral port) needs no claim."""
    if not port:
        return None
    name = f"\0lpmos-dhcp/{WILDCARD_IP}:{port}/{interface or '*'}"
    lock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        lock.bind(name)
    except OSError as exc:
        lock.close()
        if exc.errno != errno.EADDRINUSE:
            raise
        raise OSError(errno.EADDRINUSE,
                      f"dhcp: another LPMOS node on this host already serves UDP port {port} "
                      f"{'on ' + interface if interface else 'on every interface'}; stop it, "
                      "or give this one another --dhcp-port/--dhcp-proxy-port or --interface"
                      ) from None
    return lock
