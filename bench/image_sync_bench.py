"""Managed image distribution (issue #25): how long until an image an
operator added is ready on N regional nodes, against plain ``curl``.

Everything is real and on this machine: etcd, the control plane under
gunicorn (``lpmos control-plane``), and N ``lpmos regional`` nodes (boot
HTTP only) in one IDC.  Each round:

* ours: the image is added through the API (a streamed upload, not
  timed); from the moment the upload's answer says ``available`` until
  every node reports the copy ``ready`` in etcd (fetched from the control
  plane with a signed request, sha256 verified, renamed into its cache);
  then it is removed again (every node frees its copy);
* the reference: N ``curl`` processes at once fetch the same file from the
  same control plane URL (an operator token) into N files; and, since ours
  always verifies, the same with a ``sha256sum`` of each file after
  (``curl+sha256``).

Each round runs ours first and then the curls, once every node is idle (the
curls first would race the nodes, which start on the record at once); both
read the same source file from the control plane's page cache (it was just
uploaded) and write N copies to the same file system. Ours is timed from
the moment the record turns available in etcd, watched every 5 ms.  The
ratio is the reference's time over ours (above 1: ours is faster).  The
nodes' peak memory is reported to show a copy is streamed, never held.

    python -m bench.image_sync_bench [--quick] [--size-mib N] [--rounds N] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from bench.http_bench import EtcdProcess, env, proc_status, stop_process
from lpmos.auth import Auth
from lpmos.client import ApiClient
from lpmos.images import NodeImageState
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys

REPO = Path(__file__).resolve().parent.parent
PREFIX = "/os"
IDC = "bench"
SOURCE_DIR = Path("/var/tmp/lpmos-bench")


def source_file(size: int) -> Path:
    """A file of ``size`` pseudo-random bytes (not sparse, not compressible),
    made once and kept for later runs."""
    SOURCE_DIR.mkdir(parents=True, exist_ok=True)
    path = SOURCE_DIR / f"image-sync-{size}.bin"
    if path.exists() and path.stat().st_size == size:
        return path
    tmp = path.with_suffix(".tmp")
    block = os.urandom(1 << 20)
    with tmp.open("wb") as fh:
        for i in range(size // len(block)):
            fh.write(hashlib.sha256(i.to_bytes(8, "big")).digest() + block[32:])
        fh.write(block[: size % len(block)])
    tmp.replace(path)
    return path


def wait_http(url: str, what: str, proc: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not answer {url} within {timeout:g} s")
        time.sleep(0.2)


class Bench:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.etcd = EtcdProcess(workdir)
        self.store = EtcdStore([self.etcd.url], timeout=5.0)
        self.keys = Keys(PREFIX)
        auth = Auth(self.store, self.keys)
        auth.put_user("bench-admin", "admin", "bench-password-1")
        self.token, _ = auth.create_token("bench-admin", label="image_sync_bench")
        port = free_port()
        self.cp_url = f"http://127.0.0.1:{port}"
        self.cp_log = (workdir / "control-plane.log").open("wb")
        self.cp = subprocess.Popen(
            [sys.executable, "-m", "lpmos", "control-plane", "--listen", f"127.0.0.1:{port}",
             "--etcd-endpoints", self.etcd.url, "--etcd-prefix", PREFIX,
             "--state-dir", str(workdir / "cp-state"), "--threads", "32",
             "--ws-max-clients", "8"],
            cwd=REPO, env=env(), stdout=self.cp_log, stderr=subprocess.STDOUT,
            start_new_session=True)
        wait_http(self.cp_url + "/healthz", "the control plane", self.cp)
        self.client = ApiClient(self.cp_url, self.token, timeout=60)
        self.nodes: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.serial = 0

    def start_nodes(self, n: int) -> None:
        for i in range(len(self.nodes), n):
            name = f"n{i + 1}"
            port = free_port()
            log = (self.workdir / f"{name}.log").open("wb")
            proc = subprocess.Popen(
                [sys.executable, "-m", "lpmos", "regional", "--idc", IDC, "--node-name", name,
                 "--services", "http", "--listen", "127.0.0.1", "--http-port", str(port),
                 "--state-dir", str(self.workdir / f"{name}-state"),
                 "--etcd-endpoints", self.etcd.url, "--etcd-prefix", PREFIX],
                cwd=REPO, env=env(), stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
            wait_http(f"http://127.0.0.1:{port}/healthz", f"node {name}", proc)
            self.nodes.append((name, proc))

    def stop(self) -> None:
        for _name, proc in self.nodes:
            stop_process(proc)
        stop_process(self.cp)
        self.cp_log.close()
        self.store.close()
        self.etcd.stop()

    # -- ours -----------------------------------------------------------------------------

    def add(self, src: Path) -> tuple[str, str, float]:
        """Add and upload an image; its name, file URL, and the monotonic
        time its record turned available in etcd (the nodes start then,
        which can be before the upload's answer arrives)."""
        self.serial += 1
        name = f"bench-{self.serial}"
        self.client.call("POST", "/images", {
            "name": name, "os_type": f"Bench {self.serial}", "os_family": "lab",
            "format": "raw", "source": "upload",
            "files": {"disk_image": {"size": src.stat().st_size}}})
        seen: list[float] = []
        stop = threading.Event()

        def watch() -> None:
            while not stop.is_set():
                kv = self.store.get(self.keys.image(name))
                if kv is not None and json.loads(kv.value).get("state") == "available":
                    seen.append(time.monotonic())
                    return
                stop.wait(0.005)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            answer = self.client.upload(f"/images/{name}/files/disk_image", src)
        finally:
            watcher.join(10)
            stop.set()
        image = answer["image"]
        if image["state"] != "available" or not seen:
            raise RuntimeError(f"{name} is {image['state']} after its upload")
        return name, str(image["files"]["disk_image"]["url"]), seen[0]

    def until_ready(self, name: str, n: int, deadline: float, started: float) -> float:
        """Seconds from ``started`` until every one of ``n`` nodes has the copy ready."""
        while True:
            states = []
            for node, _proc in self.nodes[:n]:
                kv = self.store.get(self.keys.node_image(IDC, node, name))
                states.append(NodeImageState.from_json(kv.value) if kv else None)
            failed = [s for s in states if s is not None and s.state == "failed"]
            if failed:
                raise RuntimeError(f"{name} failed on a node: {failed[0].reason}")
            if all(s is not None and s.state == "ready" for s in states):
                return time.monotonic() - started
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name} not ready on {n} nodes in time: {states}")
            time.sleep(0.02)

    def remove(self, name: str, n: int) -> None:
        self.client.call("DELETE", f"/images/{name}")
        deadline = time.monotonic() + 60
        while any(self.store.get(self.keys.node_image(IDC, node, name))
                  for node, _proc in self.nodes[:n]):
            if time.monotonic() > deadline:
                raise RuntimeError(f"the nodes did not free {name}")
            time.sleep(0.05)

    # -- the reference -----------------------------------------------------------------------

    def curls(self, url: str, n: int, *, verify: bool, deadline: float) -> float:
        out = self.workdir / "curl"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        cmds = []
        for i in range(n):
            dest = out / f"copy-{i}"
            cmd = (f"curl -sSf -H 'Authorization: Bearer {self.token}' -o {dest} '{url}'")
            if verify:
                cmd += f" && sha256sum {dest} > /dev/null"
            cmds.append(cmd)
        started = time.monotonic()
        procs = [subprocess.Popen(["sh", "-c", c]) for c in cmds]
        for p in procs:
            if p.wait(max(1.0, deadline - time.monotonic())) != 0:
                raise RuntimeError(f"curl exited with {p.returncode}")
        elapsed = time.monotonic() - started
        shutil.rmtree(out, ignore_errors=True)
        return elapsed


def run(size: int, counts: list[int], rounds: int, round_timeout: float) -> dict[str, Any]:
    src = source_file(size)
    workdir = Path(tempfile.mkdtemp(prefix="lpmos-image-sync-", dir="/var/tmp"))
    bench = Bench(workdir)
    results: dict[str, Any] = {"size": size, "rounds": rounds, "cases": []}
    try:
        for n in counts:
            bench.start_nodes(n)
            ours: list[float] = []
            plain: list[float] = []
            checked: list[float] = []
            for _round in range(rounds):
                deadline = time.monotonic() + round_timeout
                name, url, available_at = bench.add(src)
                # ours first, then the curls once the nodes are idle: were the curls first,
                # the nodes would fetch beside them (the record is available at once)
                ours.append(bench.until_ready(name, n, deadline, available_at))
                plain.append(bench.curls(url, n, verify=False, deadline=deadline))
                checked.append(bench.curls(url, n, verify=True, deadline=deadline))
                bench.remove(name, n)
            peak = max(proc_status(p.pid).get("VmHWM", 0) for _n, p in bench.nodes[:n])
            case = {"nodes": n, "ours": ours, "curl": plain, "curl_sha256": checked,
                    "ours_median": statistics.median(ours),
                    "curl_median": statistics.median(plain),
                    "curl_sha256_median": statistics.median(checked),
                    "node_peak_rss_mib": round(peak / 1024, 1)}
            results["cases"].append(case)
            print_case(case, size)
    finally:
        bench.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    return results


def print_case(case: dict[str, Any], size: int) -> None:
    n = case["nodes"]
    gib = size * n / (1 << 30)
    o, c, cs = case["ours_median"], case["curl_median"], case["curl_sha256_median"]
    print(f"{n} node(s)  ours {o:7.2f} s ({gib / o:5.2f} GiB/s)   curl {c:7.2f} s  "
          f"ratio curl/ours {c / o:5.2f}x   curl+sha256 {cs:7.2f} s  ratio {cs / o:5.2f}x   "
          f"node peak RSS {case['node_peak_rss_mib']} MiB", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="64 MiB, 1 and 2 nodes, one round")
    ap.add_argument("--size-mib", type=int, default=None, help="image size (default 1024)")
    ap.add_argument("--nodes", default=None, help="node counts, comma-separated (default 1,4)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per count (default 3)")
    ap.add_argument("--round-timeout", type=float, default=600.0,
                    help="seconds one round may take (default 600)")
    ap.add_argument("--json", default=None, help="write the results here "
                    "(default bench/results/image-sync[-quick].json)")
    args = ap.parse_args(argv)
    size = (args.size_mib or (64 if args.quick else 1024)) << 20
    counts = [int(x) for x in (args.nodes or ("1,2" if args.quick else "1,4")).split(",")]
    rounds = args.rounds or (1 if args.quick else 3)
    print(f"Managed image distribution: an image of {size >> 20} MiB added through the API, "
          f"until ready on N regional nodes (fetched from the control plane, sha256 verified) "
          f"vs N parallel curls of the same URL; median of {rounds} round(s); "
          f"ratio = reference time / ours (above 1: ours is faster)", flush=True)
    results = run(size, counts, rounds, args.round_timeout)
    path = Path(args.json) if args.json else \
        REPO / "bench" / "results" / f"image-sync{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
