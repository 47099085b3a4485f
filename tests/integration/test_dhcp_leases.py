"""Lab-mode lease logic (LeasePool, pure), the write-behind LeaseWriter on a
real etcd (including etcd stopped mid-traffic), and DhcpService on loopback
high ports with a real etcd: known-machines filter, metrics, timeline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Iterator

import pytest

from bootsvc.context import MemoryTimeline, NodeContext
from bootsvc.dhcp.responder import DhcpResponder
from bootsvc.dhcp.service import DhcpService
from bootsvc.dhcp.settings import SETTINGS
from bootsvc.policy.bootfile import BootRefusal
from bootsvc.settings import NODE_SETTINGS
from bootsvc.state.dhcp_leases import Lease, LeasePool, LeaseWriter, parse_range
from bootsvc.state.machines import MachineIndex
from bootsvc.wire import dhcp
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.models import Server
from lpmos.store.cache import WatchCache
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore
from tests.prometheus_text import value as metric_value


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def pool(sink: object = None, size: int = 3) -> tuple[LeasePool, Clock]:
    clock = Clock()
    last = f"10.0.0.{10 + size - 1}"
    return LeasePool("10.0.0.10", last, 600, offer_time=30, quarantine=300,
                     sink=sink, clock=clock), clock  # type: ignore[arg-type]


A, B, C, D = (f"52:54:00:00:00:0{i}" for i in range(1, 5))
ME = "10.0.0.1"


# --- LeasePool -------------------------------------------------------------------------


def test_offer_request_ack_and_stable_address() -> None:
    p, _ = pool()
    offer = p.offer(A)
    assert offer is not None and offer.ip == "10.0.0.10" and offer.state == "offered"
    grant = p.request(A, requested=offer.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    assert grant.action == "ack" and grant.lease is not None and grant.lease.state == "bound"
    again = p.offer(A)
    assert again is not None and again.ip == offer.ip           # same address again


def test_pool_exhausted_then_expired_lease_reused() -> None:
    p, clock = pool(size=2)
    for mac in (A, B):
        lease = p.offer(mac)
        assert lease is not None
        p.request(mac, requested=lease.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    assert p.offer(C) is None
    clock.now += 601
    lease = p.offer(C)
    assert lease is not None and lease.ip in ("10.0.0.10", "10.0.0.11")


def test_unconfirmed_offer_expires() -> None:
    p, clock = pool(size=1)
    assert p.offer(A) is not None
    assert p.offer(B) is None
    clock.now += 31
    assert p.offer(B) is not None


def test_nak_for_wrong_or_taken_address() -> None:
    p, _ = pool()
    lease = p.offer(A)
    assert lease is not None
    p.request(A, requested=lease.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    assert p.request(B, requested="10.0.0.99", ciaddr="0.0.0.0", server_id=None,
                     our_id=ME).reason == "wrong_address"
    taken = p.request(B, requested=lease.ip, ciaddr="0.0.0.0", server_id=None, our_id=ME)
    assert (taken.action, taken.reason) == ("nak", "address_in_use")
    # A asks (INIT-REBOOT) for another address than its own: NAK
    other = p.request(A, requested="10.0.0.11", ciaddr="0.0.0.0", server_id=None, our_id=ME)
    assert (other.action, other.reason) == ("nak", "wrong_address")
    # selecting an address we never offered
    assert p.request(C, requested="10.0.0.12", ciaddr="0.0.0.0", server_id=ME,
                     our_id=ME).reason == "not_offered"


def test_request_for_other_server_withdraws_offer() -> None:
    p, _ = pool(size=1)
    assert p.offer(A) is not None
    grant = p.request(A, requested="10.0.0.10", ciaddr="0.0.0.0", server_id="10.0.0.2",
                      our_id=ME)
    assert (grant.action, grant.reason) == ("ignore", "other_server")
    assert p.offer(B) is not None        # the address is free again


def test_renew_extends_and_init_reboot_without_record_grants_free_address() -> None:
    p, clock = pool()
    lease = p.offer(A)
    assert lease is not None
    p.request(A, requested=lease.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    clock.now += 300
    renew = p.request(A, requested=None, ciaddr=lease.ip, server_id=None, our_id=ME)
    assert renew.action == "ack" and renew.lease is not None
    assert renew.lease.expires == clock.now + 600
    fresh = p.request(B, requested="10.0.0.12", ciaddr="0.0.0.0", server_id=None, our_id=ME)
    assert fresh.action == "ack"


def test_decline_quarantines_and_release_frees() -> None:
    changes: list[tuple[str, Lease | None]] = []
    p, clock = pool(sink=lambda mac, lease: changes.append((mac, lease)), size=2)
    lease = p.offer(A)
    assert lease is not None
    p.request(A, requested=lease.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    assert p.decline(A, lease.ip)
    nxt = p.offer(B)
    assert nxt is not None and nxt.ip != lease.ip       # quarantined
    assert p.offer(C) is None
    clock.now += 301
    assert p.offer(C) is not None                       # quarantine over (and B's offer expired)
    p2, _ = pool(sink=lambda mac, lease: changes.append((mac, lease)))
    got = p2.offer(D)
    assert got is not None
    p2.request(D, requested=got.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    assert not p2.release(D, "10.0.0.99")
    assert p2.release(D, got.ip)
    assert changes[-1] == (D, None)
    assert [c[1] is None for c in changes[:2]] == [False, True]   # bound, then declined


def test_adopt_skips_conflicts_and_expired() -> None:
    p, clock = pool()
    lease = p.offer(A)
    assert lease is not None
    p.request(A, requested=lease.ip, ciaddr="0.0.0.0", server_id=ME, our_id=ME)
    stored = [Lease(B, lease.ip, clock.now + 100), Lease(C, "10.0.0.11", clock.now + 100),
              Lease(D, "10.0.0.12", clock.now - 1), Lease(A, "10.0.0.12", clock.now + 50)]
    assert p.adopt(stored) == 1
    assert p.lease_of(C) is not None and p.lease_of(B) is None


@pytest.mark.parametrize("raw", ["10.0.0.5-10.0.0.1", "10.0.0.1", "x-y", "10.0.0.0-10.2.0.0"])
def test_parse_range_refuses(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_range(raw)


# --- LeaseWriter on a real etcd ------------------------------------------------------------


def test_writer_coalesces_and_writes_behind(etcd_store: EtcdStore, keys: Keys) -> None:
    loaded: list[list[Lease]] = []
    etcd_store.put(keys.dhcp_lease("dc1", A), Lease(A, "10.0.0.10", time.time() + 60).to_json())
    etcd_store.put(keys.dhcp_lease("dc1", "bad"), b"{not json")
    writer = LeaseWriter(etcd_store, keys, "dc1", on_loaded=loaded.append)
    writer.start()
    try:
        assert writer.loaded.wait(5)
        assert [lease.mac for lease in loaded[0]] == [A]     # the malformed one skipped
        for i in range(50):
            writer(B, Lease(B, "10.0.0.11", 1000.0 + i))
        writer(C, Lease(C, "10.0.0.12", 5.0))
        writer(A, None)
        deadline = time.monotonic() + 5
        while writer.pending() and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        writer.stop()
    b = etcd_store.get(keys.dhcp_lease("dc1", B))
    assert b is not None and Lease.from_json(b.value).expires == 1049.0
    assert etcd_store.get(keys.dhcp_lease("dc1", C)) is not None
    assert etcd_store.get(keys.dhcp_lease("dc1", A)) is None
    assert writer.writes < 50                                 # coalesced per MAC


@pytest.mark.slow
def test_writer_survives_etcd_stall_and_catches_up(private_etcd: object, keys: Keys) -> None:
    server = private_etcd
    store = EtcdStore([server.url], timeout=0.5)  # type: ignore[attr-defined]
    writer = LeaseWriter(store, keys, "dc1", backoff_max=0.5)
    writer.start()
    try:
        assert writer.loaded.wait(5)
        server.stop()  # type: ignore[attr-defined]   # SIGSTOP: etcd hangs
        t0 = time.monotonic()
        for i in range(5):
            writer(f"52:54:00:00:01:0{i}", Lease(f"52:54:00:00:01:0{i}", f"10.0.0.{i}", 9.0))
        assert time.monotonic() - t0 < 0.1                   # the caller never waits
        time.sleep(1.5)
        assert writer.pending() >= 4 and writer.failures >= 1
        server.cont()  # type: ignore[attr-defined]
        deadline = time.monotonic() + 15
        while writer.pending() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert writer.pending() == 0
    finally:
        writer.stop()
        store.close()
    check = EtcdStore([server.url], timeout=2.0)  # type: ignore[attr-defined]
    try:
        assert len(check.range(keys.dhcp_leases("dc1")).items) == 5
    finally:
        check.close()


# --- DhcpService on loopback, real etcd ------------------------------------------------------


def _ctx(store: object, keys: Keys, **flags: object) -> tuple[NodeContext, WatchCache]:
    settings = settings_by_key([COMMON, NODE_SETTINGS, SETTINGS])
    base = {"regional__listen": "127.0.0.1", "dhcp__port": "0", "dhcp__proxy_port": "0"}
    base.update({k: str(v) for k, v in flags.items()})
    config = resolve(settings, base, environ={})
    cache = WatchCache(store, keys.idc("dc1"), name="t").start(wait=5)  # type: ignore[arg-type]
    ctx = NodeContext(config=config, idc="dc1", node_name="n1", store=store,  # type: ignore[arg-type]
                      keys=keys, cache=cache, machines=MachineIndex(cache, keys, "dc1"),
                      advertise_url="http://127.0.0.1:8081", server_ip="127.0.0.1")
    return ctx, cache


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


async def _exchange(port: int, request: bytes, timeout: float = 2.0) -> bytes | None:
    loop = asyncio.get_running_loop()
    got: asyncio.Future[bytes] = loop.create_future()

    class Proto(asyncio.DatagramProtocol):
        def datagram_received(self, data: bytes, addr: object) -> None:
            if not got.done():
                got.set_result(data)

    transport, _ = await loop.create_datagram_endpoint(Proto, local_addr=("127.0.0.1", 0))
    try:
        transport.sendto(request, ("127.0.0.1", port))
        return await asyncio.wait_for(got, timeout)
    except TimeoutError:
        return None
    finally:
        transport.close()


def test_service_known_only_metrics_and_timeline(etcd_store: EtcdStore, keys: Keys,
                                                 loop: asyncio.AbstractEventLoop) -> None:
    known = "52:54:00:aa:00:01"
    etcd_store.put(keys.server("dc1", "SN1"),
                   Server(idc="dc1", sn="SN1", macs=[known]).validate().to_json())
    ctx, cache = _ctx(etcd_store, keys, dhcp__known_only="true")
    timeline = MemoryTimeline()
    ctx.timeline = timeline
    service = DhcpService(ctx)

    async def scenario() -> tuple[bytes | None, bytes | None, bytes | None]:
        await service.start()
        try:
            port = service.ports["dhcp"]
            ok = await _exchange(port, dhcp.build_request(known, xid=1, arch=9))
            unknown = await _exchange(port, dhcp.build_request("52:54:00:aa:00:02", xid=2,
                                                               arch=9), timeout=0.5)
            bad = await _exchange(port, b"\x01" * 100, timeout=0.3)
            return ok, unknown, bad
        finally:
            await service.stop()

    try:
        ok, unknown, bad = loop.run_until_complete(scenario())
    finally:
        cache.stop()
    assert ok is not None and dhcp.parse_packet(ok).boot_file == "ipxe.efi"
    assert unknown is None and bad is None
    m = ctx.metrics
    assert m.get("dhcp_dropped_total", reason="unknown_machine") == 1
    assert m.get("dhcp_dropped_total", reason="truncated") == 1
    assert m.get("dhcp_packets_out_total", type="offer", port="dhcp") == 1
    assert metric_value(m.render(), "lpmos_dhcp_answer_seconds_count") == 1
    entries = timeline.entries(known)
    assert entries and entries[0]["stage"] == "dhcp"
    assert entries[0]["detail"]["file"] == "ipxe.efi"


def test_requests_that_waited_past_max_age_are_dropped_unanswered(
        keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
    """The loop is busy for 0.5 s while requests queue in the socket buffer:
    with --dhcp-max-age 0.2 they are dropped and counted when it gets to
    them (kernel receipt time, SO_TIMESTAMPNS), and a fresh one is answered."""
    import socket as socketlib
    import time

    ctx, cache = _ctx(MemoryStore(), keys, dhcp__max_age="0.2")
    service = DhcpService(ctx)
    client = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    client.bind(("127.0.0.1", 0))
    client.settimeout(0.1)

    async def scenario() -> tuple[list[bytes], bytes | None]:
        await service.start()
        try:
            port = service.ports["dhcp"]
            for i in range(5):
                client.sendto(dhcp.build_request(f"52:54:00:bb:00:{i:02x}", xid=100 + i, arch=7),
                              ("127.0.0.1", port))
            time.sleep(0.5)                   # the loop is busy: nothing is read
            await asyncio.sleep(0.2)          # now it reads them
            late: list[bytes] = []
            with contextlib.suppress(TimeoutError):
                while True:
                    late.append(client.recv(2048))
            fresh = await _exchange(port, dhcp.build_request("52:54:00:bb:00:99", xid=7,
                                                             arch=7))
            return late, fresh
        finally:
            await service.stop()

    try:
        late, fresh = loop.run_until_complete(scenario())
    finally:
        client.close()
        cache.stop()
    assert late == []
    assert ctx.metrics.get("dhcp_dropped_total", reason="stale") == 5
    assert fresh is not None and dhcp.parse_packet(fresh).xid == 7
    assert ctx.metrics.get("dhcp_packets_out_total", type="offer", port="dhcp") == 1


def test_full_mode_needs_a_range(keys: Keys) -> None:
    from lpmos.config import ConfigError

    ctx, cache = _ctx(MemoryStore(), keys, dhcp__mode="full")
    try:
        with pytest.raises(ConfigError, match=r"dhcp\.range"):
            DhcpService(ctx)
    finally:
        cache.stop()


def test_off_mode_binds_nothing(keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
    ctx, cache = _ctx(MemoryStore(), keys, dhcp__mode="off")
    service = DhcpService(ctx)
    try:
        loop.run_until_complete(service.start())
        assert service.sockets == []
        loop.run_until_complete(service.stop())
    finally:
        cache.stop()


def test_responder_full_mode_answers_plain_clients_with_address_only(keys: Keys) -> None:
    settings = settings_by_key([COMMON, NODE_SETTINGS, SETTINGS])
    config = resolve(settings, {"dhcp__mode": "full", "dhcp__range": "10.9.0.10-10.9.0.20",
                                "dhcp__router": "10.9.0.1"}, environ={})
    p = LeasePool("10.9.0.10", "10.9.0.20", 600)
    r = DhcpResponder(config, server_ip="10.9.0.1", advertise_url="http://10.9.0.1:8081", pool=p)
    reply = r.handle(dhcp.build_request(A, xid=9, vendor_class=b"udhcp 1.35"), ("0.0.0.0", 68))
    assert reply is not None
    pkt = dhcp.parse_packet(reply.data)
    assert pkt.msg_type == dhcp.OFFER and pkt.yiaddr == "10.9.0.10"
    assert pkt.boot_file == "" and pkt.options[dhcp.OPT_ROUTER] == dhcp.ip_bytes("10.9.0.1")
    assert reply.dest == ("255.255.255.255", 68)
    http = r.handle(dhcp.build_request(B, xid=10, arch=16, vendor_class=b"HTTPClient"),
                    ("0.0.0.0", 68))
    assert http is not None
    hp = dhcp.parse_packet(http.data)
    assert hp.vendor_class == b"HTTPClient"
    assert hp.boot_file == "http://10.9.0.1:8081/ipxe/ipxe.efi"


@pytest.mark.parametrize(("arch", "vc", "uc"), [(0, b"PXEClient", None), (9, b"PXEClient", None),
                                                (16, b"HTTPClient", None),
                                                (7, b"PXEClient", b"iPXE")])
def test_responder_template_reply_equals_plain_build(arch: int, vc: bytes,
                                                     uc: bytes | None) -> None:
    """The hot path's templates give the same bytes as the plain encoder."""
    config = resolve(settings_by_key([COMMON, NODE_SETTINGS, SETTINGS]), {}, environ={})
    r = DhcpResponder(config, server_ip="10.9.0.1", advertise_url="http://10.9.0.1:8081")
    uuid = bytes(range(16))
    for xid in (1, 2):                      # the second one comes from the template cache
        req = dhcp.build_request(A, xid=xid, arch=arch, vendor_class=vc, user_class=uc,
                                 uuid=uuid, flags=dhcp.FLAG_BROADCAST)
        reply = r.handle(req, ("0.0.0.0", 68))
        assert reply is not None
        decision = r._decide(dhcp.parse_packet(req))
        assert not isinstance(decision, BootRefusal)
        plain = r.boot_packet(dhcp.OFFER, decision, "10.9.0.1", port67=True)
        plain.xid, plain.chaddr, plain.flags = xid, bytes.fromhex(A.replace(":", "")), 0x8000
        plain.options[dhcp.OPT_CLIENT_UUID] = b"\x00" + uuid
        assert reply.data == dhcp.build_packet(plain)


def test_port_in_use_gives_a_clear_error(keys: Keys, loop: asyncio.AbstractEventLoop) -> None:
    import socket as socketlib

    holder = socketlib.socket(socketlib.AF_INET, socketlib.SOCK_DGRAM)
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    ctx, cache = _ctx(MemoryStore(), keys, dhcp__port=port)
    service = DhcpService(ctx)
    try:
        # --listen 127.0.0.1: the wildcard on the interface holding it (see decide_bind)
        with pytest.raises(OSError, match=f"cannot bind UDP 0.0.0.0:{port} on lo: ") as err:
            loop.run_until_complete(service.start())
        assert service.sockets == []
        # the holder (this process, without SO_REUSEADDR) is named
        assert f"(pid {os.getpid()}) holds the port without SO_REUSEADDR" in str(err.value)
    finally:
        holder.close()
        cache.stop()
