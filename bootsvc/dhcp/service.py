"""The node's DHCP service: the UDP sockets on the asyncio loop around a responder.

:class:`DhcpService` binds the DHCP port and the PXE boot server port
(:mod:`bootsvc.dhcp.sockets`), reads each socket in bounded batches, hands
every datagram to a :class:`bootsvc.dhcp.responder.DhcpResponder`, sends
its reply, records answers on the machine timeline and moves the counters
into ``ctx.metrics`` once per batch.  The answer never waits on etcd:
lab-mode leases are written behind (:class:`bootsvc.state.dhcp_leases.LeaseWriter`).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from bootsvc.dhcp.responder import DhcpResponder, Reply
from bootsvc.dhcp.settings import DhcpSettings, PortKind
from bootsvc.dhcp.sockets import (
    CMSG_SPACE,
    RECV_SIZE,
    bind_error,
    claim_port,
    decide_bind,
    needs_pktinfo,
    open_socket,
    parse_pktinfo,
    parse_received,
    send_datagram,
    send_drop_reason,
    udp_port_holders,
)
from bootsvc.netif import read_address_interface
from bootsvc.settings import listen_address
from bootsvc.state.dhcp_leases import Lease, LeasePool, LeaseWriter
from bootsvc.wire import dhcp

if TYPE_CHECKING:
    from bootsvc.context import NodeContext

log = logging.getLogger(__name__)

_BATCH = 256                 # datagrams read per wake-up before yielding to the loop

AnswerKey = tuple[Any, ...]


def answer_key(reply: Reply, kind: PortKind) -> AnswerKey:
    """What makes two answers the same on the timeline: type, port, and the
    boot file, address or NAK reason given."""
    detail = reply.detail
    return (reply.msg_type, kind, detail.get("file"), detail.get("ip"), detail.get("nak"))


class RecentAnswers:
    """Which answers go on the machine timeline.  A client retrying gets the
    same answer many times a second; an answer equal to the last one
    recorded for that MAC less than ``window`` seconds ago is not recorded
    again.  At most ``size`` MACs are remembered, the least recent
    forgotten first."""

    def __init__(self, window: float, size: int) -> None:
        self.window = window
        self.size = size
        self._seen: OrderedDict[str, tuple[AnswerKey, float]] = OrderedDict()

    def is_new(self, mac: str, key: AnswerKey, now: float) -> bool:
        """Whether to record ``key`` for ``mac`` at ``now`` (and remember it if so)."""
        seen = self._seen.get(mac)
        if seen is not None and seen[0] == key and now - seen[1] < self.window:
            return False
        self._seen[mac] = (key, now)
        self._seen.move_to_end(mac)
        if len(self._seen) > self.size:
            self._seen.popitem(last=False)
        return True


class DhcpService:
    """ProxyDHCP / lab DHCP of a regional node on the running asyncio loop.

    ``start()`` binds UDP ``dhcp.port`` (and ``dhcp.proxy_port`` unless 0) on
    0.0.0.0, with SO_BINDTODEVICE to ``regional.interface`` or to the
    interface holding the ``regional.listen`` address (:func:`decide_bind`),
    and answers as ``ctx.server_ip``.  Answers come from memory;
    lab-mode leases are written behind to etcd and keep working while etcd is
    down.  ``stop()`` closes the sockets and flushes lease writes briefly.
    A lab mode without ``dhcp.range`` raises :class:`lpmos.config.ConfigError`
    here, before any socket.
    """

    TIMELINE_COALESCE = 5.0      # seconds an identical answer is not re-recorded
    TIMELINE_MACS = 4096

    def __init__(self, ctx: NodeContext) -> None:
        self.ctx = ctx
        self.settings = settings = DhcpSettings.from_config(ctx.config)
        self.mode: str = settings.mode
        self.pool: LeasePool | None = None
        self.writer: LeaseWriter | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        if self.mode == "full":
            first, last = settings.lab_range()
            self.writer = LeaseWriter(ctx.store, ctx.keys, ctx.idc, on_loaded=self._on_loaded)
            self.pool = LeasePool(first, last, settings.lease_time, sink=self.writer)
        self.responder = DhcpResponder(
            settings, server_ip=ctx.server_ip, advertise_url=ctx.advertise_url,
            known_mac=ctx.machines.known_mac if ctx.machines is not None else None,
            pool=self.pool)
        self.sockets: list[tuple[socket.socket, PortKind]] = []
        self._claims: list[socket.socket] = []
        self._latencies: list[float] = []
        self._pktinfo = True
        self._recent = RecentAnswers(self.TIMELINE_COALESCE, self.TIMELINE_MACS)
        self._describe_metrics()

    def _describe_metrics(self) -> None:
        m = self.ctx.metrics
        m.describe("dhcp_packets_in_total", "DHCP requests received, by message type and port")
        m.describe("dhcp_packets_out_total", "DHCP replies sent, by message type and port")
        m.describe("dhcp_dropped_total", "DHCP datagrams not answered, by reason")
        m.describe("dhcp_answer_seconds", "time from the kernel's receipt of a request (so "
                   "with its wait in the socket buffer) to its reply being sent",
                   kind="histogram")
        pool, writer = self.pool, self.writer
        if pool is not None:
            m.gauge("dhcp_leases_active", lambda: float(pool.active()),
                    "lab mode: leases currently held")
            assert writer is not None
            m.gauge("dhcp_lease_writes_pending", lambda: float(writer.pending()),
                    "lab mode: lease changes not yet written to etcd")

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
        wanted = self.settings.listen_ports()
        self._pktinfo = needs_pktinfo(bind.interface, self.ctx.server_ip)
        try:
            for port, kind in wanted:
                self._bind(loop, bind.address, port, kind, bind.interface)
        except BaseException:
            await self.stop()
            raise
        if self.writer is not None:
            self.writer.start()
        log.info("dhcp: %s mode on %s (%s) ports %s, answering as %s", self.mode, bind.address,
                 bind.interface or "every interface", ",".join(str(p) for p, _ in wanted),
                 self.ctx.server_ip or "the address of the arrival interface")

    def _bind(self, loop: asyncio.AbstractEventLoop, address: str, port: int, kind: PortKind,
              interface: str | None) -> None:
        """Claim ``port``, open its socket and start reading it."""
        claim = claim_port(port, interface)
        if claim is not None:
            self._claims.append(claim)
        try:
            sock = open_socket(address, port, interface=interface, rcvbuf=self.settings.rcvbuf,
                               pktinfo=self._pktinfo)
        except OSError as exc:
            holders = udp_port_holders(port) if exc.errno == errno.EADDRINUSE else []
            raise bind_error(exc, address, port, interface, holders) from exc
        self.sockets.append((sock, kind))
        loop.add_reader(sock.fileno(), self._on_readable, sock, kind)

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
        """Read up to a batch of datagrams and answer each at once; the
        bookkeeping of the batch (timeline, latencies, counters) comes after
        its answers.  A request that waited in the socket buffer longer than
        ``dhcp.max_age`` (its kernel receipt time, SO_TIMESTAMPNS) is dropped
        unread: under overload the loop catches up on what is fresh instead
        of answering clients that have given up."""
        responder = self.responder
        counters = responder.counters
        clock = time.time
        pktinfo = self._pktinfo
        max_age = self.settings.max_age
        ifindex, local_ip = 0, None
        answered: list[tuple[Reply, float]] = []
        for _ in range(_BATCH):
            try:
                data, ancdata, _flags, src = sock.recvmsg(RECV_SIZE, CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                counters.drop("recv_error")
                log.debug("dhcp recv: %s", exc)
                break
            received = parse_received(ancdata) or clock()
            if clock() - received > max_age:
                counters.drop("stale")
                continue
            if len(data) >= RECV_SIZE:          # longer than MAX_PACKET (truncated)
                counters.drop("oversized")
                continue
            if pktinfo:
                ifindex, local_ip = parse_pktinfo(ancdata)
            try:
                reply = responder.handle(data, src, kind, local_ip)
            except Exception:   # a bug must not stop the loop; counted and logged
                log.exception("dhcp: failed to handle a packet from %s", src)
                counters.drop("internal_error")
                continue
            if reply is not None and self._send(sock, reply, ifindex, local_ip):
                answered.append((reply, received))
        if answered:
            sent = clock()
            for reply, received in answered:
                self._latencies.append(max(0.0, sent - received))
                counters.count_packet("dhcp_packets_out_total", reply.msg_type, kind)
                self._record(reply, kind)
        self._flush()

    def _send(self, sock: socket.socket, reply: Reply, ifindex: int,
              local_ip: str | None) -> bool:
        try:
            send_datagram(sock, reply.data, reply.dest, ifindex, local_ip)
            return True
        except OSError as exc:
            self.responder.counters.drop(send_drop_reason(exc.errno))
            log.debug("dhcp send to %s: %s", reply.dest, exc)
            return False

    def _record(self, reply: Reply, kind: PortKind) -> None:
        if not self._recent.is_new(reply.mac, answer_key(reply, kind), time.monotonic()):
            return
        try:
            self.ctx.timeline.record(reply.mac, "dhcp", {
                "type": dhcp.MESSAGE_NAMES[reply.msg_type], "port": kind, **reply.detail})
        except Exception:   # the sink must never break the loop
            log.exception("dhcp: timeline sink failed")

    def _flush(self) -> None:
        metrics = self.ctx.metrics
        self.responder.counters.flush(metrics)
        latencies, self._latencies = self._latencies, []
        for value in latencies:
            metrics.observe("dhcp_answer_seconds", value)
