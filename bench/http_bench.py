"""Boot HTTP benchmark: ours vs a static script under gunicorn.

One run, side by side, median of several repetitions:

* **ours** — ``lpmos regional --services http`` as operators run it (its
  own process: HTTP/1.1 on its asyncio loop) on a real etcd (started here in a
  temporary directory) holding ``--tasks`` tasks (10,000 by default: most
  pending, some succeeded/failed/cancelled, i.e. every non-destructive
  answer) plus a few installer-mode Rocky 9 tasks claimed before the run;
* **reference** — gunicorn with sync workers (one per CPU) serving, from
  memory, static bodies of exactly the sizes ours answered.

Scenarios, each from the same load generator (:mod:`bench.http_loadgen`,
closed loop, keep-alive, ``--connections`` connections):

| scenario        | ours                                                  |
| --------------- | ----------------------------------------------------- |
| first script    | ``GET /boot.ipxe`` (constant chain script)            |
| machine script  | ``GET /boot/<mac>.ipxe?uuid=…`` over every task's MAC |
| kickstart       | ``GET /config/<sn>/t/<token>/ks.cfg`` (rendered once  |
|                 | per task revision, then from the node's render cache) |

Also counted: etcd requests made while answering a script (the node's own
``lpmos_http_boot_script_etcd_requests_total``; must be 0 for these
non-destructive answers), etcd writes during the run per request (etcd's
``etcd_mvcc_put_total`` + ``delete_total``: the asynchronous boot timeline),
the share of kickstarts served from the render cache and rendered
(``lpmos_http_config_cache_total{result}``), server and client CPU.  The
generator's ceiling against a canned-answer asyncio server is measured in
the same run, to show the generator is not what limits the numbers.

    python -m bench.http_bench            # 10,000 tasks, 3 repetitions
    python -m bench.http_bench --quick    # 200 tasks, 1 short repetition

This module also holds the process wrappers :mod:`bench.storm` uses
(:class:`EtcdProcess`, :class:`NodeProcess`, :func:`write_catalog`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from bench.http_loadgen import (
    LoadResult,
    build_requests,
    canned_ceiling,
    cpu_seconds,
    median,
    run,
)
from lpmos import testing
from lpmos.testing import ROCKY_9

REPO = Path(__file__).resolve().parent.parent
IDC = "dc1"
PREFIX = "/os"
TARGET_RATE = 2000.0
TARGET_P99_MS = 20.0


# --- processes -----------------------------------------------------------------------------


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    return e


def proc_status(pid: int) -> dict[str, int]:
    """VmHWM / VmRSS (KiB) of ``pid`` from /proc; empty when it is gone."""
    out: dict[str, int] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (a gunicorn or nginx master and its
    workers); empty once it is gone."""
    import psutil

    try:
        me = psutil.Process(pid)
        return [pid] + [c.pid for c in me.children(recursive=True)]
    except psutil.Error:
        return []


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class EtcdProcess:
    """A real etcd (Debian's binary) on loopback with its data in ``workdir``."""

    def __init__(self, workdir: Path) -> None:
        from lpmos.store.embedded import start_etcd

        self.proc, self.url = start_etcd(workdir / "etcd-data", log_path=workdir / "etcd.log",
                                         extra_args=["--quota-backend-bytes", str(4 << 30)])

    @property
    def pid(self) -> int:
        return self.proc.pid

    def counters(self) -> dict[str, float]:
        """etcd's own mvcc counters (puts, deletes, txns, ranges)."""
        with urllib.request.urlopen(self.url + "/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for name in ("put", "delete", "txn", "range"):
            m = re.search(rf"^etcd_mvcc_{name}_total (\S+)$", text, re.M) or \
                re.search(rf"^etcd_debugging_mvcc_{name}_total (\S+)$", text, re.M)
            out[name] = float(m.group(1)) if m else float("nan")
        return out

    def stop(self) -> None:
        stop_process(self.proc)


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}`` of a Prometheus text exposition."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    total = 0.0
    for key, value in metrics.items():
        base = key.split("{", 1)[0]
        if base != name:
            continue
        if all(f'{k}="{v}"' in key for k, v in labels.items()):
            total += value
    return total


class NodeProcess:
    """``lpmos regional`` in its own process (as operators run it)."""

    def __init__(self, workdir: Path, etcd_url: str, catalog: Path, *, services: str = "http",
                 http_port: int, extra: list[str] | None = None, ready: float = 60.0) -> None:
        self.http_port = http_port
        self.url = f"http://127.0.0.1:{http_port}"
        workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = workdir / "node.log"
        args = [sys.executable, "-m", "lpmos", "regional", "--services", services,
                "--etcd-endpoints", etcd_url, "--etcd-prefix", PREFIX, "--idc", IDC,
                "--node-name", "bench", "--listen", "127.0.0.1", "--server-ip", "127.0.0.1",
                "--http-port", str(http_port), "--advertise-url", self.url,
                "--catalog", str(catalog), "--state-dir", str(workdir / "node-state"),
                "--log-level", "warning", *(extra or [])]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(args, cwd=REPO, env=env(), stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + ready
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("regional node exited:\n" + self.log_path.read_text()[-3000:])
            try:
                with urllib.request.urlopen(self.url + "/healthz", timeout=2) as resp:
                    if json.loads(resp.read())["cache"]["loaded"]:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("regional node not ready:\n"
                                   + self.log_path.read_text()[-3000:])
            time.sleep(0.2)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as resp:
            return parse_prometheus(resp.read().decode())

    def stop(self) -> None:
        stop_process(self.proc, 20)


class GunicornReference:
    """gunicorn, sync workers, serving :func:`static_app` (bodies from files
    named in ``LPMOS_BENCH_STATIC``)."""

    def __init__(self, workdir: Path, bodies: dict[str, bytes], port: int, workers: int) -> None:
        mapping = {}
        for name, body in bodies.items():
            path = workdir / f"static-{name}"
            path.write_bytes(body)
            mapping[name] = str(path)
        e = env()
        e["LPMOS_BENCH_STATIC"] = json.dumps(mapping)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = workdir / "gunicorn.log"
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "--worker-class", "sync", "--workers",
                 str(workers), "--bind", f"127.0.0.1:{port}", "--backlog", "2048",
                 "--log-level", "warning", "bench.http_bench:static_app"],
                cwd=REPO, env=e, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                start_new_session=True)
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError("gunicorn exited:\n" + self.log_path.read_text()[-2000:])
            try:
                with urllib.request.urlopen(self.url + "/boot.ipxe", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("gunicorn did not answer") from None
                time.sleep(0.2)

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid)

    def stop(self) -> None:
        stop_process(self.proc)


_STATIC: dict[str, bytes] | None = None


def static_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """The reference WSGI app: a static body per route kind, from memory."""
    global _STATIC
    if _STATIC is None:
        mapping = json.loads(os.environ.get("LPMOS_BENCH_STATIC", "{}"))
        _STATIC = {k: Path(v).read_bytes() for k, v in mapping.items()}
    path = environ.get("PATH_INFO", "")
    kind = "first" if path == "/boot.ipxe" else "machine" if path.startswith("/boot/") \
        else "kickstart" if path.startswith("/config/") else ""
    body = _STATIC.get(kind)
    if body is None:
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]
    start_response("200 OK", [("Content-Type", "text/plain; charset=utf-8"),
                              ("Content-Length", str(len(body))),
                              ("Cache-Control", "no-store")])
    return [body]


# --- data ------------------------------------------------------------------------------------


def write_catalog(root: Path, *, disk_bytes: int = 1 << 20) -> Path:
    """A catalog in ``root``: the live image, an image-mode OS (``lab``, with
    its ``size``) and an installer-mode Rocky 9 (official mirror URLs, never
    fetched)."""
    return testing.write_catalog(root, disk_name="lab", disk_bytes=disk_bytes,
                                 write_size=True, live_bytes=(64 * 1024, 64 * 1024),
                                 installers=(ROCKY_9,)).path


def machine_mac(i: int, base: int = 0x02) -> str:
    return f"{base:02x}:4c:50:{(i >> 16) & 0xff:02x}:{(i >> 8) & 0xff:02x}:{i & 0xff:02x}"


def machine_uuid(i: int, salt: str = "") -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_OID, f"lpmos-bench{salt}-{i}"))


def fill_tasks(etcd_url: str, specs: list[dict[str, Any]], *, batch: int = 100) -> None:
    """Write tasks straight into etcd, ``batch`` per transaction.  Each spec:
    sn, mac, os_type, image, status (a status past ``pending`` gets the
    history a real one would have)."""
    from lpmos.models import Task, Transition
    from lpmos.store import Put
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    keys = Keys(PREFIX)
    store = EtcdStore([etcd_url], timeout=30.0)
    chain = {"pending": ["pending"], "approved": ["pending", "approved"],
             "succeeded": ["pending", "approved", "booting", "installing", "succeeded"],
             "failed": ["pending", "approved", "booting", "installing", "failed"],
             "cancelled": ["pending", "cancelled"]}
    try:
        ops: list[Any] = []
        now = time.time() - 3600
        for spec in specs:
            task = Task(idc=IDC, sn=spec["sn"], mac=spec["mac"], os_type=spec["os_type"],
                        image=spec.get("image", ""), params=spec.get("params", {}),
                        created_by="bench", created_at=now, updated_at=now).validate()
            prev = ""
            for j, st in enumerate(chain[spec["status"]]):
                task.add_transition(Transition(prev, st, now + j, "bench", ""))
                prev = st
            task.status = spec["status"]
            if task.status in ("succeeded", "failed"):
                task.attempt = 1
                task.approved_by = "bench"
                task.claimed_by = "bench"
                for k in range(20):
                    task.add_log(f"[agent] writing: {k * 5}% of the image written")
                task.progress.percent = 100.0 if task.status == "succeeded" else 40.0
            elif task.status == "approved":
                task.attempt = 1
                task.approved_by = "bench"
                # approved now, as the control plane stamps it: the history
                # is an hour old, and a node fails an approval that no node
                # claimed within --boot-timeout (3600 s)
                task.approved_at = time.time()
            ops.append(Put(keys.task(IDC, task.sn), task.to_json()))
            if len(ops) >= batch:
                store.commit([], ops)
                ops = []
        if ops:
            store.commit([], ops)
    finally:
        store.close()


# --- the benchmark ---------------------------------------------------------------------------


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def machine_paths(n_tasks: int) -> list[str]:
    """The per-machine script URL of every task's MAC, as iPXE asks it."""
    return [f"/boot/{machine_mac(i)}.ipxe?uuid={machine_uuid(i)}&serial=SN{i:06d}"
            f"&arch=x86_64&platform=efi&bootmac={machine_mac(i)}" for i in range(n_tasks)]


def _status_for(i: int) -> str:
    r = i % 10
    return "pending" if r < 6 else "succeeded" if r < 8 else "failed" if r < 9 else "cancelled"


def prepare(workdir: Path, n_tasks: int, n_installs: int) -> tuple[EtcdProcess, Path]:
    etcd = EtcdProcess(workdir)
    (workdir / "images").mkdir()
    catalog = write_catalog(workdir / "images")
    specs: list[dict[str, Any]] = [
        {"sn": f"SN{i:06d}", "mac": machine_mac(i), "os_type": "Lab OS", "image": "lab",
         "status": _status_for(i)} for i in range(n_tasks)]
    specs += [{"sn": f"KS{i:05d}", "mac": machine_mac(i, 0x06), "os_type": "Rocky Linux 9",
               "image": "rocky-9", "status": "approved",
               "params": {"hostname": f"ks{i:05d}", "timezone": "UTC"}}
              for i in range(n_installs)]
    fill_tasks(etcd.url, specs)
    return etcd, catalog


def wait_index_ready(node: NodeProcess, n_tasks: int, limit: float = 600.0) -> float:
    """Seconds until the node's machine index knows the last task written
    (its per-machine script answers "localboot" for a succeeded task), after
    /healthz said the cache is loaded.  Non-destructive; safe to repeat."""
    last = max((i for i in range(n_tasks) if _status_for(i) == "succeeded"), default=None)
    if last is None:
        return 0.0
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        text = _get(f"{node.url}/boot/{machine_mac(last)}.ipxe?arch=x86_64&platform=efi")
        if b"(decision localboot)" in text:
            return time.monotonic() - t0
        time.sleep(0.2)
    raise RuntimeError(f"the node's machine index did not know {machine_mac(last)} "
                       f"after {limit:g} s")


def claim_kickstarts(node: NodeProcess, n_installs: int) -> list[str]:
    """Boot every Rocky task once (the claim), return its kickstart paths."""
    paths = []
    for i in range(n_installs):
        text = b""
        for _attempt in range(50):
            text = _get(f"{node.url}/boot/{machine_mac(i, 0x06)}.ipxe?arch=x86_64&platform=efi")
            m = re.search(r"inst\.ks=http://[^/\s]+(/config/[^\s]+/ks\.cfg)", text.decode())
            if m:
                paths.append(m.group(1))
                break
            time.sleep(0.2)
        else:
            raise RuntimeError("no kickstart URL in the install script:\n" + text.decode())
    return paths


def run_scenario(url: str, paths: list[str], server_pids: list[int], plan: dict[str, Any],
                 node: NodeProcess | None, etcd: EtcdProcess) -> dict[str, float]:
    target = build_requests(url, paths)
    run(target, connections=plan["connections"], duration=plan["warmup"])    # warm-up
    before = node.metrics() if node is not None else {}
    etcd0 = etcd.counters()
    cpu0 = sum(cpu_seconds(p) for p in server_pids)
    res: LoadResult = run(target, connections=plan["connections"], duration=plan["seconds"],
                          processes=plan["processes"])
    cpu = sum(cpu_seconds(p) for p in server_pids) - cpu0
    etcd1 = etcd.counters()
    out = res.summary()
    out["server_cpu_pct"] = round(100 * cpu / max(res.duration, 1e-9), 1)
    out["server_cpu_us_per_req"] = round(cpu / max(res.ok, 1) * 1e6, 1)
    if node is not None:
        after = node.metrics()
        scripts = metric_sum(after, "lpmos_http_boot_scripts_total") - \
            metric_sum(before, "lpmos_http_boot_scripts_total")
        calls = metric_sum(after, "lpmos_http_boot_script_etcd_requests_total") - \
            metric_sum(before, "lpmos_http_boot_script_etcd_requests_total")
        out["etcd_requests_per_script"] = round(calls / scripts, 4) if scripts else 0.0
        renders = metric_sum(after, "lpmos_http_boot_script_renders_total", cached="no") - \
            metric_sum(before, "lpmos_http_boot_script_renders_total", cached="no")
        out["renders_per_script"] = round(renders / scripts, 4) if scripts else 0.0
        hits = metric_sum(after, "lpmos_http_config_cache_total", result="hit") - \
            metric_sum(before, "lpmos_http_config_cache_total", result="hit")
        misses = metric_sum(after, "lpmos_http_config_cache_total", result="miss") - \
            metric_sum(before, "lpmos_http_config_cache_total", result="miss")
        configs = hits + misses
        if configs:
            out["config_hits_per_config"] = round(hits / configs, 4)
            out["config_renders_per_config"] = round(misses / configs, 4)
        writes = (etcd1["put"] - etcd0["put"]) + (etcd1["delete"] - etcd0["delete"])
        out["etcd_writes_per_req"] = round(writes / max(res.ok, 1), 4)
    return out


SCENARIOS = ("first script", "machine script", "kickstart")


def run_rep(target: str, workdir: Path, etcd: EtcdProcess, catalog: Path, plan: dict[str, Any],
            bodies: dict[str, bytes], paths: dict[str, list[str]], rep: int
            ) -> dict[str, dict[str, float]]:
    from lpmos.store.embedded import free_port

    out: dict[str, dict[str, float]] = {}
    if target == "ours":
        node = NodeProcess(workdir / f"node{rep}", etcd.url, catalog, http_port=free_port())
        try:
            wait_index_ready(node, plan["tasks"])
            for scenario in SCENARIOS:
                out[scenario] = run_scenario(node.url, paths[scenario], [node.pid], plan, node,
                                             etcd)
            out["memory"] = {"node_vmhwm_kib": float(proc_status(node.pid).get("VmHWM", 0))}
        finally:
            node.stop()
    else:
        ref = GunicornReference(workdir, bodies, free_port(), plan["ref_workers"])
        try:
            pids = ref.pids()
            for scenario in SCENARIOS:
                out[scenario] = run_scenario(ref.url, paths[scenario], pids, plan, None, etcd)
        finally:
            ref.stop()
    return out


ROWS = [("rate_per_s", "requests/s", 1), ("p50_ms", "p50 ms", 2), ("p99_ms", "p99 ms", 2),
        ("errors", "errors", 0), ("server_cpu_us_per_req", "server CPU us/req", 0),
        ("client_cpu_pct", "client CPU %", 0)]
OURS_ONLY = [("etcd_requests_per_script", "etcd requests/script", 3),
             ("renders_per_script", "renders/script (rest reused)", 3),
             ("config_hits_per_config", "config cache hits/config", 3),
             ("config_renders_per_config", "renders/config (rest cached)", 3),
             ("etcd_writes_per_req", "etcd writes/req (async)", 3)]
#: the rows of OURS_ONLY that mean something for each scenario
_SCRIPT_ONLY = ("etcd_requests_per_script", "renders_per_script")
_CONFIG_ONLY = ("config_hits_per_config", "config_renders_per_config")


def _fmt(v: float, digits: int) -> str:
    return "-" if v != v else f"{v:.{digits}f}"


def render_table(medians: dict[str, dict[str, dict[str, float]]], ref_name: str) -> str:
    lines = [f"{'scenario':<16} {'metric':<26} {'ours':>10} {ref_name:>14} {'ratio':>7}",
             "-" * 77]
    for scenario in SCENARIOS:
        ours = medians["ours"].get(scenario, {})
        ref = medians["reference"].get(scenario, {})
        for metric, label, digits in ROWS:
            a = ours.get(metric, float("nan"))
            b = ref.get(metric, float("nan"))
            ratio = a / b if b and b == b and a == a else float("nan")
            lines.append(f"{scenario:<16} {label:<26} {_fmt(a, digits):>10} "
                         f"{_fmt(b, digits):>14} {_fmt(ratio, 2):>7}")
        for metric, label, digits in OURS_ONLY:
            if metric in (_SCRIPT_ONLY if scenario == "kickstart" else _CONFIG_ONLY):
                continue
            a = ours.get(metric, float("nan"))
            lines.append(f"{scenario:<16} {label:<26} {_fmt(a, digits):>10} {'-':>14} {'-':>7}")
    return "\n".join(lines)


def _median_of(runs: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for scenario in runs[0]:
        out[scenario] = {m: median([r[scenario][m] for r in runs if m in r.get(scenario, {})])
                         for m in runs[0][scenario]}
    return out


def verdict(ours: dict[str, dict[str, float]]) -> str:
    m = ours.get("machine script", {})
    rate, p99 = m.get("rate_per_s", float("nan")), m.get("p99_ms", float("nan"))
    calls = m.get("etcd_requests_per_script", float("nan"))
    ok = rate >= TARGET_RATE and p99 < TARGET_P99_MS and calls == 0
    return (f"target (per-machine scripts >= {TARGET_RATE:.0f}/s, p99 < {TARGET_P99_MS:.0f} ms, "
            f"0 etcd requests per script): {'MET' if ok else 'NOT MET'} "
            f"({rate:.0f}/s, p99 {p99:.1f} ms, {calls:g} etcd requests/script)")


def profile_in_process(etcd_url: str, catalog: Path, workdir: Path,
                       paths: dict[str, list[str]], count: int) -> str:
    """Where ours spends its time: the boot HTTP WSGI app built as the
    regional node builds it (same cache, catalog, templates, timeline
    recording), called directly ``count`` times per scenario under cProfile
    (no HTTP server, no sockets).  Returns a report: microseconds per request
    of the app alone, and the top functions."""
    import cProfile
    import io
    import pstats

    from bootsvc.cli import SETTINGS as NODE
    from bootsvc.http.app import create_app
    from bootsvc.node import RegionalNode
    from bootsvc.state.timeline import EtcdTimeline
    from lpmos.config import COMMON, resolve, settings_by_key
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    settings = settings_by_key([COMMON, NODE])
    config = resolve(settings, {
        "state_dir": str(workdir / "profile-state"), "catalog": str(catalog),
        "etcd__prefix": PREFIX, "regional__idc": IDC, "regional__node_name": "profile",
        "regional__listen": "127.0.0.1", "regional__advertise_url": "http://127.0.0.1:8081",
        "regional__services": "http"}, environ={}, config_file=None)
    store = EtcdStore([etcd_url], timeout=5.0)
    keys = Keys(PREFIX)
    node = RegionalNode(config, store, keys)
    ctx = node.ctx
    ctx.cache.start(wait=30)
    ctx.timeline = EtcdTimeline(store, keys, IDC, ctx.machines, ctx.metrics, node="profile")
    app = create_app(ctx)
    lines = []
    try:
        def call(path: str) -> None:
            route, _, query = path.partition("?")
            environ = {"REQUEST_METHOD": "GET", "PATH_INFO": route, "QUERY_STRING": query,
                       "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "8081",
                       "REMOTE_ADDR": "127.0.0.1", "wsgi.url_scheme": "http",
                       "SERVER_PROTOCOL": "HTTP/1.1", "wsgi.input": io.BytesIO(b""),
                       "wsgi.errors": sys.stderr, "HTTP_HOST": "127.0.0.1:8081"}
            status: list[str] = []
            wsgi: Any = app
            body = b"".join(wsgi(environ, lambda s, h, *a: status.append(s)))
            if not status or not status[0].startswith("200") or not body:
                raise RuntimeError(f"{path}: {status}")

        for scenario in SCENARIOS:
            wanted = paths[scenario]
            for path in wanted[:50]:
                call(path)                                  # warm caches and templates
            prof = cProfile.Profile()
            t0 = time.process_time()
            prof.enable()
            for i in range(count):
                call(wanted[i % len(wanted)])
            prof.disable()
            cpu = time.process_time() - t0
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(18)
            lines.append(f"== {scenario}: {cpu / count * 1e6:.0f} us CPU per request in the "
                         f"WSGI app (under cProfile; ~1.5-2x its real cost)")
            lines.append(out.getvalue().split("\n\n", 2)[-1].rstrip())
    finally:
        ctx.cache.stop()
        store.close()
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"node": platform.node(), "nproc": os.cpu_count(), "cpu": cpu,
            "python": platform.python_version(),
            "loadavg_at_start": os.getloadavg()}


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="lpmos-bench-"))
    else:
        with tempfile.TemporaryDirectory(prefix="lpmos-bench-") as tmp:
            yield Path(tmp)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.http_bench", description=(
        "Boot HTTP: lpmos regional (real etcd with --tasks tasks) vs static scripts of the "
        "same sizes under gunicorn sync workers; same load generator, median of --reps."))
    parser.add_argument("--quick", action="store_true", help="200 tasks, one short repetition")
    parser.add_argument("--tasks", type=int, default=None, help="tasks in etcd (default 10000)")
    parser.add_argument("--installs", type=int, default=None,
                        help="installer-mode tasks claimed for the kickstart scenario")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--seconds", type=float, default=None, help="per scenario and target")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--processes", type=int, default=1, help="load generator processes")
    parser.add_argument("--ref-workers", type=int, default=os.cpu_count() or 2,
                        help="gunicorn sync workers (default: one per CPU)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs)")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="instead of the benchmark: N requests per scenario straight into "
                             "the WSGI app under cProfile, print where the time goes")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    quick = args.quick
    plan: dict[str, Any] = {
        "tasks": args.tasks if args.tasks is not None else (200 if quick else 10_000),
        "installs": args.installs if args.installs is not None else (5 if quick else 100),
        "reps": args.reps or (1 if quick else 3),
        "seconds": args.seconds or (1.0 if quick else 5.0),
        "warmup": 0.3 if quick else 1.0,
        "connections": max(1, min(args.connections, 512)),
        "processes": max(1, min(args.processes, 8)),
        "ref_workers": max(1, min(args.ref_workers, 64)),
    }
    plan["tasks"] = max(1, min(plan["tasks"], 200_000))
    plan["installs"] = max(1, min(plan["installs"], 1000))
    json_path = args.json or REPO / "bench" / "results" / (
        "http_bench-quick.json" if quick else "http_bench.json")
    runs: dict[str, list[dict[str, dict[str, float]]]] = {"ours": [], "reference": []}
    started = time.time()
    with workspace(args.keep) as work:
        print(f"http_bench: {plan['tasks']} tasks into etcd ({work}) ...", file=sys.stderr,
              flush=True)
        etcd, catalog = prepare(work, plan["tasks"], plan["installs"])
        try:
            from lpmos.store.embedded import free_port

            t_start = time.monotonic()
            node = NodeProcess(work / "node-setup", etcd.url, catalog, http_port=free_port())
            healthy_after = time.monotonic() - t_start
            try:
                index_after = wait_index_ready(node, plan["tasks"]) + healthy_after
                ks_paths = claim_kickstarts(node, plan["installs"])
                m_paths = machine_paths(plan["tasks"])
                bodies = {"first": _get(node.url + "/boot.ipxe"),
                          "machine": _get(node.url + m_paths[0]),
                          "kickstart": _get(node.url + ks_paths[0])}
            finally:
                node.stop()
            paths = {"first script": ["/boot.ipxe"], "machine script": m_paths,
                     "kickstart": ks_paths}
            if args.profile:
                print(profile_in_process(etcd.url, catalog, work, paths,
                                         max(10, min(args.profile, 1_000_000))))
                return 0
            for rep in range(plan["reps"]):
                order = ["ours", "reference"] if rep % 2 == 0 else ["reference", "ours"]
                for target in order:
                    print(f"rep {rep + 1}/{plan['reps']}: {target} ...", file=sys.stderr,
                          flush=True)
                    runs[target].append(run_rep(target, work, etcd, catalog, plan, bodies,
                                                paths, rep))
            ceiling = canned_ceiling(bodies["machine"], connections=plan["connections"],
                                     duration=plan["seconds"], processes=plan["processes"])
            etcd_hwm = proc_status(etcd.pid).get("VmHWM", 0)
        finally:
            etcd.stop()
    medians = {k: _median_of(v) for k, v in runs.items()}
    ref_name = f"gunicorn({plan['ref_workers']}s)"
    table = render_table(medians, ref_name)
    sizes = {k: len(v) for k, v in bodies.items()}
    info = machine_info()
    print(f"Boot HTTP benchmark ({'quick' if quick else 'full'}, median of {plan['reps']}, "
          f"{plan['seconds']:g} s per scenario, {plan['connections']} keep-alive connections): "
          f"{plan['tasks']} tasks in etcd; ours = lpmos regional (asyncio + httptools), "
          f"reference = "
          f"gunicorn sync x{plan['ref_workers']} serving static bodies of the same sizes "
          f"({sizes['first']}/{sizes['machine']}/{sizes['kickstart']} bytes); "
          f"{info['nproc']} x {info['cpu']}")
    print(table)
    print(f"load generator ceiling (canned-answer asyncio server, same machine): "
          f"{ceiling['rate_per_s']:.0f} requests/s, p99 {ceiling['p99_ms']:.2f} ms, "
          f"client CPU {ceiling['client_cpu_us_per_req']:.0f} us/request")
    print(f"start-up with {plan['tasks'] + plan['installs']} tasks: /healthz ready after "
          f"{healthy_after:.1f} s, machine index complete after {index_after:.1f} s")
    print(f"memory: regional node VmHWM {medians['ours']['memory']['node_vmhwm_kib'] / 1024:.0f}"
          f" MiB, etcd VmHWM {etcd_hwm / 1024:.0f} MiB")
    print(verdict(medians["ours"]))
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps({
        "benchmark": "http", "quick": quick, "plan": plan,
        "command": "python -m bench.http_bench" + (" --quick" if quick else ""),
        "machine": info, "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1), "body_sizes": sizes,
        "median": medians, "runs": runs, "loadgen_ceiling": ceiling,
        "etcd_vmhwm_kib": etcd_hwm, "verdict": verdict(medians["ours"]),
        "startup": {"healthz_ready_s": round(healthy_after, 2),
                    "index_complete_s": round(index_after, 2)}},
        indent=1, sort_keys=True))
    print(f"results: {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
