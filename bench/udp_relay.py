"""A UDP relay that delays, drops and duplicates datagrams: a hostile or
distant link between TFTP clients and a server, on loopback.

TFTP answers from a new port per transfer (the server's TID), so the relay
mirrors that: a client sends its request to the relay's listening port; the
relay forwards it to the target from an upstream socket of that client; each
server port that answers gets its own client-facing relay socket, so the
client sees one new port per transfer exactly as it would without the relay.

Every datagram in either direction is dropped with probability ``drop``,
else delivered after ``delay`` seconds, and delivered twice with probability
``duplicate``.  Order is kept (equal delays).  Delays are precise to tens of
microseconds: the relay waits with epoll while the next delivery is more than
a millisecond away and with short sleeps after that, because epoll's timeout
has millisecond resolution.

``spare_first`` datagrams of each flow in each direction pass unharmed: atftp
aborts a transfer on any repeated OACK ("unexpected OACK"), whatever the
server, so a test that wants to see the data phase survive loss spares the
negotiation.

Bounded: at most ``max_flows`` clients (the oldest is forgotten), idle flows
closed after ``idle`` seconds, at most ``max_queue`` datagrams in flight.

Usable in-process (``with UdpRelay(target, delay=...) as relay: relay.port``,
it runs in a daemon thread) or as a process:
``python -m bench.udp_relay --target 127.0.0.1:69 --delay 0.00025``.
"""

from __future__ import annotations

import argparse
import heapq
import random
import select
import signal
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class _Flow:
    client: tuple[str, int]
    upstream: socket.socket
    #: server address -> client-facing socket
    facing: dict[tuple[str, int], socket.socket] = field(default_factory=dict)
    last: float = 0.0
    #: datagrams seen so far towards the server and towards the client
    up_count: int = 0
    down_count: int = 0


class UdpRelay:
    def __init__(self, target: tuple[str, int], *, host: str = "127.0.0.1", port: int = 0,
                 delay: float = 0.0, drop: float = 0.0, duplicate: float = 0.0,
                 seed: int | None = None, max_flows: int = 1024, idle: float = 30.0,
                 max_queue: int = 100_000, spare_first: int = 0) -> None:
        self.target = target
        self.delay, self.drop, self.duplicate = delay, drop, duplicate
        self.max_flows, self.idle, self.max_queue = max_flows, idle, max_queue
        self.spare_first = spare_first
        self._rng = random.Random(seed)
        self._listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._listen.bind((host, port))
        self._listen.setblocking(False)
        self._bufsize(self._listen)
        self.host = host
        self._flows: dict[tuple[str, int], _Flow] = {}
        #: fd -> (kind, flow, server address)
        self._routes: dict[int, tuple[str, _Flow | None, tuple[str, int] | None]] = {
            self._listen.fileno(): ("listen", None, None)}
        self._socks: dict[int, socket.socket] = {self._listen.fileno(): self._listen}
        self._epoll = select.epoll()
        self._epoll.register(self._listen.fileno(), select.EPOLLIN)
        self._queue: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._seq = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.stats = {"forwarded": 0, "dropped": 0, "duplicated": 0, "overflow": 0}

    @property
    def port(self) -> int:
        return int(self._listen.getsockname()[1])

    @staticmethod
    def _bufsize(sock: socket.socket) -> None:
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            try:
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 * 1024 * 1024)
            except OSError:
                pass

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> UdpRelay:
        self._thread = threading.Thread(target=self.run, daemon=True, name="udp-relay")
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        for sock in list(self._socks.values()):
            sock.close()
        self._epoll.close()

    def __enter__(self) -> UdpRelay:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- the loop --------------------------------------------------------------

    def run(self) -> None:
        next_sweep = time.monotonic() + 1.0
        while not self._stop.is_set():
            now = time.monotonic()
            if self._queue:
                wait = self._queue[0][0] - now
                if wait > 0.0015:
                    events = self._epoll.poll(wait - 0.001)
                elif wait > 0:
                    events = self._epoll.poll(0)
                    if not events:
                        time.sleep(min(wait, 0.00005))
                else:
                    events = self._epoll.poll(0)
            else:
                events = self._epoll.poll(0.2)
            for fd, _ in events:
                self._receive(fd)
            self._deliver()
            if now > next_sweep:
                self._sweep(now)
                next_sweep = now + 1.0

    def _receive(self, fd: int) -> None:
        sock = self._socks.get(fd)
        route = self._routes.get(fd)
        if sock is None or route is None:
            return
        for _ in range(64):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            kind, flow, server = route
            now = time.monotonic()
            if kind == "listen":
                flow = self._flow_for(addr, now)
                if flow is None:
                    continue
                flow.up_count += 1
                self._enqueue(flow.upstream, data, self.target, now,
                              flow.up_count <= self.spare_first)
            elif kind == "upstream":
                assert flow is not None
                flow.last = now
                facing = flow.facing.get(addr)
                if facing is None:
                    facing = self._facing(flow, addr)
                flow.down_count += 1
                self._enqueue(facing, data, flow.client, now, flow.down_count <= self.spare_first)
            else:   # client-facing: from the client to the server port it maps
                assert flow is not None and server is not None
                flow.last = now
                if addr == flow.client:
                    flow.up_count += 1
                    self._enqueue(flow.upstream, data, server, now,
                                  flow.up_count <= self.spare_first)

    def _flow_for(self, client: tuple[str, int], now: float) -> _Flow | None:
        flow = self._flows.get(client)
        if flow is not None:
            flow.last = now
            return flow
        if len(self._flows) >= self.max_flows:
            oldest = min(self._flows.values(), key=lambda f: f.last)
            self._forget(oldest)
        up = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        up.bind((self.host, 0))
        up.setblocking(False)
        self._bufsize(up)
        flow = _Flow(client, up, last=now)
        self._flows[client] = flow
        self._add(up, ("upstream", flow, None))
        return flow

    def _facing(self, flow: _Flow, server: tuple[str, int]) -> socket.socket:
        if server == self.target:
            sock = self._listen   # answers from the server port come from ours
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((self.host, 0))
            sock.setblocking(False)
            self._bufsize(sock)
            self._add(sock, ("facing", flow, server))
        flow.facing[server] = sock
        return sock

    def _add(self, sock: socket.socket, route: tuple[str, _Flow | None,
                                                     tuple[str, int] | None]) -> None:
        self._socks[sock.fileno()] = sock
        self._routes[sock.fileno()] = route
        self._epoll.register(sock.fileno(), select.EPOLLIN)

    def _forget(self, flow: _Flow) -> None:
        self._flows.pop(flow.client, None)
        for sock in [flow.upstream, *flow.facing.values()]:
            if sock is self._listen:
                continue
            fd = sock.fileno()
            if fd >= 0:
                self._epoll.unregister(fd)
                self._socks.pop(fd, None)
                self._routes.pop(fd, None)
                sock.close()
        # queued datagrams on closed sockets fail harmlessly in _deliver

    def _sweep(self, now: float) -> None:
        for flow in [f for f in self._flows.values() if now - f.last > self.idle]:
            self._forget(flow)

    def _enqueue(self, sock: socket.socket, data: bytes, addr: tuple[str, int],
                 now: float, spare: bool = False) -> None:
        rng = self._rng
        if self.drop and not spare and rng.random() < self.drop:
            self.stats["dropped"] += 1
            return
        copies = 2 if self.duplicate and not spare and rng.random() < self.duplicate else 1
        if copies == 2:
            self.stats["duplicated"] += 1
        for _ in range(copies):
            if len(self._queue) >= self.max_queue:
                self.stats["overflow"] += 1
                return
            if self.delay <= 0 and not self._queue:
                self._send(sock, data, addr)
                continue
            self._seq += 1
            heapq.heappush(self._queue, (now + self.delay, self._seq, sock, data, addr))

    def _deliver(self) -> None:
        queue = self._queue
        now = time.monotonic()
        while queue and queue[0][0] <= now:
            _, _, sock, data, addr = heapq.heappop(queue)
            self._send(sock, data, addr)

    def _send(self, sock: socket.socket, data: bytes, addr: tuple[str, int]) -> None:
        try:
            sock.sendto(data, addr)
            self.stats["forwarded"] += 1
        except OSError:
            self.stats["dropped"] += 1


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udp_relay", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT clients send to")
    parser.add_argument("--target", required=True, help="HOST:PORT of the server")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds added each way")
    parser.add_argument("--drop", type=float, default=0.0, help="probability of a drop")
    parser.add_argument("--duplicate", type=float, default=0.0,
                        help="probability of a duplicate")
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    host, port = _hostport(args.listen)
    relay = UdpRelay(_hostport(args.target), host=host, port=port, delay=args.delay,
                     drop=args.drop, duplicate=args.duplicate, seed=args.seed)
    signal.signal(signal.SIGTERM, lambda *_: relay._stop.set())
    print(f"listening {host}:{relay.port}", flush=True)
    try:
        relay.run()
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["UdpRelay", "main"]


if __name__ == "__main__":
    raise SystemExit(main())
