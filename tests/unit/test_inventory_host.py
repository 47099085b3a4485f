"""The inventory of the machine running the tests agrees with lsblk, ip and
/proc/cpuinfo, and ``lpmos agent inventory`` prints it as valid JSON."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.inventory import collect_inventory
from agent.inventory.disks import is_excluded

REPO = Path(__file__).resolve().parent.parent.parent


@pytest.fixture(scope="module")
def inventory() -> dict:
    return collect_inventory()


def test_inventory_is_json_with_schema(inventory: dict) -> None:
    again = json.loads(json.dumps(inventory))
    assert again["schema"] == 1
    for key in ("system", "firmware", "cpu", "memory", "disks", "nics", "unavailable"):
        assert key in again
    assert all(isinstance(v, str) and v for v in again["unavailable"].values())


@pytest.mark.skipif(shutil.which("lsblk") is None, reason="lsblk missing")
def test_disks_agree_with_lsblk(inventory: dict) -> None:
    out = subprocess.run(["lsblk", "-J", "-b", "-d", "-o", "NAME,SIZE,ROTA,RM,TYPE,MODEL,WWN,"
                          "SERIAL,TRAN"], capture_output=True, check=True, timeout=30).stdout
    expected = {d["name"]: d for d in json.loads(out)["blockdevices"]
                if d["type"] == "disk" and not is_excluded(d["name"]) and int(d["size"]) > 0}
    got = {d["name"]: d for d in inventory["disks"]}
    assert sorted(got) == sorted(expected)
    for name, disk in got.items():
        ref = expected[name]
        assert disk["size_bytes"] == int(ref["size"])
        assert disk["rotational"] == bool(ref["rota"])
        if ref.get("tran") != "usb":
            assert disk["removable"] == bool(ref["rm"])
        for ours, theirs in (("model", "model"), ("wwn", "wwn")):
            if ref.get(theirs):
                assert disk.get(ours, "").lower() == " ".join(ref[theirs].split()).lower()


def test_nics_agree_with_ip_link(inventory: dict) -> None:
    out = subprocess.run(["ip", "-j", "link"], capture_output=True, check=True,
                         timeout=30).stdout
    links = {x["ifname"]: x for x in json.loads(out)}
    physical = {name for name, x in links.items() if x.get("link_type") == "ether"
                and os.path.exists(f"/sys/class/net/{name}/device")}
    got = {n["name"]: n for n in inventory["nics"]}
    if physical:
        assert sorted(got) == sorted(physical)
    for name, nic in got.items():
        assert nic["mac"] == links[name]["address"].lower()
        if nic.get("link"):
            assert "LOWER_UP" in links[name]["flags"]


def test_cpu_agrees_with_proc_cpuinfo(inventory: dict) -> None:
    text = Path("/proc/cpuinfo").read_text()
    processors = [line for line in text.splitlines() if line.startswith("processor")]
    assert inventory["cpu"]["threads"] == len(processors) == os.cpu_count()
    models = {line.split(":", 1)[1].strip() for line in text.splitlines()
              if line.startswith("model name")}
    if models:
        assert inventory["cpu"]["model"] in models
    if "cores" in inventory["cpu"]:
        assert 1 <= inventory["cpu"]["cores"] <= inventory["cpu"]["threads"]


def test_memory_agrees_with_meminfo(inventory: dict) -> None:
    import psutil
    assert inventory["memory"]["total_bytes"] == psutil.virtual_memory().total


def test_cli_inventory_prints_valid_json(tmp_path: Path) -> None:
    env = dict(os.environ, LPMOS_STATE_DIR=str(tmp_path), LPMOS_CONFIG="")
    env.pop("LPMOS_CONFIG")
    done = subprocess.run([sys.executable, "-m", "lpmos", "agent", "inventory"],
                          capture_output=True, timeout=60, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr.decode()
    inv = json.loads(done.stdout)
    assert inv["schema"] == 1 and inv["cpu"]["threads"] == os.cpu_count()


def test_cli_run_without_server_is_a_usage_error(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "lpmos", "agent", "--state-dir", str(tmp_path)],
                          capture_output=True, timeout=60, cwd=REPO)
    if Path("/proc/cmdline").read_text().find("lpmos.server=") >= 0:
        pytest.skip("this host was booted with lpmos.server=")
    assert done.returncode == 2
    assert b"agent.server" in done.stderr


def test_agent_imports_nothing_beyond_the_agent_extra(tmp_path: Path) -> None:
    """`pip install lpmos[agent]` must be enough: Flask, gRPC, scapy, Jinja2,
    PyYAML, httptools, requests are blocked and the agent still works."""
    code = r'''
import sys
BLOCKED = ("flask", "flask_sock", "grpc", "pyetcd", "scapy", "jinja2", "yaml", "httptools",
           "gunicorn", "requests", "google.protobuf", "werkzeug")
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED or name in BLOCKED:
            raise ImportError("blocked: " + name)
        return None
sys.meta_path.insert(0, Block())
import agent.cli, agent.runner, agent.install, agent.spool, agent.client, agent.clock
from lpmos.cli import main
sys.exit(main(["agent", "inventory"]))
'''
    env = dict(os.environ, LPMOS_STATE_DIR=str(tmp_path))
    env.pop("LPMOS_CONFIG", None)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60,
                          cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout)["schema"] == 1
