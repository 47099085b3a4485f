"""Boot storm: N simulated machines network-boot and install at once.

Starts a real etcd (temporary directory) holding N approved image-mode
tasks, and ``lpmos regional`` (ProxyDHCP, TFTP and boot HTTP in one
process, exactly as operators run it) on loopback high ports.  Then N
simulated machines, each from its own loopback address (127.1.x.y, so the
node sees N clients, as on a real network), start within ``--ramp``
seconds and do what a UEFI machine and the live agent do:

1. PXE ROM: DHCPDISCOVER (options 60, 93, 94, 97) → ProxyDHCP OFFER; when
   the OFFER names no boot file (UEFI), DHCPREQUEST to the PXE boot
   server port → ACK with the file (retransmits at 1, 2, 4, 8 s);
2. TFTP of that file (``ipxe.efi``, 850 KB) with blksize 1468, tsize and
   windowsize 4 (EDK2's default), ACKing each window; size checked;
3. iPXE: DHCPDISCOVER with user class ``iPXE`` → the boot script URL;
4. ``GET /boot.ipxe`` then the per-machine script it chains to
   (``/boot/<mac>.ipxe?uuid=…``): an approved task is claimed there (fresh
   read + CAS in etcd) and the install script served;
5. the agent: ``POST /agent/v1/register`` (token), ``GET /agent/v1/task``
   (action install, with the rendered install config: the cloud-init seed),
   then one ``installing`` state event and 20 progress events produced
   ``--event-gap`` seconds apart, sent as the real agent's sender does
   (everything pending in one request, next request after the ack), the
   last one step ``rebooting``; heartbeats every interval the node asks for;
6. the installed system's first boot: ``POST /callback/<sn>`` succeeded.

Reported: total time (first DISCOVER to last success), the slowest machine
and its phases, per-phase medians, etcd writes per machine (etcd's own
revision and put/delete counters over the storm window), peak memory
(VmHWM) and CPU time of each process (node, etcd, this simulator), and
every retransmit and retry.  Bounded: N ≤ 5000, a deadline for the whole
storm, bounded retries per step; loopback only.

    python -m bench.storm                 # 1,000 machines
    python -m bench.storm --quick         # 20 machines
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import resource
import socket
import struct
import sys
import time
import uuid as uuidlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast
from urllib.parse import urlsplit

from bench.http_bench import (
    IDC,
    PREFIX,
    EtcdProcess,
    NodeProcess,
    fill_tasks,
    machine_info,
    proc_status,
    workspace,
    write_catalog,
)
from bench.http_loadgen import cpu_seconds, median, percentile
from bootsvc.wire import dhcp

REPO = Path(__file__).resolve().parent.parent
MAX_MACHINES = 5000
TARGET_SECONDS = 60.0
TARGET_WRITES = 10.0
ARCH_EFI_BC = 7
PXE_VENDOR = b"PXEClient:Arch:00007:UNDI:003016"
IPXE_FILE = Path("/usr/lib/ipxe/ipxe.efi")
DHCP_TRIES = (1.0, 2.0, 4.0, 8.0)
PHASES = ("dhcp", "tftp", "ipxe_dhcp", "script", "register", "task", "events", "callback")


class StepFailed(Exception):
    pass


# --- DHCP ----------------------------------------------------------------------------------


class _Udp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue(maxsize=256)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait((data, addr))


async def dhcp_exchange(local_ip: str, server: tuple[str, int], packet: bytes, xid: int,
                        want: int, stats: Counter[str]) -> dhcp.DhcpPacket:
    """Send ``packet`` until a reply of type ``want`` with ``xid`` arrives."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_Udp, local_addr=(local_ip, 0))
    try:
        for n, wait in enumerate(DHCP_TRIES):
            if n:
                stats["dhcp_retransmits"] += 1
            transport.sendto(packet, server)
            deadline = loop.time() + wait
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    data, _ = await asyncio.wait_for(proto.queue.get(), left)
                except TimeoutError:
                    break
                try:
                    reply = dhcp.parse_packet(data)
                except dhcp.MalformedPacket:
                    stats["dhcp_malformed"] += 1
                    continue
                mt = reply.options.get(dhcp.OPT_MESSAGE_TYPE, b"\0")[0]
                if reply.xid == xid and mt == want:
                    return reply
        raise StepFailed(f"no DHCP answer (type {want}) after {len(DHCP_TRIES)} tries")
    finally:
        transport.close()


def _bootfile(pkt: dhcp.DhcpPacket) -> str:
    name = pkt.file.split(b"\0", 1)[0].decode("ascii", "replace")
    if not name and dhcp.OPT_BOOTFILE in pkt.options:
        name = pkt.options[dhcp.OPT_BOOTFILE].split(b"\0", 1)[0].decode("ascii", "replace")
    return name


# --- TFTP ----------------------------------------------------------------------------------


class _TftpRead(asyncio.DatagramProtocol):
    """One RRQ: OACK → ACK 0 → DATA blocks, ACK at each window's end (or a
    gap: ACK the last block in order, RFC 7440)."""

    def __init__(self, window: int, done: asyncio.Future[int]) -> None:
        self.window = window
        self.done = done
        self.transport: asyncio.DatagramTransport | None = None
        self.peer: tuple[str, int] | None = None
        self.blksize = 512
        self.expected = 1
        self.received = 0
        self.tsize = -1
        self.last_at = 0.0
        self.last_ack = b""
        self.last_dup_ack = 0.0
        self.dup_acks = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (the selector loop's datagram transport is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def _ack(self, block: int) -> None:
        assert self.transport is not None and self.peer is not None
        self.last_ack = struct.pack("!HH", 4, block & 0xFFFF)
        self.transport.sendto(self.last_ack, self.peer)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.done.done() or len(data) < 4:
            return
        if self.peer is None:
            self.peer = addr
        elif addr != self.peer:
            return
        self.last_at = time.monotonic()
        op = data[1]
        if op == 3:                                        # DATA
            block = (data[2] << 8) | data[3]
            if block == (self.expected & 0xFFFF):
                n = len(data) - 4
                self.received += n
                self.expected += 1
                if n < self.blksize:
                    self._ack(block)
                    self.done.set_result(self.received)
                elif block % self.window == 0:
                    self._ack(block)
            elif self.expected > 1:
                # a gap (a block lost) or a duplicate (our ACK lost, or the
                # server timed out): ACK the last block in order, at most
                # once per 0.1 s, so duplicates never breed more duplicates
                now = self.last_at
                if now - self.last_dup_ack > 0.1:
                    self.last_dup_ack = now
                    self.dup_acks += 1
                    self._ack(self.expected - 1)
        elif op == 6:                                      # OACK
            fields = data[2:].split(b"\0")
            opts = {fields[i].decode().lower(): fields[i + 1].decode()
                    for i in range(0, len(fields) - 1, 2) if fields[i]}
            self.blksize = int(opts.get("blksize", "512"))
            self.window = int(opts.get("windowsize", "1"))
            self.tsize = int(opts.get("tsize", "-1"))
            self._ack(0)
        elif op == 5:                                      # ERROR
            msg = data[4:].split(b"\0", 1)[0].decode("ascii", "replace")
            self.done.set_exception(StepFailed(f"TFTP error {data[3]}: {msg}"))


async def tftp_get(local_ip: str, server: tuple[str, int], name: str, *, blksize: int,
                   window: int, timeout: float, retries: int, stats: Counter[str]) -> int:
    loop = asyncio.get_running_loop()
    done: asyncio.Future[int] = loop.create_future()
    transport, proto = await loop.create_datagram_endpoint(
        lambda: _TftpRead(window, done), local_addr=(local_ip, 0))
    rrq = (b"\0\x01" + name.encode() + b"\0octet\0blksize\0" + str(blksize).encode()
           + b"\0tsize\0" + b"0\0windowsize\0" + str(window).encode() + b"\0")
    try:
        transport.sendto(rrq, server)
        proto.last_at = time.monotonic()
        misses, seen = 0, proto.expected
        while not done.done():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(done), timeout)
            if done.done():
                break
            if proto.expected != seen:              # progress: the count starts again
                misses, seen = 0, proto.expected
            if time.monotonic() - proto.last_at < timeout:
                continue
            misses += 1
            if misses > retries:
                raise StepFailed(f"TFTP stalled at block {proto.expected}")
            stats["tftp_client_timeouts"] += 1
            if proto.peer is None:
                transport.sendto(rrq, server)
            else:
                proto._ack(proto.expected - 1)     # what we have: the server resumes there
            proto.last_at = time.monotonic()
        size = done.result()
        stats["tftp_client_dup_acks"] += proto.dup_acks
        if proto.tsize >= 0 and size != proto.tsize:
            raise StepFailed(f"TFTP got {size} bytes, tsize said {proto.tsize}")
        return size
    finally:
        transport.close()


# --- HTTP ----------------------------------------------------------------------------------


class Http:
    """A minimal HTTP/1.1 client on asyncio streams: ``keep_alive`` (iPXE)
    keeps one connection, reopened when the server closes it; otherwise
    (the agent, which uses urllib) one connection per request with
    ``Connection: close``."""

    def __init__(self, host: str, port: int, local_ip: str, timeout: float,
                 stats: Counter[str], *, keep_alive: bool = True) -> None:
        self.host, self.port, self.local_ip = host, port, local_ip
        self.keep_alive = keep_alive
        self.timeout = timeout
        self.stats = stats
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def close(self) -> None:
        # no wait_closed(): it can hang on a connection the server already
        # dropped; the transport closes on its own
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    async def request(self, method: str, path: str, body: Any = None,
                      token: str = "") -> tuple[int, bytes]:
        for attempt in range(3):
            try:
                return await asyncio.wait_for(self._once(method, path, body, token),
                                              self.timeout)
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as exc:
                self.stats[f"http_retry_{type(exc).__name__}"] += 1
                await self.close()
                if attempt == 2:
                    raise StepFailed(f"{method} {path}: {type(exc).__name__}") from None
                await asyncio.sleep(0.2 * (attempt + 1))
        raise AssertionError("unreachable")

    async def _once(self, method: str, path: str, body: Any, token: str) -> tuple[int, bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, local_addr=(self.local_ip, 0))
            self.stats["http_connects"] += 1
        assert self.reader is not None
        data = b"" if body is None else json.dumps(body, separators=(",", ":")).encode()
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
        if not self.keep_alive:
            head += "Connection: close\r\n"
        if token:
            head += f"Authorization: Bearer {token}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + data)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, lines[0].startswith("HTTP/1.0")
        for line in lines[1:]:
            k, _, v = line.partition(":")
            k = k.strip().lower()
            if k == "content-length":
                length = int(v)
            elif k == "connection":
                close = v.strip().lower() == "close"
        payload = await self.reader.readexactly(length) if length else b""
        if close or not self.keep_alive:
            await self.close()
        return status, payload


# --- one machine ---------------------------------------------------------------------------


@dataclass
class Machine:
    index: int
    sn: str
    mac: str
    uuid: str
    ip: str
    phases: dict[str, float] = field(default_factory=dict)
    started: float = 0.0
    finished: float = 0.0
    error: str = ""
    script_waits: int = 0


@dataclass
class Plan:
    machines: int
    ramp: float
    event_gap: float
    events: int
    blksize: int
    window: int
    deadline: float
    http_timeout: float


def make_machines(n: int) -> list[Machine]:
    out = []
    for i in range(n):
        ip = f"127.1.{i // 250}.{i % 250 + 2}"
        out.append(Machine(i, f"STORM{i:05d}", f"0a:4c:53:{(i >> 16) & 0xff:02x}:"
                           f"{(i >> 8) & 0xff:02x}:{i & 0xff:02x}",
                           str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"lpmos-storm-{i}")), ip))
    return out


async def boot_machine(m: Machine, plan: Plan, ports: dict[str, int], stats: Counter[str],
                       file_size: int) -> None:
    host = "127.0.0.1"
    t = time.monotonic()
    m.started = t

    def mark(phase: str) -> None:
        nonlocal t
        now = time.monotonic()
        m.phases[phase] = now - t
        t = now

    chaddr = bytes.fromhex(m.mac.replace(":", ""))
    uuid_bytes = uuidlib.UUID(m.uuid).bytes
    # 1. PXE ROM: DISCOVER → OFFER (→ REQUEST to the boot server port → ACK)
    xid = random.getrandbits(32)
    discover = dhcp.build_request(chaddr, dhcp.DISCOVER, xid=xid, arch=ARCH_EFI_BC,
                                  vendor_class=PXE_VENDOR, uuid=uuid_bytes)
    offer = await dhcp_exchange(m.ip, (host, ports["dhcp"]), discover, xid, dhcp.OFFER, stats)
    bootfile = _bootfile(offer)
    server_ip = offer.siaddr if offer.siaddr != dhcp.ZERO_IP else host
    if not bootfile:
        xid = random.getrandbits(32)
        req = dhcp.build_request(chaddr, dhcp.REQUEST, xid=xid, arch=ARCH_EFI_BC,
                                 vendor_class=PXE_VENDOR, uuid=uuid_bytes, ciaddr=m.ip)
        ack = await dhcp_exchange(m.ip, (host, ports["dhcp_proxy"]), req, xid, dhcp.ACK, stats)
        bootfile = _bootfile(ack)
        stats["dhcp_boot_server_requests"] += 1
    if not bootfile:
        raise StepFailed("no boot file offered")
    mark("dhcp")
    # 2. TFTP of the iPXE binary (a stalled transfer is started again, at
    # most twice, as firmware retrying the boot would)
    tftp_server = (server_ip if server_ip.startswith("127.") else host, ports["tftp"])
    for attempt in range(3):
        try:
            size = await tftp_get(m.ip, tftp_server, bootfile, blksize=plan.blksize,
                                  window=plan.window, timeout=1.0, retries=8, stats=stats)
            break
        except StepFailed:
            if attempt == 2:
                raise
            stats["tftp_restarts"] += 1
    if file_size and size != file_size:
        raise StepFailed(f"TFTP {bootfile}: {size} bytes, expected {file_size}")
    mark("tftp")
    # 3. iPXE asks again: the answer is the boot script URL
    xid = random.getrandbits(32)
    discover = dhcp.build_request(chaddr, dhcp.DISCOVER, xid=xid, arch=ARCH_EFI_BC,
                                  vendor_class=PXE_VENDOR, uuid=uuid_bytes, user_class=b"iPXE")
    offer = await dhcp_exchange(m.ip, (host, ports["dhcp"]), discover, xid, dhcp.OFFER, stats)
    script_url = _bootfile(offer)
    if not script_url.startswith("http://"):
        raise StepFailed(f"iPXE got {script_url!r}, not a boot script URL")
    mark("ipxe_dhcp")
    # 4. the boot scripts
    url = urlsplit(script_url)
    http = Http(url.hostname or host, url.port or 80, m.ip, plan.http_timeout, stats)
    try:
        status, body = await http.request("GET", url.path)
        if status != 200 or b"chain" not in body:
            raise StepFailed(f"/boot.ipxe: {status}")
        chained = re.search(rb"chain --replace --autofree (\S+)", body)
        if not chained:
            raise StepFailed("no chain URL in /boot.ipxe")
        path = urlsplit(chained.group(1).decode()).path.replace("${net0/mac}", m.mac)
        query = f"uuid={m.uuid}&serial={m.sn}&arch=x86_64&platform=efi&bootmac={m.mac}"
        for _attempt in range(6):
            status, body = await http.request("GET", f"{path}?{query}")
            if status == 200 and b"lpmos.mode=install" in body:
                break
            m.script_waits += 1
            stats["script_wait_answers"] += 1
            await asyncio.sleep(1.0)
        else:
            raise StepFailed(f"no install script: {status} {body[:200]!r}")
        mark("script")
    finally:
        await http.close()          # the kernel boots: iPXE is gone
    # 5. the agent (urllib: a connection per request)
    http = Http(http.host, http.port, m.ip, plan.http_timeout, stats, keep_alive=False)
    try:
        status, body = await http.request("POST", "/agent/v1/register", {
            "sn": m.sn, "uuid": m.uuid, "macs": [m.mac], "boot_mac": m.mac, "arch": "x86_64",
            "agent_version": "storm", "inventory": _inventory(m)})
        if status != 200:
            raise StepFailed(f"register: {status} {body[:200]!r}")
        reg = json.loads(body)
        token, sn = reg.get("token") or "", reg["sn"]
        if not token:
            raise StepFailed("register issued no token")
        interval = float(reg.get("heartbeat_interval") or 10.0)
        mark("register")
        query = f"/agent/v1/task?sn={sn}"
        for _poll in range(10):
            status, body = await http.request("GET", query, token=token)
            answer = json.loads(body) if status == 200 else {}
            if answer.get("action") == "install" and answer.get("install", {}).get("seed"):
                break
            if answer.get("action") != "wait":
                raise StepFailed(f"task: {status} {body[:200]!r}")
            # the node's cache has not caught up with the claim yet: long-poll
            stats["task_wait_answers"] += 1
            query = f"/agent/v1/task?sn={sn}&wait=10&revision={answer.get('revision', 0)}"
        else:
            raise StepFailed(f"task: no install after 10 polls: {body[:200]!r}")
        mark("task")
        beat_http = Http(http.host, http.port, m.ip, plan.http_timeout, stats,
                         keep_alive=False)
        stop_beats = asyncio.Event()
        beats = asyncio.create_task(_heartbeats(beat_http, sn, token, interval, stats,
                                                stop_beats))
        try:
            await _events(http, sn, token, plan, stats)
        finally:
            # a flag, not cancel(): 3.11's wait_for can swallow a cancellation
            stop_beats.set()
            await asyncio.wait({beats}, timeout=plan.http_timeout * 3 + 5)
            if not beats.done():
                beats.cancel()
            await beat_http.close()
        mark("events")
        # 6. first boot of the installed system
        status, body = await http.request("POST", f"/callback/{sn}", {
            "event": "firstboot", "status": "succeeded", "seq": 1,
            "message": "first boot complete"}, token=token)
        if status != 200 or json.loads(body).get("task_status") != "succeeded":
            raise StepFailed(f"callback: {status} {body[:200]!r}")
        mark("callback")
    finally:
        await http.close()
    m.finished = time.monotonic()


def _inventory(m: Machine) -> dict[str, Any]:
    return {"schema": 1, "collected_at": time.time(),
            "system": {"vendor": "LPMOS", "product": "storm", "serial": m.sn, "uuid": m.uuid},
            "firmware": {"mode": "uefi", "secure_boot": False},
            "cpu": {"model": "sim", "sockets": 1, "cores": 4, "threads": 8},
            "memory": {"total_bytes": 8 << 30, "dimms": []},
            "disks": [{"name": "sda", "model": "SIM", "serial": f"D{m.index}", "wwn": "",
                       "size_bytes": 64 << 30, "rotational": False, "removable": False,
                       "by_path": "pci-0000:00:1f.2-ata-1"}],
            "nics": [{"name": "eth0", "mac": m.mac, "driver": "virtio_net", "speed_mbps": 1000,
                      "link": True, "pci_address": "0000:00:03.0", "booted": True}],
            "unavailable": {}}


async def _heartbeats(http: Http, sn: str, token: str, interval: float,
                      stats: Counter[str], stop: asyncio.Event) -> None:
    while not stop.is_set():
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval * random.uniform(0.8, 1.2))
        if stop.is_set():
            return
        try:
            status, _ = await http.request("POST", "/agent/v1/heartbeat",
                                           {"sn": sn, "state": "installing"}, token=token)
        except StepFailed:
            stats["heartbeat_failed"] += 1
            continue
        stats["heartbeats" if status == 200 else f"heartbeat_{status}"] += 1


async def _events(http: Http, sn: str, token: str, plan: Plan, stats: Counter[str]) -> None:
    """An ``installing`` state event, then ``plan.events`` progress events
    produced ``event_gap`` apart; a sender like the agent's posts everything
    pending, then the next batch after the ack."""
    pending: list[dict[str, Any]] = [{"source": "agent", "seq": 1, "kind": "state",
                                      "status": "installing", "message": "writing the image",
                                      "at": time.time()}]
    produced = asyncio.Event()
    produced.set()
    finished = False

    async def produce() -> None:
        nonlocal finished
        for k in range(1, plan.events + 1):
            await asyncio.sleep(plan.event_gap)
            last = k == plan.events
            pending.append({"source": "agent", "seq": k + 1, "kind": "progress",
                            "step": "rebooting" if last else "writing",
                            "percent": round(100.0 * k / plan.events, 1),
                            "message": f"{k}/{plan.events}", "bytes_done": k << 20,
                            "bytes_total": plan.events << 20, "rate": 1e6, "at": time.time()})
            produced.set()
        finished = True
        produced.set()

    producer = asyncio.create_task(produce())
    try:
        while True:
            await produced.wait()
            produced.clear()
            if not pending:
                if finished:
                    break
                continue
            batch = list(pending)
            for _attempt in range(5):
                status, body = await http.request("POST", "/agent/v1/events",
                                                  {"sn": sn, "events": batch}, token=token)
                if status == 200:
                    break
                stats[f"events_{status}"] += 1
                await asyncio.sleep(0.5)
            else:
                raise StepFailed(f"events: {status} {body[:200]!r}")
            acked = set(json.loads(body).get("acked", []))
            stats["event_posts"] += 1
            del pending[:len(batch)]
            if len(acked) != len(batch):
                raise StepFailed(f"events: {len(acked)} of {len(batch)} acked")
            if pending:
                produced.set()
            elif finished:
                break
    finally:
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer


async def run_storm(machines: list[Machine], plan: Plan, ports: dict[str, int],
                    stats: Counter[str], file_size: int) -> float:
    """Start every machine within ``plan.ramp`` seconds; wait for all (or
    the deadline).  Returns the wall time from the first start to the last
    finish."""
    t0 = time.monotonic()

    async def one(m: Machine, delay: float) -> None:
        await asyncio.sleep(delay)
        try:
            await boot_machine(m, plan, ports, stats, file_size)
        except StepFailed as exc:
            m.error = str(exc)
        except Exception as exc:
            m.error = f"{type(exc).__name__}: {exc}"

    rng = random.Random(7)
    tasks = [asyncio.create_task(one(m, rng.uniform(0, plan.ramp))) for m in machines]
    _done, pending = await asyncio.wait(tasks, timeout=plan.deadline)
    for task in pending:
        task.cancel()
    for m in machines:
        if not m.finished and not m.error:
            m.error = "deadline"
    starts = [m.started for m in machines if m.started]
    ends = [m.finished for m in machines if m.finished]
    if not starts or not ends:
        return time.monotonic() - t0
    return max(ends) - min(starts)


# --- the benchmark ---------------------------------------------------------------------------


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def raise_nofile(want: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(want, hard), hard))


def storm_specs(machines: list[Machine]) -> list[dict[str, Any]]:
    return [{"sn": m.sn, "mac": m.mac, "os_type": "Lab OS", "image": "lab",
             "status": "approved"} for m in machines]


def summarize(machines: list[Machine], wall: float, stats: Counter[str],
              etcd_delta: dict[str, float], memory: dict[str, int], cpu: dict[str, float],
              node_metrics: dict[str, float]) -> dict[str, Any]:
    ok = [m for m in machines if m.finished and not m.error]
    totals = [m.finished - m.started for m in ok]
    slowest = max(ok, key=lambda m: m.finished - m.started) if ok else None
    n = max(len(ok), 1)
    errors = Counter(m.error.split(":")[0][:60] for m in machines if m.error)
    return {
        "machines": len(machines), "succeeded": len(ok), "failed": len(machines) - len(ok),
        "errors": dict(errors),
        "total_seconds": round(wall, 2),
        "machine_p50_s": round(percentile(totals, 50), 2),
        "machine_p99_s": round(percentile(totals, 99), 2),
        "slowest": None if slowest is None else {
            "sn": slowest.sn, "seconds": round(slowest.finished - slowest.started, 2),
            "phases": {k: round(v, 3) for k, v in slowest.phases.items()}},
        "phase_p50_s": {p: round(median([m.phases[p] for m in ok if p in m.phases]), 3)
                        for p in PHASES},
        "phase_max_s": {p: round(max([m.phases[p] for m in ok if p in m.phases] or [0]), 3)
                        for p in PHASES},
        "etcd": etcd_delta,
        "etcd_write_txns_per_machine": round(etcd_delta["revisions"] / n, 2),
        "etcd_key_writes_per_machine": round((etcd_delta["put"] + etcd_delta["delete"]) / n, 2),
        "vmhwm_mib": {k: round(v / 1024, 1) for k, v in memory.items()},
        "cpu_seconds": {k: round(v, 1) for k, v in cpu.items()},
        "client_stats": dict(stats),
        "node": node_metrics,
    }


def render(summary: dict[str, Any], plan: Plan) -> str:
    s = summary
    lines = [f"{'metric':<44} {'value':>14} {'target':>12}", "-" * 72]

    def row(label: str, value: str, target: str = "") -> None:
        lines.append(f"{label:<44} {value:>14} {target:>12}")

    row("machines succeeded", f"{s['succeeded']}/{s['machines']}", f"{s['machines']}")
    row("total time, first DISCOVER to last success (s)", f"{s['total_seconds']:.1f}",
        f"< {TARGET_SECONDS:.0f}" if plan.machines >= 1000 else "")
    row("machine time p50 / p99 (s)", f"{s['machine_p50_s']:.1f} / {s['machine_p99_s']:.1f}")
    if s["slowest"]:
        row(f"slowest machine ({s['slowest']['sn']}) (s)", f"{s['slowest']['seconds']:.1f}")
        worst = max(s["slowest"]["phases"].items(), key=lambda kv: kv[1])
        row(f"  its longest phase: {worst[0]} (s)", f"{worst[1]:.1f}")
    for p in PHASES:
        row(f"phase {p}: p50 / max (s)",
            f"{s['phase_p50_s'][p]:.2f} / {s['phase_max_s'][p]:.2f}")
    row("etcd write transactions per machine (revisions)",
        f"{s['etcd_write_txns_per_machine']:.2f}", f"<= {TARGET_WRITES:.0f}")
    row("etcd key writes per machine (puts+deletes)", f"{s['etcd_key_writes_per_machine']:.2f}")
    for name, mib in s["vmhwm_mib"].items():
        row(f"peak memory (VmHWM) {name} (MiB)", f"{mib:.0f}")
    for name, sec in s["cpu_seconds"].items():
        row(f"CPU time {name} (s)", f"{sec:.1f}")
    cs = s["client_stats"]
    row("DHCP retransmits / TFTP client timeouts / restarts",
        f"{cs.get('dhcp_retransmits', 0)} / {cs.get('tftp_client_timeouts', 0)} / "
        f"{cs.get('tftp_restarts', 0)}")
    row("HTTP retries / wait scripts / task waits",
        f"{sum(v for k, v in cs.items() if k.startswith('http_retry'))} / "
        f"{cs.get('script_wait_answers', 0)} / {cs.get('task_wait_answers', 0)}")
    row("event posts / heartbeats", f"{cs.get('event_posts', 0)} / {cs.get('heartbeats', 0)}")
    node = s["node"]
    row("node: TFTP retransmits / DHCP packets out",
        f"{node.get('lpmos_tftp_retransmits_total', 0):.0f} / "
        f"{node.get('lpmos_dhcp_packets_out_total', 0):.0f}")
    if s["errors"]:
        row("failures", json.dumps(s["errors"])[:60])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.storm", description=(
        "Boot storm: N simulated machines do ProxyDHCP, TFTP, boot scripts, agent registration, "
        "progress events and the first-boot callback against lpmos regional on a real etcd."))
    parser.add_argument("--quick", action="store_true", help="20 machines")
    parser.add_argument("--machines", "-n", type=int, default=None)
    parser.add_argument("--ramp", type=float, default=None,
                        help="seconds over which the machines power on (default 5)")
    parser.add_argument("--events", type=int, default=20, help="progress events per machine")
    parser.add_argument("--event-gap", type=float, default=None,
                        help="seconds between two progress events of one machine (default "
                             "0.1: a 2 s install, compressed; the real agent reports every 2 s "
                             "or 2%%; the node writes a task's progress at most every "
                             "--event-interval, 0.5 s)")
    parser.add_argument("--blksize", type=int, default=1468)
    parser.add_argument("--windowsize", type=int, default=4)
    parser.add_argument("--deadline", type=float, default=None,
                        help="seconds the whole storm may take (default 300)")
    parser.add_argument("--http-threads", type=int, default=None,
                        help="node's --http-threads (default: the node's own default)")
    parser.add_argument("--profile", action="store_true",
                        help="sample the node with py-spy during the storm and print where its "
                             "time goes")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    n = args.machines or (20 if args.quick else 1000)
    plan = Plan(machines=max(1, min(n, MAX_MACHINES)),
                ramp=args.ramp if args.ramp is not None else (1.0 if args.quick else 5.0),
                event_gap=args.event_gap if args.event_gap is not None else
                0.1,
                events=max(1, min(args.events, 500)), blksize=max(512, min(args.blksize, 8192)),
                window=max(1, min(args.windowsize, 64)),
                deadline=max(10.0, min(args.deadline or (120.0 if args.quick else 300.0),
                                       1800.0)),
                http_timeout=30.0)
    json_path = args.json or REPO / "bench" / "results" / (
        "storm-quick.json" if args.quick else "storm.json")
    raise_nofile(4 * plan.machines + 1024)
    machines = make_machines(plan.machines)
    file_size = IPXE_FILE.stat().st_size if IPXE_FILE.exists() else 0
    stats: Counter[str] = Counter()
    started_at = time.time()
    with workspace(args.keep) as work:
        print(f"storm: {plan.machines} approved tasks into etcd ({work}) ...", file=sys.stderr,
              flush=True)
        etcd = EtcdProcess(work)
        node: NodeProcess | None = None
        try:
            (work / "images").mkdir()
            catalog = write_catalog(work / "images")
            fill_tasks(etcd.url, storm_specs(machines))
            from lpmos.store.embedded import free_port

            ports = {"dhcp": free_udp_port(), "dhcp_proxy": free_udp_port(),
                     "tftp": free_udp_port(), "http": free_port()}
            extra = ["--dhcp-port", str(ports["dhcp"]), "--dhcp-proxy-port",
                     str(ports["dhcp_proxy"]), "--tftp-port", str(ports["tftp"])]
            if args.http_threads:
                extra += ["--http-threads", str(args.http_threads)]
            node = NodeProcess(work / "node", etcd.url, catalog, services="dhcp,tftp,http",
                               http_port=ports["http"], extra=extra)
            time.sleep(1.0)
            rev0, c0 = _revision(etcd.url), etcd.counters()
            cpu0 = {"node": cpu_seconds(node.pid), "etcd": cpu_seconds(etcd.pid),
                    "simulator": time.process_time()}
            print(f"storm: {plan.machines} machines power on within {plan.ramp:g} s ...",
                  file=sys.stderr, flush=True)
            spy = start_py_spy(node.pid, work / "py-spy.txt", plan.deadline + 30) \
                if args.profile else None
            try:
                wall = asyncio.run(run_storm(machines, plan, ports, stats, file_size))
            finally:
                stop_py_spy(spy)
            profile = py_spy_report(work / "py-spy.txt") if args.profile else ""
            time.sleep(2.5)                       # the node's timeline flush (1 s) settles
            rev1, c1 = _revision(etcd.url), etcd.counters()
            cpu = {"node": cpu_seconds(node.pid) - cpu0["node"],
                   "etcd": cpu_seconds(etcd.pid) - cpu0["etcd"],
                   "simulator": time.process_time() - cpu0["simulator"]}
            memory = {"node": proc_status(node.pid).get("VmHWM", 0),
                      "etcd": proc_status(etcd.pid).get("VmHWM", 0),
                      "simulator": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)}
            metrics = node.metrics()
            node_metrics: dict[str, float] = {}
            for key, value in metrics.items():
                base = key.split("{", 1)[0]
                if base.startswith(("lpmos_dhcp_", "lpmos_tftp_", "lpmos_http_",
                                    "lpmos_timeline_")) and \
                        not base.endswith(("_bucket", "_sum", "_count")):
                    node_metrics[base] = node_metrics.get(base, 0.0) + value
            succeeded_in_etcd = _count_succeeded(etcd.url, machines)
            by_kind = attribute_writes(etcd.url, rev0, rev1)
        finally:
            if node is not None:
                node.stop()
            etcd.stop()
    delta = {k: c1[k] - c0[k] for k in c0}
    delta["revisions"] = float(rev1 - rev0)
    summary = summarize(machines, wall, stats, delta, memory, cpu, node_metrics)
    summary["tasks_succeeded_in_etcd"] = succeeded_in_etcd
    summary["etcd_writes_by_kind"] = by_kind
    info = machine_info()
    print(f"Boot storm ({'quick' if args.quick else 'full'}): {plan.machines} UEFI machines "
          f"powered on within {plan.ramp:g} s; ProxyDHCP -> TFTP ipxe.efi (blksize "
          f"{plan.blksize}, windowsize {plan.window}) -> iPXE DHCP -> boot scripts (claim) -> "
          f"agent register/task -> {plan.events} progress events {plan.event_gap:g} s apart -> "
          f"first-boot callback; lpmos regional + etcd on loopback; "
          f"{info['nproc']} x {info['cpu']}")
    print(render(summary, plan))
    print(f"tasks succeeded in etcd: {succeeded_in_etcd}/{plan.machines}")
    n_ok = max(summary["succeeded"], 1)
    print("etcd writes per machine by key kind (key writes / write transactions): " + ", ".join(
        f"{kind} {count / n_ok:.2f}/{by_kind['txns'].get(kind, 0) / n_ok:.2f}"
        for kind, count in sorted(by_kind["key_writes"].items(), key=lambda kv: -kv[1])))
    if profile:
        print(profile)
    met = (summary["succeeded"] == plan.machines and
           summary["etcd_write_txns_per_machine"] <= TARGET_WRITES and
           (plan.machines < 1000 or summary["total_seconds"] < TARGET_SECONDS))
    verdict = (f"target (1,000 machines < {TARGET_SECONDS:.0f} s, <= {TARGET_WRITES:.0f} etcd "
               f"writes per machine): {'MET' if met else 'NOT MET'}"
               + ("" if plan.machines >= 1000 else " (fewer than 1,000 machines: time not "
                  "judged)"))
    print(verdict)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "storm", "quick": args.quick, "plan": plan.__dict__,
        "command": "python -m bench.storm" + (" --quick" if args.quick else ""),
        "machine": info, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started_at)),
        "summary": summary, "verdict": verdict,
        "machines_detail": [{"sn": m.sn, "error": m.error, "phases": m.phases,
                             "seconds": (m.finished - m.started) if m.finished else None}
                            for m in machines[:2000]]}, indent=1, sort_keys=True))
    print(f"results: {json_path}")
    return 0 if summary["succeeded"] == plan.machines else 1


def start_py_spy(pid: int, out: Path, seconds: float) -> Any:
    """``py-spy record`` of every thread of ``pid`` (raw collapsed stacks),
    or ``None`` when py-spy is not installed (``make setup`` installs it)."""
    import shutil
    import subprocess

    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(exe).exists():
        print("storm: py-spy not found; no profile", file=sys.stderr)
        return None
    return subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "50", "--format",
                             "raw", "--output", str(out), "--duration", str(int(seconds)),
                             "--nonblocking"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def stop_py_spy(proc: Any) -> None:
    import signal
    import subprocess

    if proc is None:
        return
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def py_spy_report(path: Path, top: int = 25) -> str:
    """Where the samples are: by function including callees, and by
    leaf function (self time), from py-spy's raw collapsed stacks."""
    inclusive: Counter[str] = Counter()
    leaf: Counter[str] = Counter()
    total = 0
    try:
        text = path.read_text()
    except OSError:
        return "(no profile written)"
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [re.sub(r":\d+\)$", ")", f.strip()) for f in stack.split(";") if f.strip()]
        if not frames:
            continue
        total += n
        leaf[frames[-1]] += n
        for f in set(frames):
            inclusive[f] += n
    if not total:
        return "(no samples)"
    lines = [f"py-spy: {total} samples of the regional node (all threads, idle included)",
             "  inclusive (function and what it calls):"]
    lines += [f"    {100 * c / total:5.1f}%  {f[:110]}" for f, c in inclusive.most_common(top)]
    lines.append("  self (leaf functions):")
    lines += [f"    {100 * c / total:5.1f}%  {f[:110]}" for f, c in leaf.most_common(top)]
    return "\n".join(lines)


def attribute_writes(etcd_url: str, rev0: int, rev1: int, seconds: float = 20.0
                     ) -> dict[str, dict[str, int]]:
    """Every write between two revisions, by key kind (task, server, mac,
    token, timeline, lease, node ...): key writes and write transactions
    (distinct revisions), read back from etcd's history with a watch."""
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    keys = Keys(PREFIX)
    store = EtcdStore([etcd_url], timeout=10.0)
    writes: Counter[str] = Counter()
    txns: dict[str, set[int]] = {}
    watch = store.watch(PREFIX + "/", rev0 + 1)
    deadline = time.monotonic() + seconds
    try:
        for events, _rev in watch:
            done = False
            for ev in events:
                if ev.mod_revision > rev1:
                    done = True
                    continue
                parsed = keys.parse(ev.key)
                kind = (parsed.kind if parsed is not None else "other") + \
                    ("-delete" if ev.type == "delete" else "")
                writes[kind] += 1
                txns.setdefault(kind, set()).add(ev.mod_revision)
                if ev.mod_revision >= rev1:
                    done = True
            if done or time.monotonic() > deadline:
                break
    finally:
        watch.close()
        store.close()
    return {"key_writes": dict(writes), "txns": {k: len(v) for k, v in txns.items()}}


def _revision(etcd_url: str) -> int:
    from lpmos.store.etcd import EtcdStore

    store = EtcdStore([etcd_url], timeout=10.0)
    try:
        return store.revision()
    finally:
        store.close()


def _count_succeeded(etcd_url: str, machines: list[Machine]) -> int:
    from lpmos.models import Task
    from lpmos.store import range_all
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    keys = Keys(PREFIX)
    store = EtcdStore([etcd_url], timeout=10.0)
    try:
        wanted = {m.sn for m in machines}
        count = 0
        for kv in range_all(store, keys.idc(IDC)).items:
            parsed = keys.parse(kv.key)
            if parsed is not None and parsed.kind == "task" and parsed.name in wanted:
                if Task.from_json(kv.value).status == "succeeded":
                    count += 1
        return count
    finally:
        store.close()


if __name__ == "__main__":
    raise SystemExit(main())
