"""ProxyDHCP benchmark: ours vs dnsmasq, side by side, in network namespaces.

Also home of the process wrappers the DHCP network tests use:
:class:`OurServer` (``python -m bootsvc.dhcp.standalone`` inside a namespace) and
:class:`Dnsmasq` (dnsmasq inside a namespace, as ProxyDHCP or as the
site's address-only DHCP server), and :func:`etcd_in_netns`.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.dhcp_loadgen import NetnsPair, entered

REPO = Path(__file__).resolve().parent.parent


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


class OurServer:
    """Our DHCP service as its own process in ``net.server``'s namespace."""

    def __init__(self, net: NetnsPair, workdir: Path, *flags: str, ready: float = 20.0) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.stats_file = workdir / "dhcp-stats.json"
        self.log_file = workdir / "dhcp-server.log"
        cmd = net.exec_args(net.server, sys.executable, "-m", "bootsvc.dhcp.standalone",
                            "--interface", net.server_if, "--state-dir", str(workdir),
                            "--stats-file", str(self.stats_file), *flags)
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log,
                                         stdin=subprocess.DEVNULL, cwd=REPO, env=_env())
        assert self.proc.stdout is not None
        deadline = time.monotonic() + ready
        line = b""
        while time.monotonic() < deadline and self.proc.poll() is None:
            if select.select([self.proc.stdout], [], [], 0.2)[0]:
                line = self.proc.stdout.readline()
                break
        if not line.startswith(b"READY"):
            self.stop()
            raise RuntimeError(f"DHCP server did not start: {line!r}; log:\n"
                               + self.log_file.read_text()[-3000:])
        self.ports = json.loads(line.split(b" ", 1)[1])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> dict[str, dict[str, float]]:
        """Stop (SIGTERM) and return the counters it wrote."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        try:
            stats: dict[str, dict[str, float]] = json.loads(self.stats_file.read_text())
            return stats
        except (OSError, ValueError):
            return {}


class Dnsmasq:
    """dnsmasq in a namespace: ``proxy`` (ProxyDHCP with pxe-service, as in
    the benchmark) or ``site`` (address-only DHCP server of the site)."""

    def __init__(self, netns: str, interface: str, workdir: Path, *, mode: str,
                 subnet: str, server_ip: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_file = workdir / f"dnsmasq-{mode}.log"
        args = ["dnsmasq", "--no-daemon", "--conf-file=/dev/null", "--port=0",
                f"--interface={interface}", "--bind-interfaces", "--user=root",
                f"--dhcp-leasefile={workdir / 'dnsmasq.leases'}",
                f"--pid-file={workdir / 'dnsmasq.pid'}", "--no-ping", "--log-facility=-"]
        if mode == "proxy":
            args += [f"--dhcp-range={subnet}.0,proxy", "--quiet-dhcp",
                     f'--pxe-service=x86PC,"LPMOS",undionly.kpxe,{server_ip}',
                     f'--pxe-service=X86-64_EFI,"LPMOS",ipxe.efi,{server_ip}',
                     f'--pxe-service=BC_EFI,"LPMOS",ipxe.efi,{server_ip}']
        else:
            args += [f"--dhcp-range={subnet}.50,{subnet}.90,255.255.255.0,1h",
                     "--dhcp-authoritative"]
        with self.log_file.open("ab") as log:
            self.proc = subprocess.Popen(["ip", "netns", "exec", netns, *args], stdout=log,
                                         stderr=log, stdin=subprocess.DEVNULL)
        time.sleep(0.3)
        if self.proc.poll() is not None:
            raise RuntimeError("dnsmasq did not start:\n" + self.log_file.read_text()[-2000:])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def etcd_in_netns(netns: str, workdir: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real etcd listening on 127.0.0.1 inside ``netns`` (a process
    started from a thread inside a namespace lives in it)."""
    from lpmos.store.embedded import start_etcd

    with entered(netns):
        proc, url = start_etcd(workdir / "etcd-data", client_port=2379, peer_port=2380,
                               log_path=workdir / "etcd.log")
    try:
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def etcdctl_get_prefix(netns: str, url: str, prefix: str) -> dict[str, Any]:
    """Keys under ``prefix`` (key → JSON-decoded value), read with etcdctl
    inside ``netns``."""
    import base64

    out = subprocess.run(["ip", "netns", "exec", netns, "etcdctl", "--endpoints", url, "get",
                          "--prefix", prefix, "-w", "json"],
                         check=True, capture_output=True, text=True, timeout=10).stdout
    result = {}
    for kv in json.loads(out).get("kvs", []):
        result[base64.b64decode(kv["key"]).decode()] = json.loads(base64.b64decode(kv["value"]))
    return result


# --- the benchmark ------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def codec_costs(n: int) -> dict[str, float]:
    """Microseconds per OFFER: built by scapy vs by bootsvc.wire.dhcp (plus our
    parse of a DISCOVER), measured in this process."""
    from scapy.layers.dhcp import BOOTP, DHCP
    from scapy.layers.inet import IP, UDP  # noqa: F401  (scapy layer binding)

    from bootsvc.wire import dhcp

    chaddr = bytes.fromhex("525400123456")
    server = "10.231.0.1"
    uuid = b"\x00" + bytes(16)
    t = time.perf_counter()
    for i in range(n):
        bytes(BOOTP(op=2, xid=i, chaddr=chaddr + bytes(10), siaddr=server, sname=server.encode(),
                    file=b"ipxe.efi", flags=0x8000)
              / DHCP(options=[("message-type", "offer"), ("server_id", server),
                              ("vendor_class_id", b"PXEClient"), (97, uuid), "end"]))
    scapy_us = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for i in range(n):
        dhcp.build_packet(dhcp.DhcpPacket(
            dhcp.BOOTREPLY, i, chaddr, 0, 0x8000, siaddr=server, sname=server.encode(),
            file=b"ipxe.efi", options={dhcp.OPT_MESSAGE_TYPE: b"\x02",
                                       dhcp.OPT_SERVER_ID: dhcp.ip_bytes(server),
                                       dhcp.OPT_VENDOR_CLASS: b"PXEClient",
                                       dhcp.OPT_CLIENT_UUID: uuid}))
    ours_us = (time.perf_counter() - t) / n * 1e6
    req = dhcp.build_request(chaddr, arch=7, uuid=bytes(16))
    t = time.perf_counter()
    for _ in range(n):
        dhcp.parse_packet(req)
    parse_us = (time.perf_counter() - t) / n * 1e6
    return {"scapy_build_offer_us": round(scapy_us, 2), "ours_build_offer_us": round(ours_us, 2),
            "ours_parse_discover_us": round(parse_us, 2)}


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v == v)    # drop NaN
    if not values:
        return float("nan")
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def run_one(target: str, net: NetnsPair, workdir: Path, plan: dict[str, Any],
            templates: list[bytes]) -> dict[str, dict[str, float]]:
    """Start ``target`` (ours or dnsmasq), run every load of ``plan`` on it,
    stop it; returns {scenario: summary}."""
    from bench.dhcp_loadgen import LoadGen, client_socket

    server: OurServer | Dnsmasq
    if target == "ours":
        server = OurServer(net, workdir / "ours", "--log-level", "warning")
    else:
        server = Dnsmasq(net.server, net.server_if, workdir / "dnsmasq", mode="proxy",
                         subnet=net.subnet, server_ip=net.server_ip)
    sock = client_socket(net.client, net.client_if)
    out: dict[str, dict[str, float]] = {}
    try:
        gen = LoadGen(sock, templates, loss_timeout=plan["loss_timeout"])
        # warm-up: the server answers at all (and caches are warm)
        warm = gen.closed_loop(200, 16, 5.0)
        if warm.answered == 0:
            raise RuntimeError(f"{target} answered none of the warm-up DISCOVERs")
        runs: list[tuple[str, str, float]] = [("closed", f"closed w={w}", w)
                                              for w in plan["windows"]]
        runs += [("open", f"open {r}/s", r) for r in plan["rates"]]
        runs.append(("burst", "burst 256", 256))
        for kind, name, arg in runs:
            cpu0 = cpu_seconds(server.pid)
            me0 = os.times()
            if kind == "closed":
                result = gen.closed_loop(plan["count"], int(arg), plan["time_limit"])
            elif kind == "open":
                result = gen.open_loop(arg, plan["open_seconds"])
            else:
                result = gen.burst(int(arg), 1.0)
            cpu = cpu_seconds(server.pid) - cpu0
            me1 = os.times()
            mine = (me1.user - me0.user) + (me1.system - me0.system)
            summary = result.summary()
            summary["server_cpu_pct"] = round(100 * cpu / max(result.duration, 1e-9), 1)
            summary["cpu_us_per_answer"] = round(cpu / max(result.answered, 1) * 1e6, 1)
            # what one fully busy core would answer at this CPU cost: the fair
            # comparison when the load generator, not the server, is the limit
            summary["capacity_per_s"] = round(result.answered / cpu) if cpu > 0 else float("nan")
            summary["loadgen_cpu_pct"] = round(100 * mine / max(result.duration, 1e-9), 1)
            out[name] = summary
            time.sleep(plan["pause"])
    finally:
        sock.close()
        server.stop()
    return out


ROWS = [  # (metric, label)
    ("rate_per_s", "answers/s"),
    ("p50_ms", "p50 ms"),
    ("p99_ms", "p99 ms"),
    ("lost", "lost"),
    ("cpu_us_per_answer", "server CPU us/answer"),
    ("capacity_per_s", "1-core capacity/s"),
    ("server_cpu_pct", "server CPU %"),
    ("loadgen_cpu_pct", "load generator CPU %"),
]
BURST_ROWS = [("answered", "answered of 256"), ("lost", "lost"), ("p99_ms", "p99 ms")]


def render_table(medians: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'scenario':<16} {'metric':<22} {'ours':>10} {'dnsmasq':>10} {'ratio':>7}",
             "-" * 69]
    for scenario in medians["ours"]:
        for metric, label in (BURST_ROWS if scenario.startswith("burst") else ROWS):
            ours = medians["ours"][scenario].get(metric, float("nan"))
            ref = medians["dnsmasq"].get(scenario, {}).get(metric, float("nan"))
            ratio = ours / ref if ref not in (0, 0.0) and ref == ref else float("nan")
            lines.append(f"{scenario:<16} {label:<22} {ours:>10.3f} {ref:>10.3f} {ratio:>7.2f}"
                         .replace(".000 ", "     ").replace("  nan", "    -"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import platform

    parser = argparse.ArgumentParser(prog="python -m bench.dhcp_bench", description=(
        "ProxyDHCP: our service vs dnsmasq in proxy mode, same load generator, "
        "in network namespaces this command creates and removes (needs root)."))
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (median is shown)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default bench/results/dhcp.json, "
                             "dhcp-quick.json with --quick)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("dhcp_bench: needs root (network namespaces)\n")
        return 2
    if args.quick:
        plan: dict[str, Any] = {"count": 1500, "windows": [32], "rates": [1000, 5000],
                                "open_seconds": 0.4, "time_limit": 5.0, "loss_timeout": 0.3,
                                "pause": 0.05, "reps": 1, "codec_n": 300}
    else:
        plan = {"count": 40_000, "windows": [1, 64], "rates": [1000, 5000, 10000, 20000],
                "open_seconds": 2.0, "time_limit": 20.0, "loss_timeout": 0.5, "pause": 0.3,
                "reps": 3, "codec_n": 5000}
    reps = args.reps or plan["reps"]
    json_path = args.json or (REPO / "bench" / "results" /
                              ("dhcp-quick.json" if args.quick else "dhcp.json"))
    from bench.dhcp_loadgen import make_templates

    templates = make_templates(4096)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"ours": [], "dnsmasq": []}
    import tempfile

    with tempfile.TemporaryDirectory(prefix="dhcp-bench-") as tmp, \
            NetnsPair(client_address=False) as net:
        for rep in range(reps):
            order = ["ours", "dnsmasq"] if rep % 2 == 0 else ["dnsmasq", "ours"]
            for target in order:
                print(f"rep {rep + 1}/{reps}: {target} ...", file=sys.stderr, flush=True)
                runs[target].append(run_one(target, net, Path(tmp) / f"{target}{rep}", plan,
                                            templates))
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for target, results in runs.items():
        medians[target] = {}
        for scenario in results[0]:
            medians[target][scenario] = {
                metric: _median([r[scenario][metric] for r in results])
                for metric in results[0][scenario]}
    codec = codec_costs(plan["codec_n"])
    table = render_table(medians)
    header = (f"ProxyDHCP benchmark ({'quick' if args.quick else 'full'}, median of {reps}): "
              f"DISCOVER->OFFER, random MACs, options 60/93/94/97, netns + veth; "
              f"{platform.node()} {os.cpu_count()} cpu")
    print(header)
    print(table)
    print(f"codec: scapy builds an OFFER in {codec['scapy_build_offer_us']} us, "
          f"bootsvc.wire.dhcp in {codec['ours_build_offer_us']} us "
          f"(parse of a DISCOVER {codec['ours_parse_discover_us']} us)")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "dhcp", "quick": args.quick, "reps": reps, "plan": plan,
        "command": "python -m bench.dhcp_bench" + (" --quick" if args.quick else ""),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "median": medians, "runs": runs, "codec": codec}, indent=1, sort_keys=True))
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
