"""HTTP/1.1 load generator for the boot HTTP benchmark.

Closed loop: ``connections`` keep-alive connections, each sending one GET,
waiting for the whole answer, then sending the next (no pipelining), for at
most ``duration`` seconds and at most ``max_requests`` requests.  Every
request has a deadline (``timeout``); a late answer counts as an error and
its connection is replaced.  A server that answers ``Connection: close``
(gunicorn's sync workers do) gets a new connection for the next request,
and the connect time is part of that request's latency.

Written on one ``select.epoll`` with non-blocking sockets and a minimal
response parser (status line, ``Content-Length``, ``Connection``), no
asyncio and no HTTP library, so that one client process costs a few tens of
microseconds per request (a new connection a few tens more);
``processes`` > 1 splits the connections over several processes.  The
benchmark shows the generator is not the bottleneck by running it against
:func:`serve_canned` (a canned answer from an asyncio server, the cheapest
server there is) and reporting that ceiling next to the measured servers.

    python -m bench.http_loadgen http://127.0.0.1:8081/boot.ipxe -c 16 -d 5
    python -m bench.http_loadgen --canned-ceiling
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import multiprocessing
import os
import resource
import select
import socket
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

MAX_CONNECTIONS = 1024
MAX_DURATION = 600.0
MAX_HEADER = 64 * 1024
MAX_BODY = 64 * 1024 * 1024


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    vals = sorted(v for v in values if v == v)
    if not vals:
        return float("nan")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2


@dataclass
class LoadResult:
    """What one run measured.  ``latencies`` are seconds, successful
    requests only (status as expected)."""

    duration: float = 0.0
    latencies: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    connects: int = 0
    body_bytes: int = 0
    client_cpu: float = 0.0

    @property
    def ok(self) -> int:
        return len(self.latencies)

    def merge(self, other: LoadResult) -> None:
        self.duration = max(self.duration, other.duration)
        self.latencies.extend(other.latencies)
        self.statuses.update(other.statuses)
        self.errors.update(other.errors)
        self.connects += other.connects
        self.body_bytes += other.body_bytes
        self.client_cpu += other.client_cpu

    def summary(self) -> dict[str, float]:
        d = max(self.duration, 1e-9)
        lat = self.latencies
        return {
            "requests": float(self.ok),
            "rate_per_s": round(self.ok / d, 1),
            "p50_ms": round(percentile(lat, 50) * 1000, 3),
            "p99_ms": round(percentile(lat, 99) * 1000, 3),
            "max_ms": round(max(lat) * 1000, 3) if lat else float("nan"),
            "errors": float(sum(self.errors.values())),
            "connects": float(self.connects),
            "avg_body_bytes": round(self.body_bytes / max(self.ok, 1), 1),
            "client_cpu_pct": round(100 * self.client_cpu / d, 1),
            "client_cpu_us_per_req": round(self.client_cpu / max(self.ok, 1) * 1e6, 1),
        }

    def to_dict(self) -> dict[str, Any]:
        return {"duration": self.duration, "latencies": self.latencies,
                "statuses": dict(self.statuses), "errors": dict(self.errors),
                "connects": self.connects, "body_bytes": self.body_bytes,
                "client_cpu": self.client_cpu}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoadResult:
        return cls(d["duration"], list(d["latencies"]), Counter({int(k): v for k, v in
                                                                 d["statuses"].items()}),
                   Counter(d["errors"]), d["connects"], d["body_bytes"], d["client_cpu"])


class ProtocolError(Exception):
    pass


@dataclass
class Target:
    host: str
    port: int
    requests: list[bytes]     # cycled round-robin, each connection from its own offset


def build_requests(url: str, paths: Sequence[str], headers: dict[str, str] | None = None
                   ) -> Target:
    """A :class:`Target` for ``url``'s host and port, one GET per path
    (``paths`` empty: the URL's own path)."""
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    port = parts.port or 80
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    wanted = list(paths) or [parts.path + (f"?{parts.query}" if parts.query else "") or "/"]
    reqs = [f"GET {p} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}\r\n".encode() for p in wanted]
    return Target(host, port, reqs)


class _Conn:
    """One client connection's state (see :func:`run_loop`)."""

    __slots__ = ("body", "buf", "close", "need", "next", "sock", "started", "status",
                 "until_eof")

    def __init__(self, sock: socket.socket, next_index: int) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.next = next_index
        self.started = 0.0
        self.need = -1            # body bytes still expected; -1: header not parsed yet
        self.status = 0
        self.close = False
        self.until_eof = False
        self.body = 0


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, content length or -1, close) of a response header block
    (lower-cased, without the blank line).  Pure; ProtocolError if unusable."""
    try:
        status = int(head[9:12])
    except ValueError:
        raise ProtocolError("bad status line") from None
    close = head.startswith(b"http/1.0") and b"\r\nconnection: keep-alive" not in head
    if b"\r\nconnection: close" in head:
        close = True
    if b"\r\ntransfer-encoding:" in head:
        raise ProtocolError("chunked answers are not supported")
    pos = head.find(b"\r\ncontent-length:")
    if pos < 0:
        return status, -1, True
    eol = head.find(b"\r\n", pos + 2)
    try:
        length = int(head[pos + 17: eol if eol > 0 else len(head)].strip())
    except ValueError:
        raise ProtocolError("bad content-length") from None
    if length < 0 or length > MAX_BODY:
        raise ProtocolError("bad content-length")
    return status, length, close


def run_loop(target: Target, *, connections: int, duration: float,
             max_requests: int = 10_000_000, timeout: float = 5.0, expect: int = 200,
             offset: int = 0) -> LoadResult:
    """The closed loop on one ``epoll`` in this thread (no asyncio: a
    keep-alive request costs ~15-25 us of client CPU, a new connection a
    few tens more)."""
    connections = max(1, min(connections, MAX_CONNECTIONS))
    duration = max(0.05, min(duration, MAX_DURATION))
    result = LoadResult()
    ep = select.epoll()
    conns: dict[int, _Conn] = {}
    reqs = target.requests
    addr = (target.host, target.port)
    perf = time.perf_counter
    budget = max_requests
    lat = result.latencies
    statuses = result.statuses
    errors = result.errors
    cpu0 = time.process_time()
    t_start = perf()
    stop_at = t_start + duration
    step = max(1, len(reqs) // connections)

    def open_conn(index: int) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(addr)
        c = _Conn(sock, index)
        result.connects += 1
        conns[sock.fileno()] = c
        if err in (0, errno.EISCONN):
            ep.register(sock.fileno(), select.EPOLLIN)
            send(c)
        elif err in (errno.EINPROGRESS, errno.EAGAIN):
            c.started = perf()
            ep.register(sock.fileno(), select.EPOLLOUT)
        else:
            errors[errno.errorcode.get(err, str(err))] += 1
            drop(c)

    def drop(c: _Conn) -> None:
        fd = c.sock.fileno()
        if fd >= 0:
            conns.pop(fd, None)
            with contextlib.suppress(OSError, ValueError):
                ep.unregister(fd)
            c.sock.close()

    def send(c: _Conn) -> None:
        nonlocal budget
        if budget <= 0 or perf() >= stop_at:
            drop(c)
            return
        budget -= 1
        if not c.started:
            c.started = perf()
        c.need = -1
        c.buf.clear()
        c.body = 0
        try:
            c.sock.send(reqs[c.next % len(reqs)])
        except OSError as exc:
            errors[type(exc).__name__] += 1
            replace(c)

    def replace(c: _Conn) -> None:
        drop(c)
        if budget > 0 and perf() < stop_at:
            open_conn(c.next)

    def finish(c: _Conn) -> None:
        elapsed = perf() - c.started
        c.started = 0.0
        c.next += 1
        statuses[c.status] += 1
        if c.status == expect:
            lat.append(elapsed)
            result.body_bytes += c.body
        else:
            errors[f"status_{c.status}"] += 1
        if c.close:
            replace(c)
        else:
            send(c)

    for n in range(connections):
        open_conn(offset + n * step)
    last_check = perf()
    try:
        while conns:
            now = perf()
            if now - last_check > 0.1:
                last_check = now
                for c in list(conns.values()):
                    if c.started and now - c.started > timeout:
                        errors["timeout"] += 1
                        c.started = 0.0
                        replace(c)
                if now > stop_at + timeout + 1:
                    break
            for fd, ev in ep.poll(0.1):
                found = conns.get(fd)
                if found is None:
                    continue
                c = found
                if ev & select.EPOLLOUT:           # a connect that was in progress
                    err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if err:
                        errors[errno.errorcode.get(err, str(err))] += 1
                        replace(c)
                        continue
                    ep.modify(fd, select.EPOLLIN)
                    send(c)
                    continue
                try:
                    data = c.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    errors[type(exc).__name__] += 1
                    replace(c)
                    continue
                if not data:
                    if c.need >= 0 and c.until_eof:
                        finish(c)
                    elif c.started:
                        errors["closed"] += 1
                        c.started = 0.0
                        replace(c)
                    else:
                        drop(c)
                    continue
                if c.need >= 0:
                    c.body += len(data)
                    if not c.until_eof:
                        c.need -= len(data)
                        if c.need <= 0:
                            finish(c)
                    continue
                c.buf += data
                end = c.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(c.buf) > MAX_HEADER:
                        errors["header too large"] += 1
                        replace(c)
                    continue
                try:
                    c.status, length, c.close = parse_head(bytes(c.buf[:end]).lower())
                except ProtocolError as exc:
                    errors[str(exc)] += 1
                    replace(c)
                    continue
                have = len(c.buf) - end - 4
                c.body = have
                c.until_eof = length < 0
                if c.until_eof:
                    c.need = MAX_BODY
                    continue
                c.need = length - have
                if c.need <= 0:
                    finish(c)
    finally:
        for c in list(conns.values()):
            drop(c)
        ep.close()
    result.duration = min(perf(), stop_at) - t_start
    result.client_cpu = time.process_time() - cpu0
    return result


def _child(target: Target, kw: dict[str, Any], conn: Any) -> None:
    try:
        res = run_loop(target, **kw)
        conn.send(json.dumps(res.to_dict()))
    except Exception as exc:  # report, do not hang the parent
        conn.send(json.dumps({"error": repr(exc)}))
    finally:
        conn.close()


def run(target: Target, *, connections: int = 16, duration: float = 5.0,
        max_requests: int = 10_000_000, timeout: float = 5.0, expect: int = 200,
        processes: int = 1) -> LoadResult:
    """Run the closed loop; with ``processes`` > 1 the connections (and the
    request budget) are split over that many child processes, results merged."""
    processes = max(1, min(processes, 16, connections))
    if processes == 1:
        return run_loop(target, connections=connections, duration=duration,
                        max_requests=max_requests, timeout=timeout, expect=expect)
    ctx = multiprocessing.get_context("fork")
    pipes, procs = [], []
    per = connections // processes
    for n in range(processes):
        conns = per + (1 if n < connections % processes else 0)
        parent, child = ctx.Pipe(duplex=False)
        kw = {"connections": conns, "duration": duration,
              "max_requests": max_requests // processes, "timeout": timeout, "expect": expect,
              "offset": n * 7919}
        p = ctx.Process(target=_child, args=(target, kw, child), daemon=True)
        p.start()
        child.close()
        pipes.append(parent)
        procs.append(p)
    merged = LoadResult()
    for parent, p in zip(pipes, procs, strict=True):
        if parent.poll(duration + timeout + 30):
            data = json.loads(parent.recv())
            if "error" in data:
                merged.errors["child: " + data["error"][:80]] += 1
            else:
                merged.merge(LoadResult.from_dict(data))
        else:
            merged.errors["child_timeout"] += 1
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()
    return merged


# --- the ceiling reference: the cheapest HTTP server there is ---------------------------


class _Canned(asyncio.Protocol):
    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > MAX_HEADER:
            assert self.transport is not None
            self.transport.close()
            return
        n = self.buf.count(b"\r\n\r\n")
        if n:
            self.buf = self.buf[self.buf.rfind(b"\r\n\r\n") + 4:]
            assert self.transport is not None
            self.transport.write(self.answer * n)


def canned_answer(body: bytes) -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
            + str(len(body)).encode() + b"\r\n\r\n" + body)


def serve_canned(sock: socket.socket, body: bytes, seconds: float) -> None:
    """Answer every request on ``sock`` (a listening socket) with ``body``,
    keep-alive, for at most ``seconds`` (run it in a child process)."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: _Canned(canned_answer(body)), sock=sock)
        async with server:
            await asyncio.sleep(seconds)

    asyncio.run(main())


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (seconds), 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def canned_ceiling(body: bytes, *, connections: int = 16, duration: float = 3.0,
                   processes: int = 1) -> dict[str, float]:
    """The generator against :func:`serve_canned` in a child process: the
    most this generator can measure here (server and client share the CPUs)."""
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    port = sock.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    server = ctx.Process(target=serve_canned, args=(sock, body, duration + 30), daemon=True)
    server.start()
    sock.close()
    try:
        time.sleep(0.2)
        target = build_requests(f"http://127.0.0.1:{port}/ceiling", [])
        cpu0 = cpu_seconds(server.pid or 0)
        res = run(target, connections=connections, duration=duration, processes=processes)
        summary = res.summary()
        summary["server_cpu_pct"] = round(
            100 * (cpu_seconds(server.pid or 0) - cpu0) / max(res.duration, 1e-9), 1)
        return summary
    finally:
        server.kill()
        server.join(5)


def peak_rss_kib() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_loadgen", description=(
        "Closed-loop HTTP/1.1 keep-alive load generator (bounded in connections, time and "
        "requests)."))
    parser.add_argument("url", nargs="?", help="http://HOST:PORT/PATH")
    parser.add_argument("-c", "--connections", type=int, default=16)
    parser.add_argument("-d", "--duration", type=float, default=5.0)
    parser.add_argument("-n", "--max-requests", type=int, default=10_000_000)
    parser.add_argument("-p", "--processes", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=5.0)
    parser.add_argument("--canned-ceiling", action="store_true",
                        help="measure the generator against a canned-answer asyncio server")
    parser.add_argument("--body-bytes", type=int, default=553)
    args = parser.parse_args(argv)
    if args.canned_ceiling:
        print(json.dumps(canned_ceiling(b"x" * args.body_bytes, connections=args.connections,
                                        duration=args.duration, processes=args.processes)))
        return 0
    if not args.url:
        parser.error("a URL or --canned-ceiling is required")
    res = run(build_requests(args.url, []), connections=args.connections,
              duration=args.duration, max_requests=args.max_requests, timeout=args.timeout,
              processes=args.processes)
    out: dict[str, Any] = dict(res.summary())
    out["statuses"] = dict(res.statuses)
    out["error_kinds"] = dict(res.errors)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
