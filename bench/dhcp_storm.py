"""ProxyDHCP under a storm of unknown machines: the regional node vs dnsmasq.

Traffic as a real storm sends it: a MAC never seen before in every packet,
PXE options 60/93/94/97, offered in an open loop at each rate for a few
seconds, both **direct** (broadcast from port 68) and **relayed** (unicast
from port 67 with giaddr set and hops 1, the relay allowed with
``--dhcp-relays``).  The node is the real one (``lpmos regional --services
dhcp,http`` on a real etcd, with its boot timeline); dnsmasq runs in proxy
mode on the same namespace pair.  The two alternate, round by round, so
both see the same machine.

Then a flood of unique MACs (``--flood``, 1,000,000 by default) against the
node alone: its RSS sampled as it goes, its etcd writes counted (unknown
machines must cost none), and what its boot timeline did at its cap.

    python -m bench.dhcp_storm             # 5k/10k/20k/40k per s, 2 rounds, 1M flood
    python -m bench.dhcp_storm --quick     # a few seconds (the tests run this)

Needs root (network namespaces, created and removed here).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.dhcp_bench import Dnsmasq, cpu_seconds, etcd_in_netns
from bench.dhcp_loadgen import (
    LoadGen,
    LoadResult,
    NetnsPair,
    client_socket,
    entered,
    make_templates,
)
from bench.http_bench import metric_sum, parse_prometheus, proc_status, write_catalog

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/bench"
HTTP_PORT = 8081
#: a PXE ROM retransmits after 4 s and iPXE waits about 2 s for ProxyDHCP
#: offers: an answer later than this is no answer (and counted as lost)
ANSWER_WINDOW = 3.0


def metric(values: dict[str, float], name: str, **labels: str) -> float:
    """:func:`bench.http_bench.metric_sum` of ``name``, with or without the
    ``lpmos_`` prefix (the node's names before and after it gained one)."""
    return metric_sum(values, name, **labels) + metric_sum(values, "lpmos_" + name, **labels)


class NodeInNetns:
    """``lpmos regional`` (DHCP and boot HTTP) in ``net.server``, on an etcd
    in the same namespace."""

    def __init__(self, net: NetnsPair, workdir: Path, etcd_url: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "images").mkdir(exist_ok=True)
        catalog = write_catalog(workdir / "images")
        self.net = net
        self.log_path = workdir / "node.log"
        cmd = net.exec_args(
            net.server, sys.executable, "-m", "lpmos", "regional", "--services", "dhcp,http",
            "--idc", "dc1", "--node-name", "storm", "--interface", net.server_if,
            "--listen", net.server_ip, "--server-ip", net.server_ip,
            "--http-port", str(HTTP_PORT), "--etcd-endpoints", etcd_url,
            "--etcd-prefix", PREFIX, "--catalog", str(catalog),
            "--state-dir", str(workdir / "state"), "--dhcp-relays", net.client_ip,
            "--log-level", "warning")
        env = dict(os.environ, PYTHONPATH=str(REPO))
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("node exited:\n" + self.log_path.read_text()[-3000:])
            try:
                if self.metrics():
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("node not ready:\n" + self.log_path.read_text()[-3000:])
            time.sleep(0.3)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        with entered(self.net.server):
            with urllib.request.urlopen(f"http://{self.net.server_ip}:{HTTP_PORT}/metrics",
                                        timeout=10) as resp:
                return parse_prometheus(resp.read().decode())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def etcd_puts(netns: str) -> float:
    """etcd's own count of puts and transactions (writes of any kind)."""
    with entered(netns):
        with urllib.request.urlopen("http://127.0.0.1:2379/metrics", timeout=5) as resp:
            values = parse_prometheus(resp.read().decode())
    return sum(v for k, v in values.items()
               if k.split("{")[0] in ("etcd_mvcc_put_total", "etcd_mvcc_txn_total",
                                      "etcd_debugging_mvcc_put_total",
                                      "etcd_debugging_mvcc_txn_total"))


def summarize(result: LoadResult, cpu: float) -> dict[str, float]:
    lat = result.latencies
    return {
        "offered": result.sent,
        # what the generator really sent per second (below the nominal rate
        # when it cannot keep up: then both servers see the same lower rate)
        "sent_per_s": round(result.sent / max(result.send_seconds, 1e-9)),
        "answered": result.answered,
        "answered_pct": round(100.0 * result.answered / max(result.sent, 1), 1),
        "mean_ms": round(1000 * statistics.fmean(lat), 3) if lat else float("nan"),
        "max_ms": round(1000 * max(lat), 2) if lat else float("nan"),
        "server_cpu_s": round(cpu, 2),
    }


def storm(target: str, net: NetnsPair, workdir: Path, plan: dict[str, Any],
          templates: list[bytes], etcd_url: str) -> dict[str, dict[str, float]]:
    """Start ``target``, run every (mode, rate) of ``plan`` on it, stop it."""
    server: NodeInNetns | Dnsmasq
    if target == "ours":
        server = NodeInNetns(net, workdir, etcd_url)
    else:
        server = Dnsmasq(net.server, net.server_if, workdir, mode="proxy", subnet=net.subnet,
                         server_ip=net.server_ip)
    out: dict[str, dict[str, float]] = {}
    try:
        for mode in plan["modes"]:
            if mode == "relayed":
                sock = client_socket(net.client, net.client_if, port=67)
                gen = LoadGen(sock, templates, (net.server_ip, 67), ANSWER_WINDOW,
                              unique_macs=True, giaddr=net.client_ip)
            else:
                sock = client_socket(net.client, net.client_if, port=68)
                gen = LoadGen(sock, templates, loss_timeout=ANSWER_WINDOW, unique_macs=True)
            try:
                warm = gen.closed_loop(100, 8, 5.0)
                if warm.answered == 0:
                    raise RuntimeError(f"{target} answered none of the {mode} warm-up requests")
                for rate in plan["rates"]:
                    before = server.metrics() if isinstance(server, NodeInNetns) else {}
                    cpu0 = cpu_seconds(server.pid)
                    result = gen.open_loop(rate, plan["seconds"])
                    row = summarize(result, cpu_seconds(server.pid) - cpu0)
                    if isinstance(server, NodeInNetns):
                        after = server.metrics()
                        row["dropped_stale"] = (metric(after, "dhcp_dropped_total",
                                                       reason="stale")
                                                - metric(before, "dhcp_dropped_total",
                                                         reason="stale"))
                        row["timeline_pending"] = metric(after, "timeline_pending_machines")
                    out[f"{mode} {rate}/s"] = row
                    print(f"  {target} {mode} {rate}/s: {row}", file=sys.stderr, flush=True)
                    time.sleep(plan["pause"])
            finally:
                sock.close()
    finally:
        server.stop()
    return out


def flood(net: NetnsPair, workdir: Path, etcd_url: str, plan: dict[str, Any],
          templates: list[bytes]) -> dict[str, Any]:
    """``plan["flood"]`` unique MACs at ``plan["flood_rate"]`` per second
    against the node, sampling its RSS; what it cost and kept."""
    node = NodeInNetns(net, workdir, etcd_url)
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(1.0):
            samples.append((time.monotonic(), proc_status(node.pid).get("VmRSS", 0)))

    sampler = threading.Thread(target=sample, daemon=True)
    sock = client_socket(net.client, net.client_if, port=68)
    try:
        gen = LoadGen(sock, templates, loss_timeout=1.0, unique_macs=True)
        gen.closed_loop(100, 8, 5.0)
        rss0 = proc_status(node.pid).get("VmRSS", 0)
        puts0 = etcd_puts(net.server)
        sampler.start()
        started = time.monotonic()
        total, answered, sent = plan["flood"], 0, 0
        chunk = int(plan["flood_rate"] * 5)
        while sent < total:
            n = min(chunk, total - sent)
            r = gen.open_loop(plan["flood_rate"], n / plan["flood_rate"], max_count=n)
            sent += r.sent
            answered += r.answered
        took = time.monotonic() - started
        time.sleep(2.5)                      # the timeline's flush runs
        metrics = node.metrics()
        puts = etcd_puts(net.server) - puts0
    finally:
        stop.set()
        sock.close()
        node.stop()
    rss = [kib for _, kib in samples]
    half = rss[len(rss) // 2:] or [0]
    return {
        "macs": sent, "answered": answered, "seconds": round(took, 1),
        "rss_start_mib": round(rss0 / 1024, 1),
        "rss_max_mib": round(max(rss or [0]) / 1024, 1),
        "rss_second_half_min_mib": round(min(half) / 1024, 1),
        "rss_end_mib": round((rss or [0])[-1] / 1024, 1),
        "etcd_writes": puts,
        "timeline_pending_machines": metric(metrics, "timeline_pending_machines"),
        "timeline_dropped_at_cap": metric(metrics, "timeline_dropped_total",
                                          reason="too_many_machines"),
        "dropped_stale": metric(metrics, "dhcp_dropped_total", reason="stale"),
    }


def render_table(medians: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'traffic':<16} {'sent/s':>7} {'answered % ours':>15} {'dnsmasq':>8} {'ratio':>6}  "
             f"{'mean ms ours':>12} {'dnsmasq':>8}  {'max ms ours':>11} {'dnsmasq':>8}  "
             f"{'stale drops':>11}", "-" * 116]
    for scenario, ours in medians["ours"].items():
        ref = medians["dnsmasq"].get(scenario, {})
        a, b = ours.get("answered", 0.0), ref.get("answered", 0.0)
        ratio = f"{a / b:6.2f}" if b else "     -"
        lines.append(
            f"{scenario:<16} {ours.get('sent_per_s', 0):>7.0f} "
            f"{ours.get('answered_pct', 0):>15.1f} "
            f"{ref.get('answered_pct', float('nan')):>8.1f} {ratio}  "
            f"{ours.get('mean_ms', float('nan')):>12.2f} {ref.get('mean_ms', float('nan')):>8.2f}  "
            f"{ours.get('max_ms', float('nan')):>11.1f} {ref.get('max_ms', float('nan')):>8.1f}  "
            f"{ours.get('dropped_stale', 0):>11.0f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dhcp_storm", description=(
        "ProxyDHCP under a storm of unknown machines (a new MAC in every packet, direct "
        "and relayed): lpmos regional vs dnsmasq, alternating, in network namespaces this "
        "command creates and removes (needs root); then a flood of unique MACs against "
        "the node alone (memory and etcd writes)."))
    parser.add_argument("--quick", action="store_true", help="a few seconds, for tests")
    parser.add_argument("--rates", default=None, metavar="LIST",
                        help="offered rates per second (default 5000,10000,20000,40000)")
    parser.add_argument("--seconds", type=float, default=None, help="per rate (default 3)")
    parser.add_argument("--rounds", type=int, default=None, help="default 2 (median shown)")
    parser.add_argument("--flood", type=int, default=None, metavar="MACS",
                        help="unique MACs in the flood (default 1000000; 0: none)")
    parser.add_argument("--json", type=Path, default=None,
                        help="result file (default bench/results/dhcp-storm[-quick].json)")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        sys.stderr.write("dhcp_storm: needs root (network namespaces)\n")
        return 2
    plan: dict[str, Any] = ({"rates": [500, 2000], "seconds": 0.5, "rounds": 1,
                             "flood": 3000, "flood_rate": 2000, "pause": 0.2}
                            if args.quick else
                            {"rates": [5000, 10000, 20000, 40000], "seconds": 3.0,
                             "rounds": 2, "flood": 1_000_000, "flood_rate": 20000,
                             "pause": 1.0})
    plan["modes"] = ["direct", "relayed"]
    if args.rates:
        plan["rates"] = [int(r) for r in args.rates.split(",")]
    for key in ("seconds", "rounds", "flood"):
        if getattr(args, key) is not None:
            plan[key] = getattr(args, key)
    plan["seconds"] = max(0.1, min(float(plan["seconds"]), 60.0))
    plan["rounds"] = max(1, min(int(plan["rounds"]), 10))
    plan["flood"] = max(0, min(int(plan["flood"]), 5_000_000))
    json_path = args.json or REPO / "bench" / "results" / (
        "dhcp-storm-quick.json" if args.quick else "dhcp-storm.json")
    templates = make_templates(1024)
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"ours": [], "dnsmasq": []}
    flood_result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dhcp-storm-") as tmp, NetnsPair() as net, \
            etcd_in_netns(net.server, Path(tmp)) as (_etcd, etcd_url):
        for rnd in range(plan["rounds"]):
            order = ["ours", "dnsmasq"] if rnd % 2 == 0 else ["dnsmasq", "ours"]
            for target in order:
                print(f"round {rnd + 1}/{plan['rounds']}: {target} ...", file=sys.stderr,
                      flush=True)
                runs[target].append(storm(target, net, Path(tmp) / f"{target}{rnd}", plan,
                                          templates, etcd_url))
        if plan["flood"]:
            print(f"flood: {plan['flood']} unique MACs ...", file=sys.stderr, flush=True)
            flood_result = flood(net, Path(tmp) / "flood", etcd_url, plan, templates)
    medians: dict[str, dict[str, dict[str, float]]] = {}
    for target, results in runs.items():
        medians[target] = {
            scenario: {m: statistics.median(r[scenario][m] for r in results)
                       for m in results[0][scenario]}
            for scenario in results[0]}
    print(f"ProxyDHCP storm ({'quick' if args.quick else 'full'}, median of "
          f"{plan['rounds']} rounds, {plan['seconds']:g} s per rate): a new MAC in every "
          f"DISCOVER, options 60/93/94/97, lpmos regional + etcd vs dnsmasq proxy; "
          f"{platform.node()} {os.cpu_count()} cpu")
    print(render_table(medians))
    if flood_result:
        print("flood: " + json.dumps(flood_result))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "dhcp_storm", "quick": args.quick, "plan": plan,
        "command": "python -m bench.dhcp_storm" + (" --quick" if args.quick else ""),
        "machine": {"node": platform.node(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "median": medians, "runs": runs, "flood": flood_result}, indent=1, sort_keys=True))
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
