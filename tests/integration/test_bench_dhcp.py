"""The ProxyDHCP benchmark runs on a tiny input and prints its table (no
speed is asserted)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.netns,
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("dnsmasq") is None,
                       reason="needs root and dnsmasq"),
]


def namespaces() -> set[str]:
    listing = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in listing.splitlines() if line.strip()}


def test_dhcp_bench_quick_prints_table_and_writes_json(tmp_path: Path) -> None:
    out = tmp_path / "dhcp.json"
    before = namespaces()
    proc = subprocess.run([sys.executable, "-m", "bench.dhcp_bench", "--quick", "--json",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any(line.split()[:4] == ["scenario", "metric", "ours", "dnsmasq"] for line in lines)
    for scenario in ("closed w=32", "open 1000/s", "open 5000/s", "burst 256"):
        assert any(line.startswith(scenario) for line in lines), scenario
    assert any(line.startswith("codec: scapy builds an OFFER") for line in lines)
    result = json.loads(out.read_text())
    assert set(result["median"]) == {"ours", "dnsmasq"}
    ours = result["median"]["ours"]["closed w=32"]
    assert ours["answered"] > 0 and ours["sent"] == 1500
    assert result["median"]["dnsmasq"]["burst 256"]["sent"] == 256
    assert not {ns for ns in namespaces() - before if ns.startswith("lpd")}   # cleaned up


def test_dhcp_storm_quick_runs_both_servers_both_ways_and_the_flood(tmp_path: Path) -> None:
    """``bench.dhcp_storm --quick``: the real node and dnsmasq, direct and
    relayed traffic with a new MAC per request, then a small flood; every
    request answered at these low rates, and unknown machines write nothing
    to etcd but the node's own registration."""
    out = tmp_path / "storm.json"
    before = namespaces()
    proc = subprocess.run([sys.executable, "-m", "bench.dhcp_storm", "--quick", "--json",
                           str(out)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(line.startswith("traffic ") and "dnsmasq" in line
               for line in proc.stdout.splitlines())
    result = json.loads(out.read_text())
    for target in ("ours", "dnsmasq"):
        for scenario in ("direct 500/s", "direct 2000/s", "relayed 500/s", "relayed 2000/s"):
            row = result["median"][target][scenario]
            assert row["offered"] > 0 and row["answered"] == row["offered"], (target, row)
    flood = result["flood"]
    assert flood["macs"] == 3000 and flood["answered"] == 3000
    assert flood["etcd_writes"] <= 5, flood          # the node's registration, not the MACs
    assert flood["timeline_pending_machines"] >= 3000    # parked in memory, bounded
    assert not {ns for ns in namespaces() - before if ns.startswith("lpd")}   # cleaned up
