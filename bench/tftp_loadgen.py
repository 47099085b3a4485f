"""A TFTP load generator: many concurrent read transfers from one process,
on a bare epoll loop (no asyncio, to keep the client's cost per datagram
low), with optional RFC 7440 windowsize, verifying every transfer's size and
sha256.

The same generator drives every server in ``bench.tftp_bench``.  Bounded:
``transfers`` in total, at most ``concurrency`` at once, every transfer
retransmits at most ``retries`` times, and the whole run stops at
``deadline`` seconds.

``python -m bench.tftp_loadgen --server 127.0.0.1:69 --file f --transfers 50
--concurrency 50 --blksize 1468 [--windowsize 16] [--sha256 HEX]`` prints one
JSON object: ok, failed, seconds, bytes, MB/s, per-transfer latency
percentiles, and the generator's own CPU seconds.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import select
import socket
import struct
import sys
import time
from dataclasses import dataclass
from typing import Any

_ACKS = tuple(struct.pack("!HH", 4, n) for n in range(65536))


def _request(name: str, blksize: int, windowsize: int, tsize: bool) -> bytes:
    parts = [b"\x00\x01", name.encode(), b"\x00octet\x00"]
    if blksize != 512:
        parts.append(b"blksize\x00%d\x00" % blksize)
    if windowsize > 1:
        parts.append(b"windowsize\x00%d\x00" % windowsize)
    if tsize:
        parts.append(b"tsize\x000\x00")
    return b"".join(parts)


@dataclass
class _Transfer:
    sock: socket.socket
    started: float
    request: bytes
    blksize: int = 512
    window: int = 1
    expected: int = 1          # next block wanted (absolute)
    in_window: int = 0
    received: int = 0
    connected: bool = False
    last_sent: bytes = b""
    deadline: float = 0.0
    retries: int = 0
    digest: Any = None


@dataclass
class Result:
    ok: int
    failed: int
    seconds: float
    bytes: int
    latencies: list[float]
    errors: dict[str, int]
    cpu_seconds: float

    def as_dict(self) -> dict[str, Any]:
        lat = sorted(self.latencies)

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 6) if lat else 0.0

        return {"ok": self.ok, "failed": self.failed, "seconds": round(self.seconds, 6),
                "bytes": self.bytes,
                "mb_per_s": round(self.bytes / self.seconds / 1e6, 2) if self.seconds else 0,
                "p50": pct(0.5), "p99": pct(0.99), "max": pct(1.0),
                "errors": self.errors, "cpu_seconds": round(self.cpu_seconds, 3)}


def run(server: tuple[str, int], name: str, *, transfers: int = 1, concurrency: int = 1,
        blksize: int = 512, windowsize: int = 1, tsize: bool = False,
        expect_size: int | None = None, expect_sha256: str | None = None,
        timeout: float = 1.0, retries: int = 10, deadline: float = 120.0,
        bind_host: str = "127.0.0.1") -> Result:
    """Run ``transfers`` downloads of ``name``, ``concurrency`` at a time."""
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    ep = select.epoll()
    active: dict[int, _Transfer] = {}
    request = _request(name, blksize, windowsize, tsize)
    started_count = ok = failed = total_bytes = 0
    latencies: list[float] = []
    errors: dict[str, int] = {}
    verify = expect_sha256 is not None
    t0 = time.monotonic()
    stop_at = t0 + deadline

    def start() -> None:
        nonlocal started_count
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.bind((bind_host, 0))
        sock.setblocking(False)
        now = time.monotonic()
        tr = _Transfer(sock, now, request, deadline=now + timeout,
                       digest=hashlib.sha256() if verify else None)
        tr.last_sent = request
        sock.sendto(request, server)
        active[sock.fileno()] = tr
        ep.register(sock.fileno(), select.EPOLLIN)
        started_count += 1

    def finish(tr: _Transfer, error: str = "") -> None:
        nonlocal ok, failed, total_bytes
        fd = tr.sock.fileno()
        ep.unregister(fd)
        del active[fd]
        tr.sock.close()
        size = tr.received
        if not error and expect_size is not None and size != expect_size:
            error = "wrong_size"
        if not error and verify and tr.digest.hexdigest() != expect_sha256:
            error = "wrong_sha256"
        if error:
            failed += 1
            errors[error] = errors.get(error, 0) + 1
        else:
            ok += 1
            total_bytes += size
            latencies.append(time.monotonic() - tr.started)

    def send(tr: _Transfer, packet: bytes, addr: tuple[str, int] | None = None) -> None:
        tr.last_sent = packet
        try:
            if tr.connected:
                tr.sock.send(packet)
            else:
                tr.sock.sendto(packet, addr or server)
        except OSError:
            pass

    def on_packet(tr: _Transfer, data: bytes, addr: tuple[str, int] | None) -> None:
        if not tr.connected:
            if addr is None:
                return
            tr.sock.connect(addr)
            tr.connected = True
        if len(data) < 4:
            return
        op = data[1]
        if op == 3:
            block = (data[2] << 8) | data[3]
            payload = data[4:]
            if block == tr.expected & 0xFFFF:
                tr.expected += 1
                tr.received += len(payload)
                if tr.digest is not None:
                    tr.digest.update(payload)
                tr.in_window += 1
                tr.retries = 0
                tr.deadline = time.monotonic() + timeout
                if len(payload) < tr.blksize:
                    send(tr, _ACKS[block])
                    finish(tr)
                    return
                if tr.in_window >= tr.window:
                    tr.in_window = 0
                    send(tr, _ACKS[block])
            elif tr.window > 1 and 0 < (block - tr.expected) & 0xFFFF < 0x8000:
                # RFC 7440: a gap; acknowledge the last block in order
                tr.in_window = 0
                send(tr, _ACKS[(tr.expected - 1) & 0xFFFF])
        elif op == 6:
            fields = data[2:].split(b"\0")
            opts = {fields[i].lower(): fields[i + 1] for i in range(0, len(fields) - 1, 2)}
            tr.blksize = int(opts.get(b"blksize", b"512"))
            tr.window = int(opts.get(b"windowsize", b"1"))
            tr.retries = 0
            tr.deadline = time.monotonic() + timeout
            send(tr, _ACKS[0])
        elif op == 5:
            finish(tr, f"error_{(data[2] << 8) | data[3]}")

    while (started_count < transfers or active) and time.monotonic() < stop_at:
        while started_count < transfers and len(active) < concurrency:
            start()
        for fd, _ in ep.poll(0.05):
            tr = active.get(fd)
            if tr is None:
                continue
            for _ in range(tr.window + 1):
                try:
                    if tr.connected:
                        data, addr = tr.sock.recv(70000), None
                    else:
                        data, addr = tr.sock.recvfrom(70000)
                except (BlockingIOError, InterruptedError):
                    break
                except OSError:
                    finish(tr, "refused")
                    break
                on_packet(tr, data, addr)
                if fd not in active or tr.window == 1:
                    break
        now = time.monotonic()
        for tr in [t for t in active.values() if t.deadline < now]:
            tr.retries += 1
            if tr.retries > retries:
                finish(tr, "timeout")
                continue
            tr.deadline = now + timeout
            tr.in_window = 0
            send(tr, tr.last_sent)
    for tr in list(active.values()):
        finish(tr, "deadline")
    failed += transfers - started_count
    if transfers > started_count:
        errors["not_started"] = transfers - started_count
    seconds = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    ep.close()
    cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return Result(ok, failed, seconds, total_bytes, latencies, errors, cpu)


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tftp_loadgen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", required=True, help="HOST:PORT")
    parser.add_argument("--file", required=True)
    parser.add_argument("--transfers", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--blksize", type=int, default=512)
    parser.add_argument("--windowsize", type=int, default=1)
    parser.add_argument("--tsize", action="store_true")
    parser.add_argument("--size", type=int, default=None, help="expected size")
    parser.add_argument("--sha256", default=None, help="expected sha256 (hex)")
    parser.add_argument("--timeout", type=float, default=1.0)
    parser.add_argument("--retries", type=int, default=10)
    parser.add_argument("--deadline", type=float, default=120.0)
    parser.add_argument("--start-at", type=float, default=None,
                        help="wall-clock time (epoch seconds) to start at, so that "
                             "several generators start together")
    args = parser.parse_args(argv)
    if args.start_at is not None:
        time.sleep(max(0.0, min(30.0, args.start_at - time.time())))
    if args.transfers > 100_000 or args.concurrency > 4096:
        parser.error("at most 100000 transfers and 4096 concurrent")
    result = run(_hostport(args.server), args.file, transfers=args.transfers,
                 concurrency=args.concurrency, blksize=args.blksize,
                 windowsize=args.windowsize, tsize=args.tsize, expect_size=args.size,
                 expect_sha256=args.sha256, timeout=args.timeout, retries=args.retries,
                 deadline=args.deadline)
    json.dump(result.as_dict(), sys.stdout)
    sys.stdout.write("\n")
    return 0 if result.failed == 0 else 1


__all__ = ["Result", "run"]


if __name__ == "__main__":
    raise SystemExit(main())
