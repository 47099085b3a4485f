"""TFTP benchmark: ours side by side with tftpd-hpa and dnsmasq's TFTP.

``python -m bench.tftp_bench [--quick] [--reps N] [--json PATH]``

Starts every server itself, drives each with the same load generator
(``bench.tftp_loadgen``, one process, bounded in count and time) and prints,
per case, the median seconds of ``--reps`` repetitions for each server
(``--concurrent-reps`` for the concurrent cases, whose runs spread most) and
the ratio reference/ours (above 1: ours is faster). Repetitions are
interleaved and rotated (ours, tftpd-hpa, dnsmasq; then tftpd-hpa, dnsmasq,
ours; ...; then the same with the order reversed) so that drift in the
machine's load hits every server alike and every server runs right after every
other one equally often (tftpd-hpa's 200 forked children exiting, for one,
leave the machine warmer or busier for whoever is next). The ratio is the
median over the rounds of the two servers' runs in one round, with a
distribution-free 95 % confidence interval (from 6 rounds on); one round's
runs spread by up to 50 % from the next round's, far more than two servers
differ within a round.

When run as root, everything (servers, relay, generator) runs inside a network
namespace the bench creates and removes, on its loopback; that is what lets
dnsmasq, whose TFTP port is fixed at 69, take part without touching the
host's port 69.  Otherwise it runs on the host's loopback on high ports and
dnsmasq is left out.

Cases (``--quick``: one small file, one repetition, a few seconds in all):

* one 1 MiB and one 32 MiB file at blksize 512 and 1468, lock-step;
* the same at blksize 1468 asking for windowsize 16 (RFC 7440): only ours
  grants it, the references answer lock-step, which is the point;
* 50 and 200 concurrent 1 MiB transfers at blksize 1468;
* 1 MiB through a UDP relay adding 0.25 ms each way (``bench.udp_relay``, one
  relay process per server, the same code and settings for all), lock-step
  and windowsize 16.

Concurrent cases split their transfers over ``--generators`` processes (2)
that start at the same instant.  Saturation check: the busiest case is run
again against the fastest reference with one generator more; if that
reference gets no faster, the generators were enough to saturate it.  The
JSON also has each server's CPU use (CPU seconds / wall seconds; tftpd-hpa
forks a child per transfer whose CPU its parent never sees, so its figure is
meaningless).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CLK_TCK = os.sysconf("SC_CLK_TCK")

MiB = 1024 * 1024


@dataclass(frozen=True)
class Case:
    id: str
    file: str
    blksize: int
    windowsize: int = 1
    transfers: int = 1
    concurrency: int = 1
    delay: float = 0.0     # relay delay each way, 0 = direct


FULL_FILES = {"f1m": MiB, "f32m": 32 * MiB}
FULL_CASES = [
    Case("1MiB blksize 512", "f1m", 512),
    Case("1MiB blksize 1468", "f1m", 1468),
    Case("32MiB blksize 512", "f32m", 512),
    Case("32MiB blksize 1468", "f32m", 1468),
    Case("1MiB blksize 1468 windowsize 16", "f1m", 1468, 16),
    Case("32MiB blksize 1468 windowsize 16", "f32m", 1468, 16),
    Case("50 x 1MiB concurrent", "f1m", 1468, 1, 50, 50),
    Case("200 x 1MiB concurrent", "f1m", 1468, 1, 200, 200),
    Case("1MiB via relay 0.25ms", "f1m", 1468, 1, delay=0.00025),
    Case("1MiB via relay 0.25ms windowsize 16", "f1m", 1468, 16, delay=0.00025),
]
QUICK_FILES = {"f256k": 256 * 1024}
QUICK_CASES = [
    Case("256KiB blksize 1468", "f256k", 1468),
    Case("256KiB blksize 1468 windowsize 16", "f256k", 1468, 16),
    Case("10 x 256KiB concurrent", "f256k", 1468, 1, 10, 10),
    Case("256KiB via relay 0.25ms windowsize 16", "f256k", 1468, 16, delay=0.00025),
]


# --- processes, optionally inside a network namespace ----------------------------


class Sandbox:
    """Where the bench runs: a private network namespace (root) or the host."""

    def __init__(self, use_netns: bool) -> None:
        self.netns = f"lpmos-tftpb-{os.getpid()}" if use_netns else None
        self.procs: list[subprocess.Popen[bytes]] = []
        self._next_port = 20000

    def __enter__(self) -> Sandbox:
        if self.netns:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
            try:
                for cmd in (["ip", "link", "set", "lo", "up"],
                            # glibc's AI_ADDRCONFIG ignores loopback addresses:
                            # without one other address in the namespace,
                            # in.tftpd cannot resolve its own --address
                            ["ip", "addr", "add", "198.18.0.1/32", "dev", "lo"]):
                    subprocess.run(["ip", "netns", "exec", self.netns, *cmd], check=True)
            except subprocess.CalledProcessError:
                self.__exit__()
                raise
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in list(self.procs):      # kill() removes it from the list
            self.kill(proc)
        if self.netns:
            subprocess.run(["ip", "netns", "delete", self.netns], check=False)

    def argv(self, cmd: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd] if self.netns else cmd

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(self.argv(cmd), **kw)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(self.argv(cmd), capture_output=True, timeout=timeout, check=False)

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        if proc in self.procs:
            self.procs.remove(proc)

    def free_udp_port(self) -> int:
        if self.netns:     # a fresh namespace: every port is free
            self._next_port += 1
            return self._next_port
        return free_udp_port()


def free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def python_cmd(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def wait_udp_ready(sandbox: Sandbox, port: int, name: str, timeout: float = 10.0) -> None:
    """Wait until the server answers a request for a missing file."""
    probe = ("import socket,sys,time\n"
             "s=socket.socket(2,2);s.settimeout(0.1)\n"
             f"end=time.monotonic()+{timeout}\n"
             "while time.monotonic()<end:\n"
             f" s.sendto(b'\\x00\\x01{name}\\x00octet\\x00',('127.0.0.1',{port}))\n"
             " try:\n  s.recvfrom(9000);sys.exit(0)\n"
             " except OSError:\n  time.sleep(0.05)\n"
             "sys.exit(1)\n")
    if sandbox.run([sys.executable, "-c", probe], timeout=timeout + 10).returncode != 0:
        raise RuntimeError(f"server on port {port} did not answer")


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # utime stime cutime cstime (fields 14-17; index from after the comm)
        return sum(int(x) for x in fields[11:15]) / CLK_TCK


def start_server(kind: str, sandbox: Sandbox, root: Path, log: Path) -> Server:
    out = log.open("ab")
    if kind == "ours":
        port = sandbox.free_udp_port()
        cmd = python_cmd("bootsvc.tftp.standalone", str(root), "--host", "127.0.0.1", "--port",
                         str(port), "--max-sessions", "2000", "--max-sessions-per-client",
                         "2000")
    elif kind == "tftpd-hpa":
        port = sandbox.free_udp_port()
        cmd = ["in.tftpd", "-L", "-s", str(root), "--address", f"127.0.0.1:{port}"]
    elif kind == "dnsmasq":
        port = 69
        cmd = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--port=0",
               "--enable-tftp", f"--tftp-root={root}", "--tftp-max=2000", "--quiet-tftp",
               "--pid-file=", "--user=root", "--group=root", "--listen-address=127.0.0.1",
               "--bind-interfaces", "--log-facility=-"]
    else:
        raise ValueError(kind)
    proc = sandbox.popen(cmd, stdout=out, stderr=out, env={**os.environ, "PYTHONPATH": str(REPO)})
    server = Server(kind, port, proc)
    try:
        wait_udp_ready(sandbox, port, "no-such-file")
    except RuntimeError:
        sandbox.kill(proc)
        raise
    return server


@contextmanager
def relay(sandbox: Sandbox, port: int, delay: float) -> Iterator[int]:
    listen = sandbox.free_udp_port()
    proc = sandbox.popen(python_cmd("bench.udp_relay", "--listen", f"127.0.0.1:{listen}",
                                    "--target", f"127.0.0.1:{port}", "--delay", str(delay)),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_udp_ready(sandbox, listen, "no-such-file")
        yield listen
    finally:
        sandbox.kill(proc)


def loadgen(sandbox: Sandbox, port: int, case: Case, size: int, digest: str,
            generators: int = 1, deadline: float = 120.0) -> dict[str, Any]:
    """Run ``case`` split over ``generators`` processes that start together;
    the run's time is the slowest generator's."""
    generators = max(1, min(generators, case.transfers))
    start_at = str(time.time() + 0.5 + 0.25 * generators)
    procs = []
    for i in range(generators):
        n = case.transfers // generators + (1 if i < case.transfers % generators else 0)
        cmd = python_cmd("bench.tftp_loadgen", "--server", f"127.0.0.1:{port}",
                         "--file", case.file, "--transfers", str(n),
                         "--concurrency", str(max(1, min(n, case.concurrency // generators))),
                         "--blksize", str(case.blksize), "--windowsize", str(case.windowsize),
                         "--size", str(size), "--sha256", digest, "--deadline", str(deadline),
                         "--start-at", start_at)
        procs.append(subprocess.Popen(sandbox.argv(cmd), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE,
                                      env={**os.environ, "PYTHONPATH": str(REPO)}))
    outs = []
    for proc in procs:
        stdout, stderr = proc.communicate(timeout=deadline + 60)
        try:
            outs.append(dict(json.loads(stdout.decode().strip().splitlines()[-1])))
        except (ValueError, IndexError):
            outs.append({"ok": 0, "failed": 1, "seconds": float("nan"), "cpu_seconds": 0,
                         "errors": {"loadgen": stderr.decode()[-300:]}})
    errors: dict[str, Any] = {}
    for out in outs:
        errors.update(out.get("errors") or {})
    return {"ok": sum(o["ok"] for o in outs), "failed": sum(o["failed"] for o in outs),
            "seconds": max(o["seconds"] for o in outs), "generators": generators,
            "generator_cpu_seconds": round(sum(o.get("cpu_seconds", 0) for o in outs), 3),
            "p99": max(o.get("p99", 0) for o in outs), "errors": errors}


def measure(sandbox: Sandbox, server: Server, case: Case, size: int, digest: str,
            generators: int) -> dict[str, Any]:
    cpu0, t0 = server.cpu_seconds(), time.monotonic()
    if case.delay:
        with relay(sandbox, server.port, case.delay) as port:
            cpu0, t0 = server.cpu_seconds(), time.monotonic()
            result = loadgen(sandbox, port, case, size, digest, generators)
    else:
        result = loadgen(sandbox, server.port, case, size, digest, generators)
    wall = time.monotonic() - t0
    result["server_cpu"] = round((server.cpu_seconds() - cpu0) / wall, 3) if wall else 0.0
    return result


def saturation(sandbox: Sandbox, server: Server, case: Case, size: int, digest: str,
               generators: int) -> dict[str, Any]:
    """Run ``case`` with the bench's number of generators, then with one more."""
    base = loadgen(sandbox, server.port, case, size, digest, generators)
    more = loadgen(sandbox, server.port, case, size, digest, generators + 1)
    return {"server": server.name, "case": case.id, "generators": generators,
            "seconds": base["seconds"], "more_generators": generators + 1,
            "more_generators_seconds": more["seconds"], "more_generators_ok": more["ok"]}


# --- the run -------------------------------------------------------------------------


def make_root(base: Path, files: dict[str, int]) -> dict[str, tuple[int, str]]:
    base.chmod(0o755)
    info = {}
    for name, size in files.items():
        data = os.urandom(size)
        (base / name).write_bytes(data)
        (base / name).chmod(0o644)
        info[name] = (size, hashlib.sha256(data).hexdigest())
    return info


def fmt(seconds: float | None) -> str:
    if seconds is None or seconds != seconds:
        return "-"
    return f"{seconds:.3f}"


def round_order(servers: list[str], rep: int) -> list[str]:
    """The servers' order in round ``rep``: rotations of the list, then of
    the reversed list, so that over ``2 * len(servers)`` rounds every server
    runs right after every other one equally often (a Williams design: what
    one server leaves behind, tftpd-hpa's exiting children for one, weighs on
    each of the others alike)."""
    n = len(servers)
    base = servers if (rep // n) % 2 == 0 else servers[::-1]
    turn = rep % n
    return base[turn:] + base[:turn]


def _binom_cdf(k: int, n: int) -> float:
    """P(X <= k) for X ~ Binomial(n, 1/2)."""
    return sum(math.comb(n, i) for i in range(k + 1)) / float(2 ** n)


def paired(ours: list[dict[str, Any]], theirs: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Ratio theirs/ours per repetition (the two ran in the same round, next
    to each other), their median, how many favour ours, and a
    distribution-free 95 % confidence interval for the median ratio (order
    statistics of the sorted ratios, from the binomial distribution; needs 6
    pairs or more).  The machine's drift between rounds is much larger than
    the difference between two servers in one round, which is why the pairs
    say more than the ratio of two medians."""
    ratios = sorted(t["seconds"] / o["seconds"] for o, t in zip(ours, theirs, strict=False)
                    if o.get("failed") == 0 and t.get("failed") == 0 and o["seconds"] > 0)
    n = len(ratios)
    if not n:
        return None
    out: dict[str, Any] = {"pairs": n, "median_ratio": round(statistics.median(ratios), 3),
                           "ours_faster": sum(r > 1 for r in ratios), "ci95": None}
    k = -1
    while _binom_cdf(k + 1, n) <= 0.025:
        k += 1
    if k >= 0:      # the (k+1)-th smallest and largest bound the median
        out["ci95"] = [round(ratios[k], 3), round(ratios[n - 1 - k], 3)]
    return out


def render_table(rows: list[dict[str, Any]], servers: list[str]) -> str:
    refs = [s for s in servers if s != "ours"]
    head = ["case", "reps", "ours s"] + [h for r in refs for h in (f"{r} s", f"{r}/ours")]
    lines = [head]
    for row in rows:
        med = row["median_seconds"]
        line = [row["case"], str(len(row["runs"].get("ours", []))), fmt(med.get("ours"))]
        for r in refs:
            pair = (row.get("paired") or {}).get(r)
            ratio = "-"
            if pair:
                ratio = f"{pair['median_ratio']:.2f}x"
                if pair["ci95"]:
                    ratio += f" ({pair['ci95'][0]:.2f}-{pair['ci95'][1]:.2f})"
            line += [fmt(med.get(r)), ratio]
        lines.append(line)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) if j == 0 else str(c).rjust(w)
                             for j, (c, w) in enumerate(zip(line, widths, strict=True))))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.tftp_bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny run, seconds")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5, "
                        "quick 1)")
    parser.add_argument("--concurrent-reps", type=int, default=None,
                        help="repetitions of the concurrent cases, whose runs spread most "
                             "(default 15, quick 1)")
    parser.add_argument("--json", type=Path, default=None,
                        help="where to write the results (default bench/results/tftp.json, "
                             "quick: tftp-quick.json)")
    parser.add_argument("--servers", default="ours,tftpd-hpa,dnsmasq")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the cases whose name contains TEXT (e.g. '200 x')")
    parser.add_argument("--generators", type=int, default=2,
                        help="load generator processes for the concurrent cases")
    parser.add_argument("--no-netns", action="store_true",
                        help="run on the host's loopback even as root (dnsmasq is skipped)")
    args = parser.parse_args(argv)
    reps = args.reps or (1 if args.quick else 5)
    concurrent_reps = args.concurrent_reps or (1 if args.quick else 15)
    files, cases = (QUICK_FILES, QUICK_CASES) if args.quick else (FULL_FILES, FULL_CASES)
    if args.only:
        cases = [c for c in cases if args.only in c.id]
        if not cases:
            parser.error(f"no case's name contains {args.only!r}")
        files = {c.file: files[c.file] for c in cases}
    use_netns = os.geteuid() == 0 and not args.no_netns and shutil.which("ip") is not None
    wanted = [s.strip() for s in args.servers.split(",") if s.strip()]
    skipped: dict[str, str] = {}
    if "tftpd-hpa" in wanted and not shutil.which("in.tftpd"):
        skipped["tftpd-hpa"] = "in.tftpd not installed"
    if "dnsmasq" in wanted and not shutil.which("dnsmasq"):
        skipped["dnsmasq"] = "dnsmasq not installed"
    if "dnsmasq" in wanted and not use_netns:
        skipped["dnsmasq"] = "its TFTP port is fixed at 69: needs root for a network namespace"
    servers = [s for s in wanted if s not in skipped]
    out_path = args.json or RESULTS / ("tftp-quick.json" if args.quick else "tftp.json")

    started = time.time()
    with tempfile.TemporaryDirectory(prefix="lpmos-tftpbench-") as tmp, \
            Sandbox(use_netns) as sandbox:
        root = Path(tmp) / "root"
        root.mkdir()
        Path(tmp).chmod(0o755)
        info = make_root(root, files)
        running: dict[str, Server] = {}
        for kind in servers:
            try:
                running[kind] = start_server(kind, sandbox, root, Path(tmp) / f"{kind}.log")
            except (RuntimeError, OSError) as exc:
                skipped[kind] = f"did not start: {exc}"
        servers = [s for s in servers if s in running]
        rows: list[dict[str, Any]] = []
        for case in cases:
            size, digest = info[case.file]
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in servers}
            for rep in range(concurrent_reps if case.transfers > 1 else reps):
                for kind in round_order(servers, rep):
                    gens = args.generators if case.transfers > 1 else 1
                    runs[kind].append(measure(sandbox, running[kind], case, size, digest,
                                              gens))
            median = {}
            for kind in servers:
                good = [r["seconds"] for r in runs[kind] if r.get("failed") == 0]
                median[kind] = statistics.median(good) if good else None
            rows.append({"case": case.id, "file_bytes": size, "blksize": case.blksize,
                         "windowsize": case.windowsize, "transfers": case.transfers,
                         "concurrency": case.concurrency, "relay_delay": case.delay,
                         "median_seconds": median,
                         "paired": {k: paired(runs["ours"], runs[k]) for k in servers
                                    if k != "ours" and "ours" in runs},
                         "runs": runs})
            print(f"  {case.id}: " + ", ".join(f"{k} {fmt(v)}" for k, v in median.items()),
                  file=sys.stderr, flush=True)
        # saturation: the busiest concurrent case against the fastest reference
        refs = [s for s in servers if s != "ours"]
        busiest = max(cases, key=lambda c: (c.transfers, -c.delay))
        sat = None
        if refs:
            row = next(r for r in rows if r["case"] == busiest.id)
            fastest = min(refs, key=lambda s: row["median_seconds"].get(s) or float("inf"))
            size, digest = info[busiest.file]
            sat = saturation(sandbox, running[fastest], busiest, size, digest,
                             args.generators)
        for server in running.values():
            sandbox.kill(server.proc)

    table = render_table(rows, servers)
    report = {
        "command": "python -m bench.tftp_bench" + (" --quick" if args.quick else "")
                   + (f" --reps {reps}" if args.reps else "")
                   + (f" --concurrent-reps {concurrent_reps}" if args.concurrent_reps else "")
                   + (f" --only {args.only!r}" if args.only else ""),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release(),
                    "python": platform.python_version(),
                    "load_average_at_start": os.getloadavg()},
        "netns": use_netns, "repetitions": reps, "concurrent_repetitions": concurrent_reps,
        "servers": servers, "skipped": skipped,
        "rows": rows, "saturation": sat, "table": table,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"TFTP benchmark, median seconds of {reps} run(s), {concurrent_reps} for the "
          "concurrent cases (lower is better); ratio = median of reference / ours over the "
          "runs paired by round (above 1: ours is faster), with its 95 % confidence "
          "interval from 6 runs on")
    print(table)
    if sat:
        print(f"saturation: {sat['server']} '{sat['case']}' took {fmt(sat['seconds'])} s with "
              f"{sat['generators']} generator(s) and {fmt(sat['more_generators_seconds'])} s "
              f"with {sat['more_generators']} ({sat['more_generators_ok']} ok): "
              "no faster with more load means the generators saturate it")
    for name, why in skipped.items():
        print(f"skipped {name}: {why}")
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
