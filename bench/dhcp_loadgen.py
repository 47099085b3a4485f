"""DHCP load generator and the network it runs on.

* :class:`NetnsPair` — two network namespaces joined by a veth pair, created
  with unique names and always removed (tests and benchmarks);
  :func:`entered` switches the *current thread* into a namespace so a socket
  created there lives in it (the socket keeps working after switching back);
* :class:`PxeClient` — one PXE/iPXE-like client on a socket (tests);
* :func:`run_closed` / :func:`run_open` — the benchmark's load: PXE-style
  DISCOVERs from random MACs with options 60, 93, 94, 97, closed loop with a
  window of outstanding requests, or open loop at a fixed rate; both bounded
  in count and time.

Needs root for the namespaces (``ip netns``).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import select
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from bootsvc.wire import dhcp

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextlib.contextmanager
def entered(netns: str) -> Iterator[None]:
    """Run the body with the current thread in network namespace ``netns``."""
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{netns}", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(own)
    finally:
        os.close(own)
        os.close(target)


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


@dataclass
class NetnsPair:
    """Namespaces ``server`` and ``client`` joined by a veth pair on
    ``subnet``.0/24: server .1, client .2 (when ``client_address``).

    With ``site=True`` a third namespace ``site`` (.3, for the site's DHCP
    server) is added, and the client namespace holds a bridge that joins
    both veths, like a switch; ``client_if`` is then the bridge.  Names are
    unique per process and call; :meth:`destroy` removes everything
    (deleting a namespace deletes its veth ends).
    """

    tag: str = field(default_factory=lambda: f"{os.getpid() % 100000}{random.randrange(1000)}")
    subnet: str = "10.231.0"
    client_address: bool = True
    site: bool = False

    def __post_init__(self) -> None:
        t = self.tag
        self.server, self.client, self.site_ns = f"lpd{t}s", f"lpd{t}c", f"lpd{t}d"
        self.server_if, self.site_if = f"lpd{t}a"[:15], f"lpd{t}e"[:15]
        self._ports = (f"lpd{t}p"[:15], f"lpd{t}q"[:15])
        self.client_if = f"lpd{t}br"[:15] if self.site else f"lpd{t}b"[:15]
        self.server_ip, self.client_ip, self.site_ip = (
            f"{self.subnet}.1", f"{self.subnet}.2", f"{self.subnet}.3")

    @property
    def namespaces(self) -> list[str]:
        return [self.server, self.client] + ([self.site_ns] if self.site else [])

    def create(self) -> NetnsPair:
        try:
            for ns in self.namespaces:
                ip("netns", "add", ns)
                ip("-n", ns, "link", "set", "lo", "up")
            if self.site:
                ip("-n", self.client, "link", "add", self.client_if, "type", "bridge",
                   "forward_delay", "0")
                for (ns, nif, peer) in ((self.server, self.server_if, self._ports[0]),
                                        (self.site_ns, self.site_if, self._ports[1])):
                    ip("link", "add", nif, "netns", ns, "type", "veth",
                       "peer", "name", peer, "netns", self.client)
                    ip("-n", self.client, "link", "set", peer, "master", self.client_if)
                    ip("-n", self.client, "link", "set", peer, "up")
                ip("-n", self.site_ns, "addr", "add", f"{self.site_ip}/24", "dev", self.site_if)
                ip("-n", self.site_ns, "link", "set", self.site_if, "up")
            else:
                ip("link", "add", self.server_if, "netns", self.server, "type", "veth",
                   "peer", "name", self.client_if, "netns", self.client)
            ip("-n", self.server, "addr", "add", f"{self.server_ip}/24", "dev", self.server_if)
            ip("-n", self.server, "link", "set", self.server_if, "up")
            if self.client_address:
                self.add_client_address()
            ip("-n", self.client, "link", "set", self.client_if, "up")
        except BaseException:
            self.destroy()
            raise
        return self

    def add_client_address(self, address: str | None = None) -> None:
        ip("-n", self.client, "addr", "add", f"{address or self.client_ip}/24",
           "dev", self.client_if)

    def destroy(self) -> None:
        for ns in self.namespaces:
            ip("netns", "del", ns, check=False)

    def exec_args(self, netns: str, *cmd: str) -> list[str]:
        return ["ip", "netns", "exec", netns, *cmd]

    def __enter__(self) -> NetnsPair:
        return self.create()

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def client_socket(netns: str, interface: str, port: int = 68,
                  rcvbuf: int = 8 * 1024 * 1024) -> socket.socket:
    """A UDP socket in ``netns`` bound to ``0.0.0.0:port`` on ``interface``,
    able to send broadcasts (from 0.0.0.0 when the interface has no address)."""
    with entered(netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_BINDTODEVICE, interface.encode())
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)   # SO_RCVBUFFORCE
        sock.bind(("0.0.0.0", port))
    return sock


class PxeClient:
    """Sends requests like a PXE ROM or iPXE and waits for matching replies."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.xid = random.randrange(1, 2**31)

    def exchange(self, request: bytes, dest: tuple[str, int], *, timeout: float = 3.0,
                 want: int | None = None) -> dhcp.DhcpPacket | None:
        """Send ``request`` and return the first reply with its xid (and
        message type ``want``), or ``None`` after ``timeout`` seconds."""
        xid = struct.unpack_from("!I", request, 4)[0]
        self.sock.sendto(request, dest)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return None
            data = self.sock.recv(4096)
            try:
                pkt = dhcp.parse_packet(data)
            except dhcp.MalformedPacket:
                continue
            if pkt.op == dhcp.BOOTREPLY and pkt.xid == xid and \
                    (want is None or pkt.msg_type == want):
                return pkt

    def collect(self, request: bytes, dest: tuple[str, int], *,
                window: float = 1.5) -> list[tuple[dhcp.DhcpPacket, str]]:
        """Send ``request`` and gather every reply with its xid for
        ``window`` seconds, as a PXE ROM collects offers: (packet, sender)."""
        xid = struct.unpack_from("!I", request, 4)[0]
        self.sock.sendto(request, dest)
        deadline = time.monotonic() + window
        replies = []
        while (remaining := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                break
            data, sender = self.sock.recvfrom(4096)
            try:
                pkt = dhcp.parse_packet(data)
            except dhcp.MalformedPacket:
                continue
            if pkt.op == dhcp.BOOTREPLY and pkt.xid == xid:
                replies.append((pkt, sender[0]))
        return replies

    def discover(self, mac: str, dest: tuple[str, int] = ("255.255.255.255", 67),
                 timeout: float = 3.0, **kw: object) -> dhcp.DhcpPacket | None:
        self.xid += 1
        kw.setdefault("uuid", bytes(range(16)))
        req = dhcp.build_request(mac, dhcp.DISCOVER, xid=self.xid, **kw)  # type: ignore[arg-type]
        return self.exchange(req, dest, timeout=timeout)

    def request(self, mac: str, dest: tuple[str, int], timeout: float = 3.0,
                **kw: object) -> dhcp.DhcpPacket | None:
        self.xid += 1
        kw.setdefault("uuid", bytes(range(16)))
        req = dhcp.build_request(mac, dhcp.REQUEST, xid=self.xid, **kw)  # type: ignore[arg-type]
        return self.exchange(req, dest, timeout=timeout)


# --- the benchmark's load -------------------------------------------------------------

VENDOR_CLASSES = {0: b"PXEClient:Arch:00000:UNDI:002001",
                  7: b"PXEClient:Arch:00007:UNDI:003016",
                  9: b"PXEClient:Arch:00009:UNDI:003016"}


def make_templates(count: int, seed: int = 1) -> list[bytes]:
    """PXE-style DISCOVERs from random unicast MACs: options 60, 93 (0, 7 or
    9), 94, 97 (random UUID), broadcast flag set.  The xid (bytes 4-8) is
    patched per send."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        mac = bytes([rng.randrange(256) & 0xFC | 0x02]) + rng.randbytes(5)
        arch = rng.choice((0, 7, 9))
        out.append(dhcp.build_request(mac, arch=arch, vendor_class=VENDOR_CLASSES[arch],
                                      uuid=rng.randbytes(16), flags=dhcp.FLAG_BROADCAST))
    return out


@dataclass
class LoadResult:
    """One load run: what was sent, what was answered and how fast."""

    mode: str
    sent: int = 0
    answered: int = 0
    with_bootfile: int = 0
    duration: float = 0.0
    send_seconds: float = 0.0       # first send to last send (open loop: the rate achieved)
    latencies: list[float] = field(default_factory=list)   # seconds, answered requests

    @property
    def rate(self) -> float:
        return self.answered / self.duration if self.duration > 0 else 0.0

    @property
    def lost(self) -> int:
        return self.sent - self.answered

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def summary(self) -> dict[str, float]:
        return {"sent": self.sent, "answered": self.answered, "lost": self.lost,
                "with_bootfile": self.with_bootfile, "duration_s": round(self.duration, 4),
                "rate_per_s": round(self.rate, 1),
                "p50_ms": round(self.percentile(0.50) * 1000, 3),
                "p99_ms": round(self.percentile(0.99) * 1000, 3)}


class LoadGen:
    """Drives one server with DISCOVERs on ``sock`` (a client socket bound
    to port 68) and matches replies by xid.  Every run is bounded by a
    request count and a wall-clock limit."""

    def __init__(self, sock: socket.socket, templates: list[bytes],
                 dest: tuple[str, int] = ("255.255.255.255", 67),
                 loss_timeout: float = 0.5, *, unique_macs: bool = False,
                 giaddr: str | None = None) -> None:
        """``unique_macs``: every request from a MAC never used before (a
        storm of unknown machines), else the templates' MACs in turn.
        ``giaddr``: requests arrive as a relay forwards them (giaddr set,
        hops 1; ``sock`` bound to port 67 at that address, ``dest`` the
        server's unicast address)."""
        self.sock = sock
        self.sock.setblocking(False)
        self.templates = templates
        self.dest = dest
        self.loss_timeout = loss_timeout
        self._xid = random.randrange(1 << 20, 1 << 30)
        self.unique_macs = unique_macs
        self._mac = random.randrange(1 << 38)      # 5 bytes after the 02 prefix, from here on
        self._relay = socket.inet_aton(giaddr) if giaddr else None

    def _drain(self) -> None:
        while True:
            try:
                self.sock.recv(4096)
            except BlockingIOError:
                return

    def _next(self) -> tuple[int, bytes]:
        self._xid = xid = (self._xid + 1) & 0xFFFFFFFF
        tpl = self.templates[xid % len(self.templates)]
        if not self.unique_macs and self._relay is None:
            return xid, tpl[:4] + xid.to_bytes(4, "big") + tpl[8:]
        head = tpl[:3] + b"\x01" if self._relay is not None else tpl[:4]
        giaddr = self._relay if self._relay is not None else tpl[24:28]
        if self.unique_macs:
            self._mac = (self._mac + 1) & ((1 << 40) - 1)
            mac = b"\x02" + self._mac.to_bytes(5, "big")
        else:
            mac = tpl[28:34]
        return xid, head + xid.to_bytes(4, "big") + tpl[8:24] + giaddr + mac + tpl[34:]

    def _receive(self, outstanding: dict[int, float], result: LoadResult) -> int:
        got = 0
        now = time.perf_counter
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return got
            if len(data) < 240 or data[0] != 2:
                continue
            sent_at = outstanding.pop(int.from_bytes(data[4:8], "big"), None)
            if sent_at is None:
                continue                       # late, duplicate or not ours
            result.latencies.append(now() - sent_at)
            result.answered += 1
            if data[108]:
                result.with_bootfile += 1
            got += 1

    def closed_loop(self, count: int, window: int, time_limit: float) -> LoadResult:
        """Keep ``window`` requests outstanding until ``count`` are sent; a
        request unanswered after ``loss_timeout`` counts as lost."""
        self._drain()
        result = LoadResult(f"closed w={window}")
        outstanding: dict[int, float] = {}
        order: list[tuple[float, int]] = []      # send times in order, for expiry
        head = 0
        perf = time.perf_counter
        poller = select.epoll()
        poller.register(self.sock.fileno(), select.EPOLLIN)
        start = perf()
        deadline = start + time_limit
        try:
            while perf() < deadline:
                while len(outstanding) < window and result.sent < count:
                    xid, pkt = self._next()
                    try:
                        self.sock.sendto(pkt, self.dest)
                    except BlockingIOError:
                        break
                    t = perf()
                    outstanding[xid] = t
                    order.append((t, xid))
                    result.sent += 1
                if not outstanding and result.sent >= count:
                    break
                poller.poll(0.01)
                self._receive(outstanding, result)
                cutoff = perf() - self.loss_timeout
                while head < len(order) and order[head][0] < cutoff:
                    outstanding.pop(order[head][1], None)
                    head += 1
        finally:
            poller.close()
        result.duration = perf() - start
        return result

    def open_loop(self, rate: float, duration: float, max_count: int = 1_000_000) -> LoadResult:
        """Send at ``rate`` per second for ``duration`` seconds regardless of
        answers, then wait ``loss_timeout`` for stragglers."""
        self._drain()
        result = LoadResult(f"open {rate:g}/s")
        outstanding: dict[int, float] = {}
        perf = time.perf_counter
        poller = select.epoll()
        poller.register(self.sock.fileno(), select.EPOLLIN)
        start = perf()
        total = min(max_count, int(rate * duration))
        try:
            while result.sent < total:
                due = min(total, int((perf() - start) * rate) + 1)
                while result.sent < due:
                    xid, pkt = self._next()
                    try:
                        self.sock.sendto(pkt, self.dest)
                    except BlockingIOError:
                        break
                    outstanding[xid] = perf()
                    result.sent += 1
                self._receive(outstanding, result)
                wait = start + (result.sent + 1) / rate - perf()
                if wait > 0:
                    poller.poll(wait)
                    self._receive(outstanding, result)
            result.send_seconds = perf() - start
            end = perf() + self.loss_timeout
            while outstanding and perf() < end:
                poller.poll(0.01)
                self._receive(outstanding, result)
        finally:
            poller.close()
        result.duration = duration      # the offered-load period
        return result

    def burst(self, size: int = 256, wait: float = 1.0) -> LoadResult:
        """``size`` DISCOVERs back to back, then collect for ``wait`` s."""
        self._drain()
        result = LoadResult(f"burst {size}")
        outstanding: dict[int, float] = {}
        perf = time.perf_counter
        packets = [self._next() for _ in range(size)]
        start = perf()
        for xid, pkt in packets:
            outstanding[xid] = perf()
            while True:
                try:
                    self.sock.sendto(pkt, self.dest)
                    break
                except BlockingIOError:
                    select.select([], [self.sock], [], 0.01)
            result.sent += 1
        end = perf() + wait
        while outstanding and perf() < end:
            select.select([self.sock], [], [], 0.01)
            self._receive(outstanding, result)
        result.duration = perf() - start
        return result
