"""Image delivery benchmark: N machines pull the same disk image at once,
from the regional node and from Debian's nginx, side by side in one run.

* **ours** — ``lpmos regional --services http`` (its own process, on a
  real etcd started here) serving the image-mode catalog entry
  ``/images/bench/disk.img`` (a machine token is required, as for real
  installs; the bench stores one in etcd);
* **reference** — Debian's nginx (``nginx-light``), ``sendfile on``,
  ``worker_processes auto`` (the package's default), on a high loopback
  port, serving the very same file; started and stopped by PID with a
  configuration written to a temporary directory.

The file is real data (``os.urandom``, never sparse), made once and kept
under ``/var/tmp/lpmos-bench/`` (with its sha256) for later runs, and read
once before the rounds so both servers serve it from the page cache.

The load: ``N`` clients (asyncio, ``--workers`` processes, each body read
into one reused buffer) start at the same instant and each download the
whole file; a share of them (``--drop``, 10 %) drops the connection at a
point between 20 % and 80 % of the file and resumes on a new connection
with ``Range: bytes=<received>-`` and ``If-Range``, checking the 206 and
its ``Content-Range``.  Every body is checked: the first 64 bytes of each
read against the file at that offset (``--verify sample``, the default),
or the sha256 of the whole download (``--verify sha256``, quick mode).

Per round and server: aggregate throughput (every body byte / the last
finish), finishing times p50 / p99 and their spread p99/p50, errors, the
server's CPU seconds and memory (the node's RSS before, peak and after,
sampled from /proc; nginx's summed over its processes).  Rounds alternate
the order (ours first, then nginx first, ...).  Each round has a deadline;
a client not done by then is an error.

    python -m bench.image_bench                     # N = 50 and 200, 1 GiB, 2 rounds
    python -m bench.image_bench --quick             # 16 MiB, N = 4 and 8
    python -m bench.image_bench --clients 200 --rounds 3 --size-mib 1024

Targets (issue #23 item 3): throughput >= 0.9x nginx; spread p99/p50 no
worse than nginx's; the node's peak RSS does not grow with N (at the
largest N within 8 MiB of the smallest N's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import mmap
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.http_bench import (
    IDC,
    PREFIX,
    EtcdProcess,
    NodeProcess,
    env,
    process_tree,
    stop_process,
)

REPO = Path(__file__).resolve().parent.parent
CACHE = Path("/var/tmp/lpmos-bench")
IMAGE_NAME = "bench"
URL_PATH = f"/images/{IMAGE_NAME}/disk.img"
SN = "BENCH-IMG-1"
BUFFER = 1 << 20
SAMPLE = 64
MEMORY_SLACK = 8 << 20      # "does not grow with N": the peak at the largest N within this


# --- the file ------------------------------------------------------------------------------


def image_file(size: int) -> tuple[Path, str]:
    """A ``size``-byte file of random bytes and its sha256, made once and
    kept under :data:`CACHE` (``image-<MiB>m/disk.img``) for later runs."""
    where = CACHE / f"image-{size >> 20}m"
    path, digest_path = where / "disk.img", where / "disk.img.sha256"
    if path.is_file() and path.stat().st_size == size and digest_path.is_file():
        digest = digest_path.read_text().strip()
        if len(digest) == 64:
            return path, digest
    where.mkdir(parents=True, exist_ok=True)
    os.chmod(CACHE, 0o755)
    os.chmod(where, 0o755)
    tmp = where / "disk.img.part"
    h = hashlib.sha256()
    block = 8 << 20
    with tmp.open("wb") as fh:
        left = size
        while left:
            data = os.urandom(min(block, left))
            h.update(data)
            fh.write(data)
            left -= len(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o644)
    tmp.rename(path)
    digest_path.write_text(h.hexdigest() + "\n")
    return path, h.hexdigest()


def warm(path: Path) -> None:
    """Read the file once so both servers serve it from the page cache."""
    with path.open("rb", buffering=0) as fh:
        buf = bytearray(8 << 20)
        while fh.readinto(buf):
            pass


def write_catalog(root: Path, image: Path, sha256: str) -> Path:
    path = root / "catalog.toml"
    path.write_text(f'[[image]]\nname = "{IMAGE_NAME}"\nos_type = "Bench OS"\n'
                    f'os_family = "lab"\nversion = "1"\nmode = "image"\n'
                    f'disk_image = "{image}"\nsha256 = "{sha256}"\n'
                    f"size = {image.stat().st_size}\n")
    return path


def store_token(etcd_url: str) -> str:
    """A machine token for :data:`SN`, stored hashed in etcd as a node does."""
    from bootsvc.state.tokens import new_token, token_record
    from lpmos.store import Put
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    token = new_token()
    store = EtcdStore([etcd_url], timeout=10.0)
    try:
        store.commit([], [Put(Keys(PREFIX).machine_token(IDC, SN),
                              token_record(token, node="bench", why="bench"))])
    finally:
        store.close()
    return token


# --- nginx ---------------------------------------------------------------------------------


class NginxProcess:
    """Debian's nginx on ``127.0.0.1:port`` serving ``image``'s directory at
    the node's URL path, with ``sendfile on``; its own prefix, config,
    logs and pid file in ``workdir``."""

    def __init__(self, workdir: Path, port: int, image: Path) -> None:
        binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(binary).exists():
            raise RuntimeError("nginx not found: install nginx-light (scripts/setup.sh system)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "error.log"
        temp = {name: workdir / name for name in ("body", "proxy", "fastcgi", "uwsgi", "scgi")}
        conf = workdir / "nginx.conf"
        conf.write_text(f"""\
worker_processes auto;
daemon off;
pid {workdir}/nginx.pid;
error_log {self.log_path} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 65;
    default_type application/octet-stream;
    client_body_temp_path {temp['body']};
    proxy_temp_path {temp['proxy']};
    fastcgi_temp_path {temp['fastcgi']};
    uwsgi_temp_path {temp['uwsgi']};
    scgi_temp_path {temp['scgi']};
    server {{
        listen 127.0.0.1:{port} backlog=1024;
        location /images/{IMAGE_NAME}/ {{ alias {image.parent}/; }}
    }}
}}
""")
        self.version = subprocess.run([binary, "-v"], capture_output=True, text=True,
                                      check=False).stderr.strip()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen([binary, "-p", str(workdir), "-c", str(conf)],
                                         stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                         start_new_session=True)
        deadline = time.monotonic() + 20
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("nginx exited:\n" + self.log_path.read_text()[-2000:])
            try:
                req = urllib.request.Request(self.url + URL_PATH, method="HEAD")
                with urllib.request.urlopen(req, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("nginx did not answer:\n"
                                       + self.log_path.read_text()[-2000:]) from None
                time.sleep(0.1)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)     # graceful: workers finish, then exit
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)


# --- measuring a server --------------------------------------------------------------------


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            pass
    return total


class RssSampler:
    """The summed RSS of ``pids`` every 0.2 s while it runs: peak and last."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.before = sum(rss_kib(p) for p in pids)
        self.peak = self.before
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, sum(rss_kib(p) for p in self.pids))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(5)
        after = sum(rss_kib(p) for p in self.pids)
        self.peak = max(self.peak, after)
        return after


class Probe:
    """A ``HEAD`` of the image every 0.1 s on one keep-alive connection
    while a round runs: how long the server takes to answer a small
    request in the middle of the storm (ours answers it on the same event
    loop that sends the bodies, and that answers DHCP and TFTP)."""

    def __init__(self, port: int, token: str) -> None:
        self.port, self.token = port, token
        self.latencies: list[float] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        import socket

        request = (f"HEAD {URL_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   f"Authorization: Bearer {self.token}\r\n\r\n").encode()
        sock: socket.socket | None = None
        while not self._stop.wait(0.1):
            try:
                if sock is None:
                    sock = socket.create_connection(("127.0.0.1", self.port), timeout=10)
                began = time.perf_counter()
                sock.sendall(request)
                head = b""
                while b"\r\n\r\n" not in head:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise ConnectionError("closed")
                    head += chunk
                self.latencies.append(time.perf_counter() - began)
                if not head.startswith(b"HTTP/1.1 200"):
                    self.errors += 1
            except OSError:
                self.errors += 1
                if sock is not None:
                    sock.close()
                sock = None
        if sock is not None:
            sock.close()

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self._thread.join(15)
        ms = [x * 1000 for x in self.latencies]
        return {"probe_n": len(ms), "probe_errors": self.errors,
                "probe_p50_ms": round(percentile(ms, 0.5), 2) if ms else None,
                "probe_p99_ms": round(percentile(ms, 0.99), 2) if ms else None,
                "probe_max_ms": round(max(ms), 2) if ms else None}


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def plan_clients(n: int, size: int, drop: float) -> list[dict[str, Any]]:
    """``n`` clients; ``round(n * drop)`` of them (at least one when
    ``drop`` > 0), spread evenly, drop once at a point between 20 % and
    80 % of the file (deterministic) and resume with a range."""
    k = min(n, max(1, round(n * drop))) if drop > 0 else 0
    dropping = {int((j + 0.5) * n / k) for j in range(k)} if k else set()
    out = []
    for i in range(n):
        drop_at = None
        if i in dropping:
            frac = 0.2 + 0.6 * ((i * 7919) % 1000) / 1000
            drop_at = max(1, int(size * frac))
        out.append({"id": i, "drop_at": drop_at})
    return out


def run_round(name: str, port: int, pids: list[int], *, n: int, size: int, sha256: str,
              image: Path, token: str, drop: float, workers: int, verify: str,
              deadline: float) -> dict[str, Any]:
    """One round against one server: N clients at once; the summary."""
    clients = plan_clients(n, size, drop)
    workers = max(1, min(workers, n))
    start_at = time.time() + 1.5            # the workers' interpreters start meanwhile
    procs = []
    sampler = RssSampler(pids)
    cpu_before = cpu_seconds(pids)
    probe = Probe(port, token)
    for w in range(workers):
        spec = {"port": port, "path": URL_PATH, "token": token,
                "size": size, "sha256": sha256, "file": str(image), "verify": verify,
                "clients": clients[w::workers], "start_at": start_at,
                "deadline": start_at + deadline}
        procs.append(subprocess.Popen([sys.executable, "-m", "bench.image_bench", "--worker",
                                       json.dumps(spec)], cwd=REPO, env=env(),
                                      stdout=subprocess.PIPE, stdin=subprocess.DEVNULL))
    records: list[dict[str, Any]] = []
    client_cpu = 0.0
    for p in procs:
        try:
            out, _ = p.communicate(timeout=deadline + 60)
            report = json.loads(out)
            records += report["clients"]
            client_cpu += report["cpu_seconds"]
        except (subprocess.TimeoutExpired, ValueError) as exc:
            p.kill()
            p.wait()
            records.append({"id": -1, "error": f"client worker failed: {exc!r}", "bytes": 0,
                            "finish": None, "resumed": False})
    rss_after = sampler.stop()
    probed = probe.stop()
    cpu = cpu_seconds(pids) - cpu_before
    errors = [r["error"] for r in records if r.get("error")]
    finishes = [r["finish"] for r in records if not r.get("error") and r["finish"] is not None]
    total = sum(r["bytes"] for r in records)
    wall = max(finishes) if finishes else float("nan")
    p50, p99 = percentile(finishes, 0.5), percentile(finishes, 0.99)
    return {"server": name, "clients": n, "bytes": total, "wall_seconds": round(wall, 3),
            "throughput_gib_s": round(total / wall / (1 << 30), 3) if finishes else 0.0,
            "finish_p50_s": round(p50, 3), "finish_p99_s": round(p99, 3),
            "finish_min_s": round(min(finishes), 3) if finishes else None,
            "spread_p99_p50": round(p99 / p50, 3) if finishes else None,
            "resumed": sum(1 for r in records if r.get("resumed")),
            "errors": len(errors), "error_samples": errors[:5],
            "server_cpu_seconds": round(cpu, 2), "client_cpu_seconds": round(client_cpu, 2),
            "rss_before_kib": sampler.before, "rss_peak_kib": sampler.peak,
            "rss_after_kib": rss_after, **probed}


# --- the client (one worker process) -------------------------------------------------------


class _Download(asyncio.BufferedProtocol):
    """One GET (from ``offset``): head checked, body counted and checked
    against the file, optionally cut off after ``stop_after`` body bytes."""

    def __init__(self, job: _Job, hasher: Any, offset: int, stop_after: int | None,
                 etag: str = "") -> None:
        self.job = job
        self.etag = etag
        self.hasher = hasher            # sha256 of the whole download, or None: sampled
        self.offset = offset            # file offset of the next body byte
        self.stop_after = stop_after
        self.head = bytearray()
        self.in_head = True
        self.body = 0
        self.remaining = 0
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        job = self.job
        lines = [f"GET {job.path} HTTP/1.1", "Host: 127.0.0.1", "User-Agent: lpmos-image-bench",
                 f"Authorization: Bearer {job.token}"]
        if self.offset:     # a resume names the ETag the first answer had, as curl -C does
            lines += [f"Range: bytes={self.offset}-", f"If-Range: {self.etag}"]
        transport.write(("\r\n".join(lines) + "\r\n\r\n").encode())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.job.buf

    def buffer_updated(self, nbytes: int) -> None:
        view = self.job.buf[:nbytes]
        if self.in_head:
            self.head += view
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                if len(self.head) > 65536:
                    self._fail("response head over 64 KiB")
                return
            rest = bytes(self.head[end + 4:])
            if not self._check_head(bytes(self.head[:end])):
                return
            self.in_head = False
            if rest:
                self._body(memoryview(rest))
            return
        self._body(view)

    def _check_head(self, head: bytes) -> bool:
        job = self.job
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        self.etag = headers.get("etag", "")
        if not self.etag:
            self._fail("no ETag")
            return False
        want = 206 if self.offset else 200
        if status != want:
            self._fail(f"status {status}, expected {want}")
            return False
        if self.offset and headers.get("content-range") != \
                f"bytes {self.offset}-{job.size - 1}/{job.size}":
            self._fail(f"Content-Range {headers.get('content-range')!r}")
            return False
        try:
            self.remaining = int(headers.get("content-length", ""))
        except ValueError:
            self._fail("no Content-Length")
            return False
        if self.remaining != job.size - self.offset:
            self._fail(f"Content-Length {self.remaining}, expected {job.size - self.offset}")
            return False
        return True

    def _body(self, view: memoryview) -> None:
        n = len(view)
        if n > self.remaining:
            self._fail("more body than Content-Length")
            return
        job = self.job
        if self.hasher is not None:
            self.hasher.update(view)
        else:
            k = min(SAMPLE, n)
            if job.mm[self.offset:self.offset + k] != view[:k]:
                self._fail(f"content differs from the file at offset {self.offset}")
                return
        self.offset += n
        self.body += n
        self.remaining -= n
        if self.remaining == 0:
            self._finish("complete")
        elif self.stop_after is not None and self.body >= self.stop_after:
            assert self.transport is not None
            self.transport.abort()      # the machine's link drops mid-transfer
            self._finish("dropped")

    def _fail(self, why: str) -> None:
        if self.transport is not None:
            self.transport.abort()
        if not self.done.done():
            self.done.set_exception(RuntimeError(why))

    def _finish(self, how: str) -> None:
        if not self.done.done():
            self.done.set_result(how)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost after {self.body} "
                                                    f"body bytes: {exc!r}"))


class _Job:
    """What a worker's clients share: the target, the file (for checks)
    and one read buffer (a protocol consumes it before the next read)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.port = int(spec["port"])
        self.path = str(spec["path"])
        self.token = str(spec["token"])
        self.size = int(spec["size"])
        self.buf = memoryview(bytearray(BUFFER))
        fh = open(spec["file"], "rb")  # mapped for the whole run
        self.mm = mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ)
        fh.close()


async def _client(job: _Job, spec: dict[str, Any], c: dict[str, Any]) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    sha = spec["verify"] == "sha256"
    hasher = hashlib.sha256() if sha else None
    offset, parts, resumed, etag = 0, 0, False, ""
    stop_after = c["drop_at"]
    try:
        while offset < job.size:
            parts += 1
            if parts > 3:
                raise RuntimeError("more than 3 connections for one download")
            proto = _Download(job, hasher, offset, stop_after, etag)
            transport, _ = await loop.create_connection(lambda p=proto: p,  # type: ignore[misc]
                                                        "127.0.0.1", job.port)
            try:
                how = await proto.done
            finally:
                transport.abort()
            offset, etag = proto.offset, proto.etag
            if how == "dropped":
                resumed, stop_after = True, None
        if hasher is not None and hasher.hexdigest() != spec["sha256"]:
            raise RuntimeError("sha256 of the download differs from the file's")
        return {"id": c["id"], "finish": time.time() - spec["start_at"], "bytes": offset,
                "resumed": resumed, "error": None}
    except Exception as exc:  # every failure is a result
        return {"id": c["id"], "finish": None, "bytes": offset, "resumed": resumed,
                "error": f"client {c['id']}: {exc}"}


async def _worker(spec: dict[str, Any]) -> list[dict[str, Any]]:
    job = _Job(spec)
    delay = spec["start_at"] - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    tasks = [asyncio.ensure_future(_client(job, spec, c)) for c in spec["clients"]]
    timeout = max(1.0, spec["deadline"] - time.time())
    done, pending = await asyncio.wait(tasks, timeout=timeout)
    out = [t.result() for t in done]
    for t in pending:
        t.cancel()
    for c in spec["clients"]:
        if not any(r["id"] == c["id"] for r in out):
            out.append({"id": c["id"], "finish": None, "bytes": 0, "resumed": False,
                        "error": f"client {c['id']}: not done by the round's deadline"})
    return out


def worker_main(raw: str) -> int:
    spec = json.loads(raw)
    records = asyncio.run(_worker(spec))
    t = os.times()
    print(json.dumps({"clients": records, "cpu_seconds": t.user + t.system}))
    return 0


# --- the run -------------------------------------------------------------------------------


def summarize(rounds: list[dict[str, Any]], counts: list[int]) -> dict[str, Any]:
    """Per N: each round's ratios (ours / nginx, paired by round), their
    range and median; the memory growth across N; the verdict."""
    per_n: dict[str, Any] = {}
    ok = True
    for n in counts:
        ours = [r for r in rounds if r["clients"] == n and r["server"] == "ours"]
        ref = [r for r in rounds if r["clients"] == n and r["server"] == "nginx"]
        pairs = list(zip(ours, ref, strict=False))
        tp = [o["throughput_gib_s"] / g["throughput_gib_s"] if g["throughput_gib_s"] else 0.0
              for o, g in pairs]
        spread = [(o["spread_p99_p50"] or float("inf")) / (g["spread_p99_p50"] or float("inf"))
                  for o, g in pairs]
        errors = sum(r["errors"] for r in ours + ref)
        entry = {"throughput_ratio": [round(x, 3) for x in tp],
                 "throughput_ratio_median": round(statistics.median(tp), 3) if tp else None,
                 "spread_ours": [o["spread_p99_p50"] for o in ours],
                 "spread_nginx": [g["spread_p99_p50"] for g in ref],
                 "spread_ratio": [round(x, 3) for x in spread],
                 "spread_ratio_median": round(statistics.median(spread), 3) if spread else None,
                 "ours_gib_s": [o["throughput_gib_s"] for o in ours],
                 "nginx_gib_s": [g["throughput_gib_s"] for g in ref],
                 "node_rss_peak_kib": max((o["rss_peak_kib"] for o in ours), default=0),
                 "errors": errors}
        entry["throughput_met"] = bool(tp) and statistics.median(tp) >= 0.9
        entry["fairness_met"] = bool(spread) and statistics.median(spread) <= 1.0
        ok = ok and entry["throughput_met"] and entry["fairness_met"] and errors == 0
        per_n[str(n)] = entry
    low, high = per_n[str(min(counts))], per_n[str(max(counts))]
    growth = (high["node_rss_peak_kib"] - low["node_rss_peak_kib"]) * 1024
    memory_met = growth <= MEMORY_SLACK
    ok = ok and memory_met
    return {"per_clients": per_n, "node_rss_growth_bytes": growth,
            "memory_met": memory_met, "all_met": ok}


def print_header() -> None:
    print(f"{'round':>5} {'server':<6} {'N':>4} {'GiB/s':>7} {'p50 s':>7} {'p99 s':>7} "
          f"{'p99/p50':>7} {'resumed':>7} {'errors':>6} {'cpu s':>6} "
          f"{'RSS before/peak/after MiB':>26} {'HEAD p50/max ms':>16}", flush=True)


def print_row(r: dict[str, Any]) -> None:
    probe = f"{r['probe_p50_ms']}/{r['probe_max_ms']}" if r.get("probe_n") else "-"
    rss = f"{r['rss_before_kib'] / 1024:.0f}/{r['rss_peak_kib'] / 1024:.0f}/" \
          f"{r['rss_after_kib'] / 1024:.0f}"
    print(f"{r['round']:>5} {r['server']:<6} {r['clients']:>4} "
          f"{r['throughput_gib_s']:>7.2f} {r['finish_p50_s']:>7.2f} "
          f"{r['finish_p99_s']:>7.2f} {r['spread_p99_p50'] or float('nan'):>7.3f} "
          f"{r['resumed']:>7} {r['errors']:>6} {r['server_cpu_seconds']:>6.1f} {rss:>26} "
          f"{probe:>16}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.image_bench", description=(
        "N clients pull the same disk image from the regional node and from Debian's nginx "
        "(sendfile), side by side; 10%% drop mid-way and resume with Range."))
    parser.add_argument("--quick", action="store_true", help="16 MiB, N = 4 and 8")
    parser.add_argument("--clients", default="50,200", help="comma list of N")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--drop", type=float, default=0.1, help="share that drops and resumes")
    parser.add_argument("--workers", type=int, default=2, help="client processes")
    parser.add_argument("--verify", choices=("sample", "sha256"), default=None)
    parser.add_argument("--deadline", type=float, default=0.0,
                        help="seconds per round (default: from the bytes, at least 60)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    if args.quick:
        args.clients, args.size_mib, args.workers = "4,8", 16, 1
    verify = args.verify or ("sha256" if args.quick else "sample")
    counts = sorted({int(x) for x in args.clients.split(",") if x.strip()})
    size = args.size_mib << 20
    if not shutil.which("nginx") and not Path("/usr/sbin/nginx").exists():
        print("image_bench: nginx is not installed (nginx-light, scripts/setup.sh system)",
              file=sys.stderr)
        return 2
    started = time.monotonic()
    image, sha256 = image_file(size)
    warm(image)
    from lpmos.store.embedded import free_port

    rounds: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="lpmos-image-bench-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        etcd = EtcdProcess(work)
        node: NodeProcess | None = None
        nginx: NginxProcess | None = None
        try:
            token = store_token(etcd.url)
            catalog = write_catalog(work, image, sha256)
            node = NodeProcess(work / "node", etcd.url, catalog, services="http",
                               http_port=free_port())
            nginx = NginxProcess(work / "nginx", free_port(), image)
            servers = {"ours": (node.http_port, [node.pid]),
                       "nginx": (int(nginx.url.rsplit(":", 1)[1]), nginx.pids())}
            node_rss_start = rss_kib(node.pid)
            print(f"image {image} ({size >> 20} MiB, sha256 {sha256[:12]}...), N = "
                  f"{', '.join(map(str, counts))}, {args.rounds} rounds, drop {args.drop:.0%}, "
                  f"verify {verify}; {nginx.version}, worker_processes auto "
                  f"({len(servers['nginx'][1]) - 1} workers); node RSS at start "
                  f"{node_rss_start / 1024:.0f} MiB", flush=True)
            print_header()
            for n in counts:
                deadline = args.deadline or max(60.0, n * size / (400 << 20))
                for r in range(args.rounds):
                    order = ["ours", "nginx"] if r % 2 == 0 else ["nginx", "ours"]
                    for name in order:
                        port, pids = servers[name]
                        if name == "nginx":
                            pids = nginx.pids()
                        res = run_round(name, port, pids, n=n, size=size, sha256=sha256,
                                        image=image, token=token, drop=args.drop,
                                        workers=args.workers, verify=verify,
                                        deadline=deadline)
                        res["round"] = r + 1
                        rounds.append(res)
                        print_row(res)
                        if res["error_samples"]:
                            print("      e.g. " + "; ".join(res["error_samples"][:2]),
                                  flush=True)
            node_rss_end = rss_kib(node.pid)
        finally:
            if nginx is not None:
                nginx.stop()
            if node is not None:
                node.stop()
            etcd.stop()
    summary = summarize(rounds, counts)
    seconds = round(time.monotonic() - started, 1)
    print()
    for n, e in summary["per_clients"].items():
        print(f"N={n}: throughput ours/nginx {e['throughput_ratio']} (median "
              f"{e['throughput_ratio_median']}, target >= 0.9: "
              f"{'met' if e['throughput_met'] else 'NOT met'}); spread p99/p50 ours "
              f"{e['spread_ours']} vs nginx {e['spread_nginx']} (ratio median "
              f"{e['spread_ratio_median']}, target <= 1.0: "
              f"{'met' if e['fairness_met'] else 'NOT met'}); errors {e['errors']}")
    print(f"node peak RSS grows {summary['node_rss_growth_bytes'] / (1 << 20):+.1f} MiB from "
          f"N={min(counts)} to N={max(counts)} (target <= {MEMORY_SLACK >> 20} MiB: "
          f"{'met' if summary['memory_met'] else 'NOT met'}); run took {seconds:.0f} s")
    verdict = "all targets met" if summary["all_met"] else "targets NOT all met"
    print(verdict)
    json_path = args.json or REPO / "bench" / "results" / (
        "image-bench-quick.json" if args.quick else "image-bench.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "size": size, "sha256": sha256, "clients": counts, "rounds_per_n": args.rounds,
        "drop": args.drop, "verify": verify, "workers": args.workers, "nproc": os.cpu_count(),
        "node_rss_start_kib": node_rss_start, "node_rss_end_kib": node_rss_end,
        "rounds": rounds, "summary": summary, "verdict": verdict, "seconds": seconds},
        indent=1))
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        raise SystemExit(main())
