"""The regional node's ProxyDHCP (UDP 67 and 4011) and lab-mode DHCP server.

Two layers:

* :class:`DhcpResponder` turns one datagram into at most one reply.  It
  parses strictly (:func:`bootsvc.wire.dhcp.parse_packet`), filters (relays,
  allow-list, known machines), decides the boot answer with the pure
  :func:`bootsvc.policy.bootfile.decide_bootfile`, allocates addresses in lab mode
  (:class:`bootsvc.state.dhcp_leases.LeasePool`) and builds the reply.  No
  sockets, no waiting: everything comes from memory, because iPXE gives up
  on a ProxyDHCP answer after about 2 s.  Every drop is counted with a
  reason (RELIABILITY L4).
* :class:`DhcpService` owns the UDP sockets on the asyncio loop, reads them
  in bounded batches, sends the replies, records answers on the machine
  timeline and moves the responder's counters into ``ctx.metrics``.

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
  else to the client's source address when it has one, else broadcast;
  option 82 is echoed only to a configured relay and otherwise ignored;
* lab mode ("full") also assigns addresses; boot clients get the boot file
  in the same OFFER/ACK (``file``/siaddr/option 66, as ``dhcp-boot`` does
  in dnsmasq), other clients only the address;
* the sockets always bind 0.0.0.0 (see :func:`decide_bind`): Linux delivers
  a broadcast DISCOVER only to a socket bound to the wildcard, so a unicast
  ``--listen`` becomes the identity we answer as, not the bind address.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import gc
import ipaddress
import json
import logging
import signal
import socket
import struct
import sys
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from bootsvc.netif import default_server_ip, read_address_interface
from bootsvc.policy.bootfile import (
    HTTP_CLIENT,
    BootAnswer,
    BootPolicy,
    BootRefusal,
    ClientInfo,
    decide_bootfile,
    parse_bootfile,
)
from bootsvc.settings import listen_address
from bootsvc.state.dhcp_leases import Lease, LeasePool, LeaseWriter, parse_range
from bootsvc.wire import dhcp
from lpmos.config import (
    Config,
    ConfigError,
    Setting,
    choice,
    int_range,
    parse_bool,
    parse_ip,
    parse_optional_ip,
    str_list,
)
from lpmos.models import ValidationError, normalize_mac

if TYPE_CHECKING:
    from bootsvc.context import NodeContext

log = logging.getLogger(__name__)


# --- settings ---------------------------------------------------------------------


def _ip_list(raw: Any) -> list[str]:
    return [parse_ip(x) for x in str_list(raw)]


def _mac_list(raw: Any) -> list[str]:
    try:
        return [normalize_mac(x) for x in str_list(raw)]
    except ValidationError:
        raise ValueError("a comma list of MAC addresses such as 52:54:00:12:34:56") from None


def _netmask(raw: Any) -> str:
    text = parse_ip(raw)
    try:
        ipaddress.IPv4Network(f"0.0.0.0/{text}")
    except ValueError:
        raise ValueError("an IPv4 netmask such as 255.255.255.0") from None
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("dhcp.mode", "--dhcp-mode", "proxy", choice("proxy", "full", "off"),
            "proxy: answer only the boot part next to the site's DHCP server; full: lab mode, "
            "also hand out addresses from --dhcp-range; off: no DHCP"),
    Setting("dhcp.port", "--dhcp-port", 67, int_range(0, 65535),
            "UDP port of the DHCP/ProxyDHCP socket (clients use 67; 0 picks a free port, "
            "for tests)", metavar="PORT"),
    Setting("dhcp.proxy_port", "--dhcp-proxy-port", 4011, int_range(0, 65535),
            "UDP port of the PXE boot server that UEFI firmware and iPXE ask after the "
            "ProxyDHCP offer (clients use 4011; 0 disables it)", metavar="PORT"),
    Setting("dhcp.range", "--dhcp-range", None, parse_range,
            "lab mode: the address pool, FIRST-LAST such as 10.77.0.100-10.77.0.200",
            metavar="A-B"),
    Setting("dhcp.netmask", "--dhcp-netmask", "255.255.255.0", _netmask,
            "lab mode: subnet mask handed out (option 1)", metavar="MASK"),
    Setting("dhcp.router", "--dhcp-router", None, parse_optional_ip,
            "lab mode: default gateway handed out (option 3)", metavar="IP"),
    Setting("dhcp.dns", "--dhcp-dns", [], _ip_list,
            "lab mode: DNS servers handed out (option 6), comma list", metavar="IPS"),
    Setting("dhcp.lease_time", "--dhcp-lease-time", 3600, int_range(60, 7 * 86400),
            "lab mode: lease duration in seconds", metavar="SECONDS"),
    Setting("dhcp.allow_macs", "--dhcp-allow-macs", [], _mac_list,
            "answer only these MACs (comma list); empty answers every MAC", metavar="MACS"),
    Setting("dhcp.known_only", "--dhcp-known-only", False, parse_bool,
            "answer only machines known in etcd (a task or server record with that MAC)",
            metavar="BOOL"),
    Setting("dhcp.relays", "--dhcp-relays", [], _ip_list,
            "DHCP relay agents (giaddr) that may forward requests; packets from any other "
            "giaddr are dropped, and replies never go to an unlisted giaddr", metavar="IPS"),
    Setting("dhcp.bootfile_bios", "--dhcp-bootfile-bios", "undionly.kpxe", parse_bootfile,
            "TFTP boot file for BIOS PXE clients (arch 0); none: do not answer them",
            metavar="FILE"),
    Setting("dhcp.bootfile_efi32", "--dhcp-bootfile-efi32", None, parse_bootfile,
            "boot file for 32-bit UEFI clients (arch 6, HTTP boot 15), an i386 EFI build of "
            "iPXE you put under the TFTP root (the x86-64 ipxe.efi does not run there); "
            "none (default): do not answer them", metavar="FILE"),
    Setting("dhcp.bootfile_efi64", "--dhcp-bootfile-efi64", "ipxe.efi", parse_bootfile,
            "boot file for x86-64 UEFI clients (arch 7, 9; HTTP boot 16), e.g. snponly.efi; "
            "none: do not answer", metavar="FILE"),
    Setting("dhcp.bootfile_arm64", "--dhcp-bootfile-arm64", None, parse_bootfile,
            "boot file for arm64 UEFI clients (arch 11, HTTP boot 19); none (default): do not "
            "answer them", metavar="FILE"),
    Setting("dhcp.rcvbuf", "--dhcp-rcvbuf", 4 * 1024 * 1024, int_range(65536, 256 * 1024 * 1024),
            "socket receive buffer in bytes (a burst of simultaneous DISCOVERs must fit)",
            metavar="BYTES"),
)


def policy_from_config(config: Config, advertise_url: str) -> BootPolicy:
    """The boot policy the settings describe."""
    base = advertise_url.rstrip("/")
    return BootPolicy(
        bootfiles={family: config.get(f"dhcp.bootfile_{family}")
                   for family in ("bios", "efi32", "efi64", "arm64")},
        script_url=f"{base}/boot.ipxe" if base else "",
        http_base=f"{base}/ipxe" if base else "",
    )


# --- the responder (no sockets) ---------------------------------------------------

PortKind = Literal["dhcp", "proxy"]
_CACHE_MAX = 1024            # memoized decisions / reply templates before a reset


@dataclass(frozen=True, slots=True)
class Reply:
    """One datagram to send, and what it was (for metrics and the timeline)."""

    data: bytes
    dest: tuple[str, int]
    msg_type: int
    mac: str
    detail: dict[str, Any]


class DhcpResponder:
    """Decides the reply to one datagram.  Single-threaded (the DHCP loop).

    Counters accumulate in ``counts`` ((metric, labels) → n) and are moved
    to a :class:`lpmos.metrics.Registry` by :meth:`flush`, once per batch of
    datagrams rather than once per packet.
    """

    def __init__(self, config: Config, *, server_ip: str, advertise_url: str,
                 known_mac: Callable[[str], bool] | None = None,
                 pool: LeasePool | None = None) -> None:
        self.mode: str = config["dhcp.mode"]
        self.server_ip = server_ip
        self.policy = policy_from_config(config, advertise_url)
        self.relays = frozenset(config["dhcp.relays"])
        self.relay_port: int = config["dhcp.port"]
        self.allow = frozenset(config["dhcp.allow_macs"])
        self.known_only: bool = config["dhcp.known_only"]
        self.known_mac = known_mac
        self.pool = pool
        lease_opts: dict[int, bytes] = {
            dhcp.OPT_SUBNET_MASK: dhcp.ip_bytes(config["dhcp.netmask"])}
        if config.get("dhcp.router"):
            lease_opts[dhcp.OPT_ROUTER] = dhcp.ip_bytes(config["dhcp.router"])
        if config.get("dhcp.dns"):
            lease_opts[dhcp.OPT_DNS] = dhcp.ips_bytes(config["dhcp.dns"])
        self._lease_opts = lease_opts
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        self._keys: dict[Any, tuple[str, tuple[tuple[str, str], ...]]] = {}
        # decide_bootfile is pure: its answers are memoized per client kind, and
        # the encoded part of each boot reply is kept as a template (both
        # bounded; the key space is small: architectures x classes x kinds)
        self._decisions: dict[ClientInfo, BootAnswer | BootRefusal] = {}
        self._templates: dict[tuple[Any, ...], dhcp.ReplyTemplate] = {}

    # -- counting
    def _count(self, name: str, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0) + 1

    def _count_packet(self, name: str, msg_type: int, kind: str) -> None:
        """``name``{type, port} with the label key built once per combination."""
        cache_key = (name, msg_type, kind)
        key = self._keys.get(cache_key)
        if key is None:
            key = self._keys[cache_key] = (name, (
                ("port", kind), ("type", dhcp.MESSAGE_NAMES.get(msg_type, "other"))))
        self.counts[key] = self.counts.get(key, 0) + 1

    def drop(self, reason: str) -> None:
        key = self._keys.get(reason)
        if key is None:
            key = self._keys[reason] = ("dhcp_dropped_total", (("reason", reason),))
        self.counts[key] = self.counts.get(key, 0) + 1

    def flush(self, registry: Any) -> None:
        counts, self.counts = self.counts, {}
        for (name, labels), n in counts.items():
            registry.inc(name, n, **dict(labels))

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
        self._count_packet("dhcp_packets_in_total", mt, kind)
        server_ip = self.server_ip or local_ip
        if not server_ip:
            self.drop("no_server_ip")
            return None
        relayed = pkt.giaddr != dhcp.ZERO_IP
        if relayed and pkt.giaddr not in self.relays:
            self.drop("relay_not_allowed")
            return None
        if not relayed and dhcp.OPT_RELAY_AGENT in pkt.options:
            self._count("dhcp_option82_ignored_total")
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

    # -- modes
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

    def _full(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
              relayed: bool) -> Reply | None:
        assert self.pool is not None
        mt = pkt.msg_type
        mac = pkt.mac
        if not self._allowed(mac):
            return None
        decision = self._decide(pkt)
        answer: BootAnswer | None = None
        if isinstance(decision, BootRefusal):
            if decision.reason != "not_boot_client":
                self._count("dhcp_boot_refused_total", reason=decision.reason)
        else:
            answer = decision
        if mt == dhcp.DISCOVER:
            lease = self.pool.offer(mac, pkt.requested_ip)
            if lease is None:
                self.drop("pool_exhausted")
                return None
            return self._address_reply(pkt, src, server_ip, relayed, dhcp.OFFER, lease, answer)
        if mt == dhcp.REQUEST:
            hostname = pkt.options.get(dhcp.OPT_HOSTNAME, b"")[:63].decode("ascii", "replace")
            grant = self.pool.request(mac, requested=pkt.requested_ip, ciaddr=pkt.ciaddr,
                                      server_id=pkt.server_id, our_id=server_ip,
                                      hostname=hostname)
            if grant.action == "ack":
                assert grant.lease is not None
                return self._address_reply(pkt, src, server_ip, relayed, dhcp.ACK, grant.lease,
                                           answer)
            if grant.action == "nak":
                self._count("dhcp_nak_total", reason=grant.reason)
                return self._nak(pkt, src, server_ip, relayed, grant.reason)
            self.drop(grant.reason)
            return None
        if mt == dhcp.DECLINE:
            if pkt.server_id in (None, server_ip):
                self._count("dhcp_declined_total",
                            result="ok" if self.pool.decline(mac, pkt.requested_ip) else "unknown")
            return None
        if mt == dhcp.RELEASE:
            if pkt.server_id in (None, server_ip):
                self._count("dhcp_released_total",
                            result="ok" if self.pool.release(mac, pkt.ciaddr) else "unknown")
            return None
        if mt == dhcp.INFORM:
            return self._address_reply(pkt, src, server_ip, relayed, dhcp.ACK, None, answer)
        self.drop("ignored_type")
        return None

    # -- building replies
    def _dest(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], relayed: bool,
              msg_type: int) -> tuple[str, int]:
        if relayed:
            return pkt.giaddr, self.relay_port
        src_ip, src_port = src
        if msg_type == dhcp.NAK or src_ip == dhcp.ZERO_IP:
            return dhcp.BROADCAST_IP, src_port
        return src_ip, src_port

    def _base(self, pkt: dhcp.DhcpPacket, msg_type: int, server_ip: str,
              relayed: bool) -> tuple[dhcp.DhcpPacket, dict[int, bytes]]:
        options: dict[int, bytes] = {
            dhcp.OPT_MESSAGE_TYPE: bytes((msg_type,)),
            dhcp.OPT_SERVER_ID: dhcp.ip_bytes(server_ip),
        }
        reply = dhcp.DhcpPacket(dhcp.BOOTREPLY, pkt.xid, pkt.chaddr, 0,
                                pkt.flags | (dhcp.FLAG_BROADCAST if relayed else 0),
                                giaddr=pkt.giaddr, options=options)
        return reply, options

    def _put_boot(self, reply: dhcp.DhcpPacket, options: dict[int, bytes],
                  answer: BootAnswer, server_ip: str) -> None:
        name = answer.filename.encode()
        reply.siaddr = server_ip
        if len(name) <= 127:
            reply.file = name
        else:
            options[dhcp.OPT_BOOTFILE] = name

    def _finish(self, pkt: dhcp.DhcpPacket, options: dict[int, bytes], relayed: bool) -> None:
        """Per-client options that close every reply: 97 echoed, 82 echoed
        to a configured relay only."""
        uuid = pkt.options.get(dhcp.OPT_CLIENT_UUID)
        if uuid is not None:
            options[dhcp.OPT_CLIENT_UUID] = uuid
        if relayed and dhcp.OPT_RELAY_AGENT in pkt.options:
            options[dhcp.OPT_RELAY_AGENT] = pkt.options[dhcp.OPT_RELAY_AGENT]

    def _boot_item(self, pkt: dhcp.DhcpPacket) -> bytes | None:
        """The PXE boot item (option 43 sub-option 71) of a boot server request."""
        vendor = pkt.options.get(dhcp.OPT_VENDOR_SPECIFIC)
        if not vendor:
            return None
        try:
            item = dhcp.parse_options(vendor, require_end=False).get(dhcp.PXE_BOOT_ITEM)
        except dhcp.MalformedPacket:
            return None
        return item if item is not None and len(item) == 4 else None

    def boot_packet(self, msg_type: int, answer: BootAnswer, server_ip: str, *, port67: bool,
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
        self._put_boot(reply, options, answer, server_ip)
        return reply

    def _boot_reply(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                    relayed: bool, msg_type: int, answer: BootAnswer, *, port67: bool) -> Reply:
        item = None if port67 else self._boot_item(pkt)
        key = (msg_type, answer, server_ip, port67, item)
        template = self._templates.get(key)
        if template is None:
            if len(self._templates) >= _CACHE_MAX:
                self._templates.clear()
            template = self._templates[key] = dhcp.ReplyTemplate(
                self.boot_packet(msg_type, answer, server_ip, port67=port67, boot_item=item))
        tail: dict[int, bytes] = {}
        self._finish(pkt, tail, relayed)
        data = template.render(
            pkt.xid, pkt.chaddr, pkt.flags | (dhcp.FLAG_BROADCAST if relayed else 0),
            dhcp.ip_bytes(dhcp.ZERO_IP if port67 else pkt.ciaddr), dhcp.ip_bytes(pkt.giaddr),
            dhcp.encode_options(tail, end=False) if tail else b"")
        return Reply(data, self._dest(pkt, src, relayed, msg_type), msg_type, pkt.mac,
                     {"kind": answer.kind, "file": answer.filename, "arch": answer.arch})

    def _address_reply(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str,
                       relayed: bool, msg_type: int, lease: Lease | None,
                       answer: BootAnswer | None) -> Reply:
        reply, options = self._base(pkt, msg_type, server_ip, relayed)
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
            self._put_boot(reply, options, answer, server_ip)
            detail.update(kind=answer.kind, file=answer.filename, arch=answer.arch)
        self._finish(pkt, options, relayed)
        return Reply(dhcp.build_packet(reply), self._dest(pkt, src, relayed, msg_type), msg_type,
                     pkt.mac, detail)

    def _nak(self, pkt: dhcp.DhcpPacket, src: tuple[str, int], server_ip: str, relayed: bool,
             reason: str) -> Reply:
        reply, options = self._base(pkt, dhcp.NAK, server_ip, relayed)
        options[dhcp.OPT_MESSAGE] = reason.replace("_", " ").encode()
        return Reply(dhcp.build_packet(reply), self._dest(pkt, src, relayed, dhcp.NAK), dhcp.NAK,
                     pkt.mac, {"nak": reason})


# --- sockets ----------------------------------------------------------------------

_IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)
_SO_BINDTODEVICE = getattr(socket, "SO_BINDTODEVICE", 25)
_PKTINFO = struct.Struct("=i4s4s")
_CMSG_SPACE = socket.CMSG_SPACE(_PKTINFO.size)
_inet_ntoa = socket.inet_ntoa
_IPPROTO_IP = int(socket.IPPROTO_IP)        # a plain int: enum operators are slow
_RECV_SIZE = dhcp.MAX_PACKET + 1
_BATCH = 256                 # datagrams read per wake-up before yielding to the loop


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
    :func:`bootsvc.node.default_server_ip`).  With an address and no
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


def open_socket(listen: str, port: int, *, interface: str | None, rcvbuf: int,
                pktinfo: bool = True) -> socket.socket:
    """A non-blocking UDP socket for DHCP: broadcast allowed, a large receive
    buffer (forced past rmem_max when we may), optionally IP_PKTINFO (to learn
    the arrival interface and local address) and bound to one interface."""
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


class DhcpService:
    """ProxyDHCP / lab DHCP of a regional node on the running asyncio loop.

    ``start()`` binds UDP ``dhcp.port`` (and ``dhcp.proxy_port`` unless 0) on
    0.0.0.0, with SO_BINDTODEVICE to ``regional.interface`` or to the
    interface holding the ``regional.listen`` address (:func:`decide_bind`),
    and answers as ``ctx.server_ip``.  Answers come from memory;
    lab-mode leases are written behind to etcd and keep working while etcd is
    down.  ``stop()`` closes the sockets and flushes lease writes briefly.
    """

    TIMELINE_COALESCE = 5.0      # seconds an identical answer is not re-recorded
    TIMELINE_MACS = 4096

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        config = ctx.config
        self.mode: str = config["dhcp.mode"]
        self.pool: LeasePool | None = None
        self.writer: LeaseWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.mode == "full":
            rng = config.get("dhcp.range")
            if not rng:
                raise ConfigError("dhcp.range: lab mode (--dhcp-mode full) needs --dhcp-range A-B")
            self.writer = LeaseWriter(ctx.store, ctx.keys, ctx.idc, on_loaded=self._on_loaded)
            self.pool = LeasePool(rng[0], rng[1], config["dhcp.lease_time"], sink=self.writer)
        self.responder = DhcpResponder(
            config, server_ip=ctx.server_ip, advertise_url=ctx.advertise_url,
            known_mac=ctx.machines.known_mac if ctx.machines is not None else None,
            pool=self.pool)
        self.sockets: list[tuple[socket.socket, PortKind]] = []
        self._claims: list[socket.socket] = []
        self._latencies: list[float] = []
        self._pktinfo = True
        self._recorded: OrderedDict[str, tuple[tuple[Any, ...], float]] = OrderedDict()
        m = ctx.metrics
        m.describe("dhcp_packets_in_total", "DHCP requests received, by message type and port")
        m.describe("dhcp_packets_out_total", "DHCP replies sent, by message type and port")
        m.describe("dhcp_dropped_total", "DHCP datagrams not answered, by reason")
        m.describe("dhcp_answer_seconds", "time from receiving a request to sending the reply")
        if self.pool is not None:
            pool = self.pool
            m.gauge("dhcp_leases_active", lambda: float(pool.active()),
                    "lab-mode leases currently held")
            writer = self.writer
            assert writer is not None
            m.gauge("dhcp_lease_writes_pending", lambda: float(writer.pending()),
                    "lease changes not yet written to etcd")

    @property
    def ports(self) -> dict[str, int]:
        """The bound ports by kind (after start; useful with port 0)."""
        return {kind: sock.getsockname()[1] for sock, kind in self.sockets}

    async def start(self) -> None:
        if self.mode == "off":
            log.info("dhcp: off")
            return
        loop = asyncio.get_running_loop()
        self._loop = loop
        config = self.ctx.config
        listen = listen_address(config)
        interface = config.get("regional.interface")
        bind = decide_bind(listen, interface, read_address_interface(listen)
                           if listen is not None and not interface else None)
        address, interface = bind.address, bind.interface
        rcvbuf = config["dhcp.rcvbuf"]
        wanted: list[tuple[int, PortKind]] = [(config["dhcp.port"], "dhcp")]
        if config["dhcp.proxy_port"]:
            wanted.append((config["dhcp.proxy_port"], "proxy"))
        # bound to one interface with a known address, nothing needs to be
        # learnt per packet: plain recvfrom/sendto (the cheapest path)
        self._pktinfo = not (interface and self.ctx.server_ip)
        try:
            for port, kind in wanted:
                claim = claim_port(port, interface)
                if claim is not None:
                    self._claims.append(claim)
                try:
                    sock = open_socket(address, port, interface=interface, rcvbuf=rcvbuf,
                                       pktinfo=self._pktinfo)
                except OSError as exc:
                    hint = (" (ports below 1024 need CAP_NET_BIND_SERVICE, an interface "
                            "binding CAP_NET_RAW)" if exc.errno in (errno.EACCES, errno.EPERM)
                            else "")
                    raise OSError(exc.errno, f"dhcp: cannot bind UDP {address}:{port}"
                                  f"{' on ' + interface if interface else ''}: "
                                  f"{exc.strerror}{hint}") from exc
                self.sockets.append((sock, kind))
                loop.add_reader(sock.fileno(), self._on_readable, sock, kind)
        except BaseException:
            await self.stop()
            raise
        if self.writer is not None:
            self.writer.start()
        log.info("dhcp: %s mode on %s (%s) ports %s, answering as %s", self.mode, address,
                 interface or "every interface", ",".join(str(p) for p, _ in wanted),
                 self.ctx.server_ip or "the address of the arrival interface")

    async def stop(self) -> None:
        loop = self._loop
        for sock, _kind in self.sockets:
            if loop is not None:
                loop.remove_reader(sock.fileno())
            sock.close()
        self.sockets = []
        for claim in self._claims:
            claim.close()
        self._claims = []
        if self.writer is not None:
            writer = self.writer
            await asyncio.get_running_loop().run_in_executor(None, writer.stop)
        self._flush()

    # -- lease load (writer thread → loop)
    def _on_loaded(self, leases: list[Lease]) -> None:
        loop = self._loop
        if loop is None or self.pool is None:
            return
        pool = self.pool

        def adopt() -> None:
            taken = pool.adopt(leases)
            log.info("dhcp: %d of %d stored leases loaded", taken, len(leases))

        try:
            loop.call_soon_threadsafe(adopt)
        except RuntimeError:   # loop closed
            pass

    # -- the hot path
    def _on_readable(self, sock: socket.socket, kind: PortKind) -> None:
        responder = self.responder
        perf = time.perf_counter
        pktinfo = self._pktinfo
        ifindex, local_ip = 0, None
        for _ in range(_BATCH):
            try:
                if pktinfo:
                    data, ancdata, _flags, src = sock.recvmsg(_RECV_SIZE, _CMSG_SPACE)
                else:
                    data, src = sock.recvfrom(_RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                responder.drop("recv_error")
                log.debug("dhcp recv: %s", exc)
                break
            t0 = perf()
            if len(data) >= _RECV_SIZE:          # longer than MAX_PACKET (truncated)
                responder.drop("oversized")
                continue
            if pktinfo:
                ifindex, local_ip = 0, None
                for level, ctype, cdata in ancdata:      # only IP_PKTINFO is enabled
                    if ctype == _IP_PKTINFO and level == _IPPROTO_IP \
                            and len(cdata) >= _PKTINFO.size:
                        ifindex, spec_dst, _addr = _PKTINFO.unpack_from(cdata)
                        local_ip = _inet_ntoa(spec_dst)
            try:
                reply = responder.handle(data, src, kind, local_ip)
            except Exception:   # a bug must not stop the loop; counted and logged
                log.exception("dhcp: failed to handle a packet from %s", src)
                responder.drop("internal_error")
                continue
            if reply is None:
                continue
            if self._send(sock, reply, ifindex, local_ip):
                self._latencies.append(perf() - t0)
                responder._count_packet("dhcp_packets_out_total", reply.msg_type, kind)
                self._record(reply, kind)
        self._flush()

    def _send(self, sock: socket.socket, reply: Reply, ifindex: int,
              local_ip: str | None) -> bool:
        try:
            if reply.dest[0] == dhcp.BROADCAST_IP and ifindex:
                # out of the interface the request came in on, from its address
                info = _PKTINFO.pack(ifindex, socket.inet_aton(local_ip or dhcp.ZERO_IP),
                                     b"\x00\x00\x00\x00")
                sock.sendmsg([reply.data], [(socket.IPPROTO_IP, _IP_PKTINFO, info)], 0,
                             reply.dest)
            else:
                sock.sendto(reply.data, reply.dest)
            return True
        except OSError as exc:
            reason = "send_buffer_full" if exc.errno in (errno.EAGAIN, errno.ENOBUFS) \
                else "send_failed"
            self.responder.drop(reason)
            log.debug("dhcp send to %s: %s", reply.dest, exc)
            return False

    def _record(self, reply: Reply, kind: PortKind) -> None:
        detail = reply.detail
        key = (reply.msg_type, kind, detail.get("file"), detail.get("ip"), detail.get("nak"))
        now = time.monotonic()
        seen = self._recorded.get(reply.mac)
        if seen is not None and seen[0] == key and now - seen[1] < self.TIMELINE_COALESCE:
            return
        self._recorded[reply.mac] = (key, now)
        self._recorded.move_to_end(reply.mac)
        if len(self._recorded) > self.TIMELINE_MACS:
            self._recorded.popitem(last=False)
        try:
            self.ctx.timeline.record(reply.mac, "dhcp", {
                "type": dhcp.MESSAGE_NAMES[reply.msg_type], "port": kind, **reply.detail})
        except Exception:   # the sink must never break the loop
            log.exception("dhcp: timeline sink failed")

    def _flush(self) -> None:
        metrics = self.ctx.metrics
        self.responder.flush(metrics)
        latencies, self._latencies = self._latencies, []
        for value in latencies:
            metrics.observe("dhcp_answer_seconds", value)


# --- standalone runner (development, tests, benchmarks) ---------------------------


def _standalone_settings() -> list[Setting]:
    from bootsvc.settings import NODE_SETTINGS
    from lpmos.config import COMMON, settings_by_key
    return settings_by_key([COMMON, NODE_SETTINGS, SETTINGS])


def main(argv: list[str] | None = None) -> int:
    """``python -m bootsvc.dhcp.server [flags]``: only the DHCP service, with
    a private in-memory store unless ``--etcd-endpoints`` is given.  Prints
    ``READY <ports json>`` once bound; on SIGTERM/SIGINT writes the counters to
    ``--stats-file`` (JSON) and exits.  The regional node (``lpmos regional``)
    is the production entry point."""
    from bootsvc.context import NodeContext
    from bootsvc.state.machines import MachineIndex
    from lpmos.cli import add_setting_flags
    from lpmos.config import resolve
    from lpmos.store.cache import WatchCache
    from lpmos.store.keys import Keys

    settings = _standalone_settings()
    parser = argparse.ArgumentParser(prog="python -m bootsvc.dhcp.server",
                                     description=main.__doc__)
    parser.add_argument("--stats-file", default=None, help="write counters as JSON at exit")
    add_setting_flags(parser, settings)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        config = resolve(settings, flags, config_file=None)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    logging.basicConfig(level=config["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store: Any
    if config["etcd.endpoints"]:
        from lpmos.store.etcd import EtcdStore
        store = EtcdStore(config["etcd.endpoints"], timeout=config["etcd.timeout"])
    else:
        from lpmos.store.memory import MemoryStore
        store = MemoryStore()
    keys = Keys(config["etcd.prefix"])
    idc = config["regional.idc"]
    cache = WatchCache(store, keys.idc(idc), name="dhcp").start(wait=2.0)
    # the node's rule, without its last resort: with no address configured
    # each reply answers as the address of the interface it arrived on
    server_ip = default_server_ip(config, fallback=False)
    advertise = config["regional.advertise_url"] or (f"http://{server_ip}:8081"
                                                     if server_ip else "")
    ctx = NodeContext(config=config, idc=idc, node_name=config["regional.node_name"],
                      store=store, keys=keys, cache=cache,
                      machines=MachineIndex(cache, keys, idc), advertise_url=advertise,
                      server_ip=server_ip or "")

    async def serve() -> None:
        service = DhcpService(ctx)
        await service.start()
        gc.freeze()     # start-up objects out of the collector's way (fewer long pauses)
        print("READY " + json.dumps(service.ports), flush=True)
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        await service.stop()

    try:
        asyncio.run(serve())
    finally:
        cache.stop()
        if args.stats_file:
            with open(args.stats_file, "w") as fh:
                json.dump(ctx.metrics.snapshot(), fh, indent=1, sort_keys=True)
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
