"""Every benchmark present, one after another (``make bench``).

Runs each ``bench/<name>.py`` that exists, in this order, as its own
process (``python -m bench.<name> [--quick]``), with a time limit each:

| bench                | what                                     | reference        |
| -------------------- | ---------------------------------------- | ---------------- |
| ``dhcp_bench``       | ProxyDHCP DISCOVER→OFFER (needs root)    | dnsmasq proxy    |
| ``dhcp_storm``       | ProxyDHCP, a new MAC per packet, relayed | dnsmasq proxy    |
| ``tftp_bench``       | TFTP transfers, loopback and relay       | tftpd-hpa, dnsmasq |
| ``http_bench``       | boot scripts and kickstart, 10,000 tasks | gunicorn static  |
| ``storm``            | 1,000 machines boot and install          | the targets      |
| ``ws_fanout_bench``  | console WebSocket fan-out, 200 clients   | the target       |
| ``image_write_bench``| the agent's image write, raw/qcow2/zst   | dd, qemu-img, zstd |
| ``image_sync_bench`` | a managed image ready on 1 and 4 nodes   | parallel curl    |
| ``image_bench``      | N machines pull one 1 GiB image (Range)  | nginx, sendfile  |

Each bench prints its own table (passed through as it runs) and writes its
own JSON; this collects every table, exit status, duration and JSON into
``bench/results/all.json`` (``all-quick.json`` with ``--quick``) and prints
a summary.  A bench that fails or times out is reported and the others
still run; the exit status is 1 if any failed.

    python -m bench.all                   # full runs (tens of minutes)
    python -m bench.all --quick           # a minute or two
    python -m bench.all --only http_bench,storm
"""

from __future__ import annotations

import argparse
import json
import os
import re
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
ORDER = ("dhcp_bench", "dhcp_storm", "tftp_bench", "http_bench", "storm", "ws_fanout_bench",
         "image_write_bench", "image_sync_bench", "image_bench")
#: seconds each bench may take (full, quick)
LIMITS = {"dhcp_bench": (1800, 300), "dhcp_storm": (900, 300), "tftp_bench": (2400, 300),
          "http_bench": (1800, 300), "storm": (900, 300), "ws_fanout_bench": (900, 300),
          "image_write_bench": (1800, 300), "image_sync_bench": (1200, 300),
          "image_bench": (3600, 300)}
MAX_OUTPUT = 1 << 20


def present(only: list[str] | None = None, skip: list[str] | None = None) -> list[str]:
    """The benches that exist in ``bench/``, in :data:`ORDER`, filtered."""
    names = [n for n in ORDER if (REPO / "bench" / f"{n}.py").exists()]
    if only:
        names = [n for n in names if n in only]
    if skip:
        names = [n for n in names if n not in skip]
    return names


def run_one(name: str, quick: bool, limit: float, extra: list[str]) -> dict[str, Any]:
    """Run ``python -m bench.<name>``, echo its output, return what happened."""
    cmd = [sys.executable, "-m", f"bench.{name}", *(["--quick"] if quick else []), *extra]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    started = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    assert proc.stdout is not None
    out = bytearray()
    timed_out = False
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        while True:
            if time.monotonic() - started > limit:
                timed_out = True
                break
            if not sel.select(timeout=1.0):
                if proc.poll() is not None:
                    break
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.flush()
            if len(out) < MAX_OUTPUT:
                out += chunk
    finally:
        sel.close()
        if not timed_out:
            try:
                proc.wait(max(1.0, min(60.0, limit - (time.monotonic() - started))))
            except subprocess.TimeoutExpired:
                timed_out = True
        if proc.poll() is None:
            # the bench's own process group: its servers go with it
            os.killpg(proc.pid, signal.SIGTERM if not timed_out else signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        proc.stdout.close()
    text = out.decode("utf-8", "replace")
    result_path = None
    m = re.findall(r"^results: (\S+\.json)\s*$", text, re.M)
    if m:
        result_path = m[-1]
    data: Any = None
    if result_path:
        try:
            data = json.loads(Path(result_path).read_text())
        except (OSError, ValueError):
            data = None
    return {"command": " ".join(["python", "-m", f"bench.{name}",
                                 *(["--quick"] if quick else []), *extra]),
            "returncode": proc.returncode, "timed_out": timed_out,
            "seconds": round(time.monotonic() - started, 1), "output": text,
            "results_file": result_path, "results": data}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.all", description=(
        "Run every benchmark present in bench/ (each starts its own servers and reference) "
        "and collect the tables and JSON into bench/results/all.json."))
    parser.add_argument("--quick", action="store_true", help="each bench's --quick mode")
    parser.add_argument("--only", default="", help="comma list of bench names")
    parser.add_argument("--skip", default="", help="comma list of bench names")
    parser.add_argument("--list", action="store_true", help="list the benches present")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    skip = [n.strip() for n in args.skip.split(",") if n.strip()] or None
    names = present(only, skip)
    if args.list:
        print("\n".join(names))
        return 0
    if not names:
        print("bench.all: no benchmark to run", file=sys.stderr)
        return 2
    results: dict[str, Any] = {}
    started = time.time()
    for name in names:
        full, quick = LIMITS.get(name, (1800, 300))
        print(f"\n=== {name} ({'quick' if args.quick else 'full'}) ===", flush=True)
        extra: list[str] = []
        results[name] = run_one(name, args.quick, quick if args.quick else full, extra)
    print("\n=== summary ===")
    print(f"{'bench':<18} {'status':<10} {'seconds':>8}  results")
    failed = False
    for name, r in results.items():
        status = "timeout" if r["timed_out"] else "ok" if r["returncode"] == 0 else \
            "skipped" if r["returncode"] == 2 else f"exit {r['returncode']}"
        if status not in ("ok", "skipped"):
            failed = True
        verdict = ""
        if isinstance(r["results"], dict) and isinstance(r["results"].get("verdict"), str):
            verdict = "  " + r["results"]["verdict"]
        print(f"{name:<18} {status:<10} {r['seconds']:>8.1f}  {r['results_file'] or '-'}"
              f"{verdict}")
    json_path = args.json or REPO / "bench" / "results" / (
        "all-quick.json" if args.quick else "all.json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {"nproc": os.cpu_count(), "loadavg_at_start": os.getloadavg()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    json_path.write_text(json.dumps({
        "command": "python -m bench.all" + (" --quick" if args.quick else ""),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "seconds": round(time.time() - started, 1), "machine": info,
        "benches": results}, indent=1, sort_keys=True))
    print(f"results: {json_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
