"""The DHCPv6 service: sockets and bookkeeping around the pure parts.

* :mod:`bootsvc.wire.dhcp6` parses (a malformed datagram is dropped and
  counted by reason, ``dhcp6_dropped_total{reason}``, and never stops the
  loop);
* :mod:`bootsvc.policy.dhcp6_answer` decides (proxy or full mode);
* this module receives on ``[::]:547`` (joined to ff02::1:2 on the
  interface) and, in proxy mode, ``[::]:4011``; answers a client at its
  source address on port 546 and a relay on 547 through every relay it
  came through; and in full mode keeps the address pool
  (:class:`bootsvc.state.dhcp_leases.LeasePool`, IPv6) whose bound leases
  are written behind to etcd at ``keys.dhcp6_lease(idc, duid-iaid)``.

One asyncio loop, no thread of its own but the lease writer's.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootsvc.policy.bootfile6 import Boot6Policy
from bootsvc.policy.dhcp6_answer import PROXY_PORT, Answer6, Lease6, answer_full, answer_proxy
from bootsvc.state.dhcp_leases import LeasePool, LeaseWriter
from bootsvc.wire import dhcp6
from lpmos.metrics import Registry
from lpmos.store import Store
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Dhcp6Settings:
    interface: str
    policy: Boot6Policy
    mode: str = "proxy"                     # proxy | full
    range: tuple[str, str] | None = None   # full mode
    lease_time: int = 3600
    listen_port: int = dhcp6.SERVER_PORT
    client_port: int = dhcp6.CLIENT_PORT
    proxy_port: int = PROXY_PORT


def interface_duid(interface: str) -> bytes:
    """DUID-LL of the interface's MAC: a stable server id."""
    mac = Path(f"/sys/class/net/{interface}/address").read_text().strip()
    return dhcp6.duid_ll(bytes.fromhex(mac.replace(":", "")))


def client_key(msg: dhcp6.Dhcp6Message) -> str:
    """The pool's key of a client: its DUID and its first IA_NA's IAID."""
    iaid = msg.ia_na_iaids[0] if msg.ia_na_iaids else b""
    return (msg.client_id or b"").hex() + "-" + iaid.hex()


def requested_address(msg: dhcp6.Dhcp6Message) -> str | None:
    """The first IA Address inside the client's first IA_NA."""
    for value in msg.all(dhcp6.OPT_IA_NA)[:1]:
        for code, inner in dhcp6.options_of(value, 12):
            if code == dhcp6.OPT_IAADDR and len(inner) >= 24:
                return str(ipaddress.IPv6Address(inner[:16]))
    return None


OPT_CLIENT_LINKLAYER_ADDR = 79       # RFC 6939, added by relays
#: bind an address the host does not (yet) have: one in duplicate address
#: detection at start (Linux; IPv6 sockets honour it at SOL_IP too)
IP_FREEBIND = getattr(socket, "IP_FREEBIND", 15)


def client_mac(msg: dhcp6.Dhcp6Message, relay: dhcp6.RelayMessage | None,
               source: str) -> str:
    """The client's MAC, for the boot timeline: from a DUID-LLT/-LL of
    Ethernet, else the relay's client link-layer address option (RFC
    6939), else an EUI-64 link-local source address; "" when none says."""
    duid = msg.client_id or b""
    if len(duid) >= 4 and duid[2:4] == b"\x00\x01":
        kind = struct.unpack("!H", duid[:2])[0]
        raw = duid[8:14] if kind == 1 else duid[4:10] if kind == 3 else b""
        if len(raw) == 6:
            return ":".join(f"{b:02x}" for b in raw)
    if relay is not None:
        for code, value in relay.options:
            if code == OPT_CLIENT_LINKLAYER_ADDR and len(value) == 8 and value[:2] == b"\x00\x01":
                return ":".join(f"{b:02x}" for b in value[2:])
    try:
        addr = ipaddress.IPv6Address(source.split("%")[0])
    except ValueError:
        return ""
    iid = addr.packed[8:]
    if addr.is_link_local and iid[3:5] == b"\xff\xfe":
        mac = bytes([iid[0] ^ 0x02]) + iid[1:3] + iid[5:8]
        return ":".join(f"{b:02x}" for b in mac)
    return ""


class _Protocol(asyncio.DatagramProtocol):
    def __init__(self, service: Dhcp6Service, port: int) -> None:
        self.service = service
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self.service.handle(data, addr, self.port, self)
        except Exception:      # one bad datagram never stops the loop
            log.exception("dhcp6: unexpected error on a datagram from %s", addr)
            self.service.metrics.inc("dhcp6_dropped_total", reason="internal_error")


class Dhcp6Service:
    def __init__(self, settings: Dhcp6Settings, *, store: Store | None = None,
                 keys: Keys | None = None, idc: str = "", metrics: Registry | None = None,
                 server_duid: bytes | None = None, timeline: Any = None) -> None:
        self.settings = settings
        self.timeline = timeline
        self.metrics = metrics or Registry()
        self.server_duid = server_duid or interface_duid(settings.interface)
        self.pool: LeasePool | None = None
        self.writer: LeaseWriter | None = None
        if settings.mode == "full":
            if settings.range is None:
                raise ValueError("DHCPv6 full mode needs an address range")
            if store is not None and keys is not None:
                self.writer = LeaseWriter(store, keys, idc, family=6,
                                          on_loaded=self._on_loaded)
            self.pool = LeasePool(settings.range[0], settings.range[1], settings.lease_time,
                                  sink=self.writer)
        self._transports: list[asyncio.DatagramTransport] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        for name, help_text in (
                ("dhcp6_packets_in_total", "DHCPv6 messages received, by message type"),
                ("dhcp6_answers_total", "DHCPv6 answers sent, by message type"),
                ("dhcp6_dropped_total", "DHCPv6 datagrams dropped or left unanswered, by "
                                        "reason")):
            self.metrics.describe(name, help_text)

    # -- sockets ------------------------------------------------------------------------
    def _socket(self, port: int) -> socket.socket:
        ifindex = socket.if_nametoindex(self.settings.interface)
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE,
                     self.settings.interface.encode())
        address = self._bind_address(port)
        if address != "::":
            s.setsockopt(socket.SOL_IP, IP_FREEBIND, 1)
        s.bind((address, port))
        if port == self.settings.listen_port:
            group = socket.inet_pton(socket.AF_INET6, dhcp6.ALL_SERVERS)
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP,
                         group + struct.pack("@I", ifindex))
        s.setblocking(False)
        return s

    def _bind_address(self, port: int) -> str:
        """Port 4011 on the node's address the boot file URLs name: EDK2 asks
        that host there and takes a REPLY from that address only, and a
        wildcard socket would answer from whichever address the kernel picks
        (an interface's SLAAC address, as often as not).  Port 547: ``::``.
        The socket is bound with ``IP_FREEBIND`` (see :meth:`_socket`), so an
        address still in duplicate address detection at start is no reason
        to answer from any address for the node's whole life."""
        address = self.settings.policy.tftp_address
        if port != self.settings.proxy_port or not address:
            return "::"
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind((address, 0))
            except OSError as exc:
                log.warning("dhcp6: %s is not on this host yet (%s): port %d is bound to it "
                            "anyway (IP_FREEBIND) and answers once the address is up; check "
                            "--dhcp6-address if it never comes", address, exc.strerror, port)
        return address

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        # the boot service port in both modes: EDK2's PXE takes any offer with
        # PXEClient for a BINL offer, full mode's too, and asks the boot file
        # URL's host again there (a REQUEST to port 4011) before it boots
        ports = [self.settings.listen_port, self.settings.proxy_port]
        for port in ports:
            transport, _ = await self._loop.create_datagram_endpoint(
                self._factory(port), sock=self._socket(port))
            self._transports.append(transport)  # type: ignore[arg-type]
        if self.writer is not None:
            self.writer.start()
        log.info("dhcp6: %s mode on %s, ports %s", self.settings.mode,
                 self.settings.interface, ports)

    def _factory(self, port: int) -> Any:
        return lambda: _Protocol(self, port)

    async def stop(self) -> None:
        for t in self._transports:
            t.close()
        if self.writer is not None:
            self.writer.stop()

    def _on_loaded(self, leases: list[Any]) -> None:
        loop = self._loop
        if loop is not None and self.pool is not None:
            pool = self.pool
            loop.call_soon_threadsafe(lambda: pool.adopt(leases))

    # -- one datagram -------------------------------------------------------------------
    def handle(self, data: bytes, addr: Any, port: int, proto: _Protocol) -> None:
        try:
            msg = dhcp6.parse_message(data)
        except dhcp6.MalformedMessage as exc:
            self.metrics.inc("dhcp6_dropped_total", reason=exc.reason)
            log.debug("dhcp6: dropped from %s: %s", addr[0], exc)
            return
        relay = msg if isinstance(msg, dhcp6.RelayMessage) else None
        client = relay.client_message if relay is not None else msg
        assert isinstance(client, dhcp6.Dhcp6Message)
        self.metrics.inc("dhcp6_packets_in_total", type=client.name)
        decision = self.decide(client, port)
        if not isinstance(decision, Answer6):
            self.metrics.inc("dhcp6_dropped_total", reason=decision.reason)
            log.debug("dhcp6: no answer to %s from %s: %s", client.name, addr[0],
                      decision.reason)
            return
        payload = decision.payload
        if relay is not None:
            payload = dhcp6.build_relay_reply(relay, payload)
            dest = (addr[0], self.settings.listen_port, 0, addr[3] if len(addr) > 3 else 0)
        elif port == self.settings.proxy_port:
            dest = addr
        else:
            dest = (addr[0], self.settings.client_port, 0, addr[3] if len(addr) > 3 else 0)
        assert proto.transport is not None
        proto.transport.sendto(payload, dest)
        also = self._leased_elsewhere(client, relay, port, str(addr[0]))
        if also is not None:
            proto.transport.sendto(payload, (also, dest[1], 0, 0))
        kind = dhcp6.MESSAGE_NAMES.get(decision.msg_type, "?")
        self.metrics.inc("dhcp6_answers_total", type=kind)
        if self.timeline is not None and decision.boot is not None:
            mac = client_mac(client, relay, str(addr[0]))
            detail: dict[str, Any] = {"type": kind, "url": decision.boot.url, "ipv6": True,
                                      "arch": decision.boot.answer.arch,
                                      "relayed": relay is not None}
            if decision.lease is not None:
                detail["address"] = decision.lease.address
                if mac:     # how the timeline joins the TFTP and HTTP entries of that address
                    detail.update(mac=mac, ip=decision.lease.address)
            try:
                self.timeline.record(mac or client_key(client), "dhcp6", detail)
            except Exception:     # the sink must never break the loop
                log.exception("dhcp6: timeline sink failed")

    def _leased_elsewhere(self, client: dhcp6.Dhcp6Message, relay: Any, port: int,
                          source: str) -> str | None:
        """The address full mode leased to a client whose port-4011 REQUEST came
        from another of its addresses, else ``None``.  EDK2 reads the REPLY to
        its BINL REQUEST on its leased address only (``PxeBcDhcp6Discover``:
        ``UdpRead`` with that destination), while the REQUEST may leave from its
        SLAAC address: the REPLY goes to both."""
        if self.pool is None or relay is not None or port != self.settings.proxy_port:
            return None
        # the REQUEST carries no IA_NA (EDK2 drops it): the lease of its DUID, any IAID
        prefix = (client.client_id or b"").hex() + "-"
        if prefix == "-":
            return None
        for key in [k for k in self.pool.by_mac if k.startswith(prefix)][:4]:
            lease = self.pool.lease_of(key)
            if lease is not None and lease.ip != source:
                return str(lease.ip)
        return None

    def decide(self, msg: dhcp6.Dhcp6Message, port: int) -> Any:
        policy = self.settings.policy
        if self.pool is None or port == self.settings.proxy_port:
            return answer_proxy(msg, policy, self.server_duid, port=port)
        key = client_key(msg)
        lease: Lease6 | None = None
        if msg.msg_type == dhcp6.SOLICIT:
            got = self.pool.offer(key, requested_address(msg))
            lease = Lease6(got.ip, self.settings.lease_time,
                           self.settings.lease_time * 2) if got else None
        elif msg.msg_type in (dhcp6.REQUEST, dhcp6.RENEW, dhcp6.REBIND):
            server_id = msg.get(dhcp6.OPT_SERVERID)
            if server_id is not None and server_id != self.server_duid:
                return answer_full(msg, policy, self.server_duid, None)   # not ours
            current = self.pool.lease_of(key)
            wanted = requested_address(msg) or (current.ip if current else None)
            if wanted is not None:
                grant = self.pool.request(key, requested=wanted, ciaddr="0.0.0.0",
                                          server_id=None, our_id="")
                if grant.action == "ack" and grant.lease is not None:
                    lease = Lease6(grant.lease.ip, self.settings.lease_time,
                                   self.settings.lease_time * 2)
        elif msg.msg_type in (dhcp6.RELEASE, dhcp6.DECLINE):
            addr = requested_address(msg)
            if addr is not None:
                if msg.msg_type == dhcp6.RELEASE:
                    self.pool.release(key, addr)
                else:
                    self.pool.decline(key, addr)
        return answer_full(msg, policy, self.server_duid, lease)


def first_global_address(interface: str) -> str:
    """The interface's first global IPv6 address ("" when it has none)."""
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        return ""
    for line in lines:
        parts = line.split()
        if len(parts) >= 6 and parts[5] == interface and parts[3] == "00":   # scope global
            return ipaddress.IPv6Address(bytes.fromhex(parts[0])).compressed
    return ""


def advertise6(config: Any) -> tuple[str, str, str]:
    """``(interface, address, url)`` of the node's IPv6 boot: the interface
    DHCPv6 serves, the IPv6 address TFTP URLs name (``--dhcp6-address``,
    else the interface's first global one) and the boot HTTP base URL
    machines booting over IPv6 get (``--dhcp6-advertise-url``, else
    ``http://[ADDRESS]:HTTP_PORT``; "" without an address)."""
    interface = config.get("dhcp6.interface") or config.get("regional.interface")
    if not interface:
        raise ValueError("DHCPv6 needs --dhcp6-interface (or --interface)")
    address = config.get("dhcp6.address") or first_global_address(interface)
    url = (config.get("dhcp6.advertise_url") or
           (f"http://[{address}]:{config.get('http.port', 8081)}" if address else "")).rstrip("/")
    return interface, address, url


def node_service(ctx: Any) -> Dhcp6Service:
    """The service of ``lpmos regional`` (``--dhcp6-mode proxy|full``): the
    node's boot files and URLs, its metrics, timeline and etcd."""
    from bootsvc.policy.bootfile import BootPolicy

    config = ctx.config
    interface, address, url = advertise6(config)
    boot = BootPolicy(bootfiles={"bios": config.get("dhcp.bootfile_bios"),
                                 "efi32": config.get("dhcp.bootfile_efi32"),
                                 "efi64": config.get("dhcp.bootfile_efi64"),
                                 "arm64": config.get("dhcp.bootfile_arm64")},
                      script_url=f"{url}/boot.ipxe" if url else "",
                      http_base=f"{url}/ipxe" if url else "")
    settings = Dhcp6Settings(
        interface=interface, policy=Boot6Policy(boot, address or ""),
        mode=config["dhcp6.mode"], range=config.get("dhcp6.range"),
        lease_time=int(config["dhcp6.lease_time"]), listen_port=int(config["dhcp6.port"]),
        client_port=int(config["dhcp6.client_port"]),
        proxy_port=int(config["dhcp6.proxy_port"]))
    return Dhcp6Service(settings, store=ctx.store, keys=ctx.keys, idc=ctx.idc,
                        metrics=ctx.metrics, timeline=ctx.timeline)
