"""One DHCP datagram in, at most one reply out: the ProxyDHCP and lab DHCP answer.

:class:`DhcpResponder` parses strictly (:func:`bootsvc.wire.dhcp.parse_packet`),
filters (relays, allow-list, known machines), decides the boot answer with
the pure :func:`bootsvc.policy.bootfile.decide_bootfile`, allocates addresses
in lab mode (:class:`bootsvc.state.dhcp_leases.LeasePool`) and builds the
reply.  No sockets and no waiting: everything comes from memory, because
iPXE gives up on a ProxyDHCP answer after about 2 s.  Every datagram not
answered is counted with a reason (docs/reliability.md, L4).

Protocol choices (PXE 2.1, and pixiecore's documented approach):

* proxy mode never offers an address (yiaddr 0.0.0.0); the OFFER carries
  option 60 ``PXEClient`` (``HTTPClient`` for UEFI HTTP boot), option 54
  and siaddr = our address, option 97 echoed;
* BIOS PXE ROMs get option 43 with PXE_DISCOVERY_CONTROL = 8 ("boot the
  file in this offer, skip boot server discovery");
* UEFI PXE firmware gets no option 43: many UEFI ROMs ignore a ProxyDHCP
  offer that bypasses discovery, but all of them then ask the boot server
  on port 4011 with a DHCPREQUEST, which is answered with a DHCPACK
  carrying the boot file (iPXE also asks there before it boots);
* replies go to the relay (``giaddr``) only when it is a configured relay,
  else to the client's source address when it has one, else broadcast
  (:func:`decide_dest`); option 82 is echoed only to a configured relay and
  otherwise ignored;
* lab mode ("full") also assigns addresses; boot clients get the boot file
  in the same OFFER/ACK (``file``/siaddr/option 66, as ``dhcp-boot`` does
  in dnsmasq), other clients only the address.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bootsvc.dhcp.settings import DhcpSettings, PortKind
from bootsvc.policy.bootfile import (
    HTTP_CLIENT,
    BootAnswer,
    BootRefusal,
    ClientInfo,
    decide_bootfile,
)
from bootsvc.state.dhcp_leases import Lease, LeasePool
from bootsvc.wire import dhcp
from lpmos.config import Config

_CACHE_MAX = 1024            # memoized decisions / reply templates before a reset

CounterKey = tuple[str, tuple[tuple[str, str], ...]]


@dataclass(frozen=True, slots=True)
class Reply:
    """One datagram to send, and what it was (for metrics and the timeline)."""

    data: bytes
    dest: tuple[str, int]
    msg_type: int
    mac: str
    detail: dict[str, Any]


class Counters:
    """DHCP counters as (metric, labels) → n, moved to a
    :class:`lpmos.metrics.Registry` by :meth:`flush` once per batch of
    datagrams rather than once per packet (the label keys of the per-packet
    counters are built once per combination)."""

    def __init__(self) -> None:
        self.counts: dict[CounterKey, float] = {}
        self._keys: dict[Any, CounterKey] = {}

    def count(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0) + 1

    def count_packet(self, name: str, msg_type: int, kind: PortKind) -> None:
        """``name``{type, port}."""
        cache_key = (name, msg_type, kind)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = (name, (
                ("port", kind), ("type", dhcp.MESSAGE_NAMES.get(msg_type, "other"))))
        self.counts[key] = self.counts.get(key, 0) + 1

    def drop(self, reason: str) -> None:
        """``dhcp_dropped_total``{reason}: a datagram not answered."""
        key = self._keys.get(reason)
        if key is None:
            key = self._keys[reason] = ("dhcp_dropped_total", (("reason", reason),))
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, registry: Any) -> None:
        counts, self.counts = self.counts, {}
        for (name, labels), n in counts.items():
            registry.inc(name, n, **dict(labels))


# --- pure parts of a reply ----------------------------------------------------------


def decide_dest(giaddr: str, src: tuple[str, int], relayed: bool, relay_port: int,
                msg_type: int) -> tuple[str, int]:
    """Where a reply goes: to the relay ``giaddr`` on the DHCP port when the
    request was relayed (only configured relays get this far), else to the
    client's source address, or broadcast when the client has none yet or
    the reply is a NAK (a client being refused its address may not hold it)."""
    if relayed:
        return giaddr, relay_port
    src_ip, src_port = src
    if msg_type == dhcp.NAK or src_ip == dhcp.ZERO_IP:
        return dhcp.BROADCAST_IP, src_port
    return src_ip, src_port


def lease_options(settings: DhcpSettings) -> dict[int, bytes]:
    """The options every lab-mode address reply carries: netmask, and the
    router and DNS servers when set."""
    options: dict[int, bytes] = {dhcp.OPT_SUBNET_MASK: dhcp.ip_bytes(settings.netmask)}
    if settings.router:
        options[dhcp.OPT_ROUTER] = dhcp.ip_bytes(settings.router)
    if settings.dns:
        options[dhcp.OPT_DNS] = dhcp.ips_bytes(list(settings.dns))
    return options


def parse_boot_item(pkt: dhcp.DhcpPacket) -> bytes | None:
    """The PXE boot item (option 43 sub-option 71) of a boot server request,
    or ``None`` when absent or malformed."""
    vendor = pkt.options.get(dhcp.OPT_VENDOR_SPECIFIC)
    if not vendor:
        return None
    try:
        item = dhcp.parse_options(vendor, require_end=False).get(dhcp.PXE_BOOT_ITEM)
    except dhcp.MalformedPacket:
        return None
    return item if item is not None and len(item) == 4 else None


def put_boot(reply: dhcp.DhcpPacket, options: dict[int, bytes], answer: BootAnswer,
             server_ip: str) -> None:
    """Name the boot file in ``reply``: siaddr is us; the name goes in the
    ``file`` field when it fits (127 bytes and a NUL), else in option 67."""
    name = answer.filename.encode()
    reply.siaddr = server_ip
    if len(name) <= 127:
        reply.file = name
    else:
        options[dhcp.OPT_BOOTFILE] = name


def echo_options(pkt: dhcp.DhcpPacket, options: dict[int, bytes], relayed: bool) -> None:
    """Per-client options that close every reply: 97 echoed, 82 echoed
    to a configured relay only."""
    uuid = pkt.options.get(dhcp.OPT_CLIENT_UUID)
    if uuid is not None:
        options[dhcp.OPT_CLIENT_UUID] = uuid
    if relayed and dhcp.OPT_RELAY_AGENT in pkt.options:
        options[dhcp.OPT_RELAY_AGENT] = pkt.options[dhcp.OPT_RELAY_AGENT]


def build_boot_packet(msg_type: int, answer: BootAnswer, server_ip: str, *, port67: bool,
                      boot_item: bytes | None = None) -> dhcp.DhcpPacket:
    """The per-answer part of a ProxyDHCP OFFER (port 67) or boot-server
    ACK (port 4011): everything but the client's own fields."""
    options: dict[int, bytes] = {
        dhcp.OPT_MESSAGE_TYPE: bytes((msg_type,)),
        dhcp.OPT_SERVER_ID: dhcp.ip_bytes(server_ip),
        dhcp.OPT_VENDOR_CLASS: answer.vendor_class.encode(),
    }
    if port67 and answer.kind == "tftp" and answer.family == "bios":
        options[dhcp.OPT_VENDOR_SPECIFIC] = dhcp.PXE_BYPASS_DISCOVERY
    elif boot_item is not None:        # a PXE boot server request: echo the item
        options[dhcp.OPT_VENDOR_SPECIFIC] = dhcp.pxe_vendor_options(
            {dhcp.PXE_BOOT_ITEM: boot_item})
    reply = dhcp.DhcpPacket(dhcp.BOOTREPLY, sname=server_ip.encode(), options=options)
    put_boot(reply, options, answer, server_ip)
    return reply


def _base_reply(pkt: dhcp.DhcpPacket, msg_type: int, server_ip: str,
                relayed: bool) -> tuple[dhcp.DhcpPacket, dict[int, bytes]]:
    options: dict[int, bytes] = {
        dhcp.OPT_MESSAGE_TYPE: bytes((msg_type,)),
        dhcp.OPT_SERVER_ID: dhcp.ip_bytes(server_ip),
    }
    reply = dhcp.DhcpPacket(dhcp.BOOTREPLY, pkt.xid, pkt.chaddr, 0,
                            pkt.flags | (dhcp.FLAG_BROADCAST if relayed else 0),
                            giaddr=pkt.giaddr, options=options)
    return reply, options


# --- the responder ------------------------------------------------------------------


class DhcpResponder:
    """Decides the reply to one datagram.  Single-threaded (the DHCP loop).

    ``settings`` are the DHCP settings, or a resolved config to read them
    from.  Counters accumulate in :attr:`counters` until the caller flushes
    them.
    """

    def __init__(self, settings: DhcpSettings | Config, *, server_ip: str, advertise_url: str,
                 known_mac: Callable[[str], bool] | None = None,
                 pool: LeasePool | None = None) -> None:
        if isinstance(settings, Config):
            settings = DhcpSettings.from_config(settings)
        self.mode: str = settings.mode
        self.server_ip = server_ip
        self.policy = settings.policy(advertise_url)
        self.relays = settings.relays
        self.relay_port = settings.port
        self.allow = settings.allow_macs
        self.known_only = settings.known_only
        self.known_mac = known_mac
        self.pool = pool
        self._lease_opts = lease_options(settings)
        self.counters = Counters()
        # decide_bootfile is pure: its answers are memoized per client kind, and
        # the encoded part of each boot reply is kept as a template (both
        # bounded; the key space is small: architectures x classes x kinds)
        self._decisions: dict[ClientInfo, BootAnswer | BootRefusal] = {}
        self._templates: dict[tuple[Any, ...], dhcp.ReplyTemplate] = {}

    def drop(self, reason: str) -> None:
        self.counters.drop(reason)

    # -- entry point
    def handle(self, data: bytes, src: tuple[str, int], kind: PortKind = "dhcp",
               local_ip: str | None = None) -> Reply | None:
        """The reply to ``data`` received from ``src`` on the DHCP (67) or
        boot-server (4011) socket, or ``None`` (the reason is counted)."""
        try:
            pkt = dhcp.parse_packet(data)
        except dhcp.MalformedPacket as exc:
            self.drop(exc.reason)
            return None
        if pkt.op != dhcp.BOOTREQUEST:
            self.drop("not_request")
            return None
        mt = pkt.msg_type
        if mt is None:
            self.drop("bootp")
            return None
        self.counters.count_packet("dhcp_packets_in_total", mt, kind)
        server_ip = self.server_ip or local_ip
        if not server_ip:
            self.drop("no_server_ip")
            return None
        relayed = pkt.giaddr != dhcp.ZERO_IP
        if relayed and pkt.giaddr not in self.relays:
            self.drop("relay_not_allowed")
            return None
        if not relayed and dhcp.OPT_RELAY_AGENT in pkt.options:
            self.counters.count("dhcp_option82_ignored_total")
        if kind == "proxy":
            return self._boot_server(pkt, src, server_ip, relayed)
        if self.mode == "full":
            return self._full(pkt, src, server_ip, relayed)
        return self._proxy(pkt, src, server_ip, relayed)

    # -- filters
    def _allowed(self, mac: str) -> bool:
        if self.allow and mac not in self.allow:
            self.drop("mac_not_allowed")
            return False
        if self.known_only and (self.known_mac is None or not self.known_mac(mac)):
            self.drop("unknown_machine")
            return False
        return True

    def _decide(self, pkt: dhcp.DhcpPacket) -> BootAnswer | BootRefusal:
        info = ClientInfo.from_packet(pkt)
        decision = self._decisions.get(info)
        if decision is None:
            if len(self._decisions) >= _CACHE_MAX:
                self._decisions.clear()
            decision = self._decisions[info] = decide_bootfile(info, self.policy)
        return decision

    # -- boot modes: proxy (67) and boot server (4011)
    def _proxy(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
               relayed: bool) -> Reply | None:
        mt = pkt.msg_type
        if mt != dhcp.DISCOVER:
            # REQUESTs on 67 select the site server's address offer; a proxy
            # never ACKs them (an ACK without an address would confuse a
            # plain DHCP client that picked our offer).  Boot-server requests
            # come to port 4011.
            self.drop("not_for_us" if mt == dhcp.REQUEST else "ignored_type")
            return None
        decision = self._boot_answer(pkt)
        if decision is None:
            return None
        return self._boot_reply(pkt, src, server_ip, relayed, dhcp.OFFER, decision, port67=True)

    def _boot_server(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                     relayed: bool) -> Reply | None:
        if pkt.msg_type not in (dhcp.REQUEST, dhcp.INFORM):
            self.drop("ignored_type")
            return None
        decision = self._boot_answer(pkt)
        if decision is None:
            return None
        return self._boot_reply(pkt, src, server_ip, relayed, dhcp.ACK, decision, port67=False)

    def _boot_answer(self, pkt: dhcp.DhcpPacket) -> BootAnswer | None:
        """The boot answer for a client both boot modes would serve, or
        ``None`` after counting why not (refused by the decision, or a MAC
        the filters do not allow)."""
        decision = self._decide(pkt)
        if isinstance(decision, BootRefusal):
            self.drop(decision.reason)
            return None
        if not self._allowed(pkt.mac):
            return None
        return decision

    # -- lab mode: addresses, and the boot file for boot clients
    def _full(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
              relayed: bool) -> Reply | None:
        pool = self.pool
        assert pool is not None
        mt = pkt.msg_type
        mac = pkt.mac
        if not self._allowed(mac):
            return None
        answer = self._lab_boot_answer(pkt)
        if mt == dhcp.DISCOVER:
            lease = pool.offer(mac, pkt.requested_ip)
            if lease is None:
                self.drop("pool_exhausted")
                return None
            return self._address_reply(pkt, src, server_ip, relayed, dhcp.OFFER, lease, answer)
        if mt == dhcp.REQUEST:
            return self._lab_request(pkt, src, server_ip, relayed, answer)
        if mt == dhcp.DECLINE:
            if pkt.server_id in (None, server_ip):
                self.counters.count("dhcp_declined_total",
                                    result="ok" if pool.decline(mac, pkt.requested_ip)
                                    else "unknown")
            return None
        if mt == dhcp.RELEASE:
            if pkt.server_id in (None, server_ip):
                self.counters.count("dhcp_released_total",
                                    result="ok" if pool.release(mac, pkt.ciaddr) else "unknown")
            return None
        if mt == dhcp.INFORM:
            return self._address_reply(pkt, src, server_ip, relayed, dhcp.ACK, None, answer)
        self.drop("ignored_type")
        return None

    def _lab_boot_answer(self, pkt: dhcp.DhcpPacket) -> BootAnswer | None:
        """The boot part of a lab-mode reply, ``None`` for a client that gets
        only an address (a boot client refused is counted)."""
        decision = self._decide(pkt)
        if isinstance(decision, BootRefusal):
            if decision.reason != "not_boot_client":
                self.counters.count("dhcp_boot_refused_total", reason=decision.reason)
            return None
        return decision

    def _lab_request(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                     relayed: bool, answer: BootAnswer | None) -> Reply | None:
        assert self.pool is not None
        hostname = pkt.options.get(dhcp.OPT_HOSTNAME, b"")[:63].decode("ascii", "replace")
        grant = self.pool.request(pkt.mac, requested=pkt.requested_ip, ciaddr=pkt.ciaddr,
                                  server_id=pkt.server_id, our_id=server_ip,
                                  hostname=hostname)
        if grant.action == "ack":
            assert grant.lease is not None
            return self._address_reply(pkt, src, server_ip, relayed, dhcp.ACK, grant.lease,
                                       answer)
        if grant.action == "nak":
            self.counters.count("dhcp_nak_total", reason=grant.reason)
            return self._nak(pkt, src, server_ip, relayed, grant.reason)
        self.drop(grant.reason)
        return None

    # -- building replies
    def _dest(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], relayed: bool,
              msg_type: int) -> tuple[str, int]:
        return decide_dest(pkt.giaddr, src, relayed, self.relay_port, msg_type)

    def boot_packet(self, msg_type: int, answer: BootAnswer, server_ip: str, *, port67: bool,
                    boot_item: bytes | None = None) -> dhcp.DhcpPacket:
        """:func:`build_boot_packet`: the part of a boot reply kept as a template."""
        return build_boot_packet(msg_type, answer, server_ip, port67=port67,
                                 boot_item=boot_item)

    def _boot_reply(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                    relayed: bool, msg_type: int, answer: BootAnswer, *, port67: bool) -> Reply:
        item = None if port67 else parse_boot_item(pkt)
        key = (msg_type, answer, server_ip, port67, item)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= _CACHE_MAX:
                self._templates.clear()
            template = self._templates[key] = dhcp.ReplyTemplate(
                build_boot_packet(msg_type, answer, server_ip, port67=port67, boot_item=item))
        tail: dict[int, bytes] = {}
        echo_options(pkt, tail, relayed)
        data = template.render(
            pkt.xid, pkt.chaddr, pkt.flags | (dhcp.FLAG_BROADCAST if relayed else 0),
            dhcp.ip_bytes(dhcp.ZERO_IP if port67 else pkt.ciaddr), dhcp.ip_bytes(pkt.giaddr),
            dhcp.encode_options(tail, end=False) if tail else b"")
        return Reply(data, self._dest(pkt, src, relayed, msg_type), msg_type, pkt.mac,
                     {"kind": answer.kind, "file": answer.filename, "arch": answer.arch})

    def _address_reply(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                       relayed: bool, msg_type: int, lease: Lease | None,
                       answer: BootAnswer | None) -> Reply:
        reply, options = _base_reply(pkt, msg_type, server_ip, relayed)
        detail: dict[str, Any] = {}
        if lease is not None:
            reply.yiaddr = lease.ip
            remaining = max(1, int(lease.expires - (self.pool.clock() if self.pool else 0)))
            options[dhcp.OPT_LEASE_TIME] = dhcp.u32(remaining)
            options[dhcp.OPT_RENEWAL_T1] = dhcp.u32(remaining // 2)
            options[dhcp.OPT_REBINDING_T2] = dhcp.u32(remaining * 7 // 8)
            detail["ip"] = lease.ip
        else:
            reply.ciaddr = pkt.ciaddr
        options.update(self._lease_opts)
        if answer is not None:
            if answer.vendor_class == HTTP_CLIENT:
                options[dhcp.OPT_VENDOR_CLASS] = answer.vendor_class.encode()
            options[dhcp.OPT_TFTP_SERVER] = server_ip.encode()
            put_boot(reply, options, answer, server_ip)
            detail.update(kind=answer.kind, file=answer.filename, arch=answer.arch)
        echo_options(pkt, options, relayed)
        return Reply(dhcp.build_packet(reply), self._dest(pkt, src, relayed, msg_type), msg_type,
                     pkt.mac, detail)

    def _nak(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str, relayed: bool,
             reason: str) -> Reply:
        reply, options = _base_reply(pkt, dhcp.NAK, server_ip, relayed)
        options[dhcp.OPT_MESSAGE] = reason.replace("_", " ").encode()
        return Reply(dhcp.build_packet(reply), self._dest(pkt, src, relayed, dhcp.NAK), dhcp.NAK,
                     pkt.mac, {"nak": reason})
