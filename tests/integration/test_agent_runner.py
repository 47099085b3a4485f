"""The agent end to end against the test node (tests/integration/test_agent_fakenode.py)
on a real etcd: install to a file target, failures reported, outages survived."""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.client import Backoff
from agent.runner import Agent, AgentOptions
from agent.spool import Spool
from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from tests.integration.test_agent_fakenode import FakeNode
from tests.unit.test_agent_install import make_image, mtype, needs_tools

MAC = "52:54:00:6a:00:01"
SN = "AGT-0001"


def inventory(disks: list[dict] | None = None):
    def fn(boot_mac: str | None) -> dict:
        return {"schema": 1, "system": {"serial": SN}, "nics": [
            {"name": "eth0", "mac": MAC, "booted": True, "link": True}],
            "disks": disks or [], "unavailable": {}}
    return fn


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "lab-disk.img"
    make_image(path)
    with path.open("r+b") as fh:          # some payload for the checksum to mean something
        fh.seek(1024 * 1024)
        fh.write(os.urandom(1024 * 1024))
    return path, hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def node(etcd_store: EtcdStore, keys: Keys, image: tuple[Path, str]) -> Iterator[FakeNode]:
    path, sha = image
    fake = FakeNode(etcd_store, keys, image_path=path, image_sha256=sha).start()
    yield fake
    fake.stop()


def options(node: FakeNode, tmp_path: Path, **kw: object) -> AgentOptions:
    values: dict = {"server": node.url, "spool_dir": tmp_path / "spool",
                    "target": tmp_path / "target.img", "no_reboot": True, "deadline": 30.0,
                    "set_clock": "no", "poll_wait": 1.0, "http_timeout": 5.0,
                    "backoff": Backoff(0.05, 0.5), "flush_timeout": 60.0}
    values.update(kw)
    return AgentOptions(**values)


def run_agent(agent: Agent, timeout: float = 60.0) -> int | None:
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        agent.stop.set()
        thread.join(10)
        return None
    return result[0]


def run_until_failed(node: FakeNode, agent: Agent) -> Task:
    """Run ``agent`` until the node has the task failed, let its spool drain and
    give it a second to (wrongly) go on, stop it; the failed task."""
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and node.task(SN).status != "failed":
        time.sleep(0.1)
    assert agent.spool.wait_empty(20)
    time.sleep(1.0)                # a second install would show up as more events
    agent.stop.set()
    thread.join(20)
    task = node.task(SN)
    assert task is not None and task.status == "failed"
    return task


def assert_exactly_once_in_order(node: FakeNode, spool_dir: Path) -> list[dict]:
    journal = Spool(spool_dir).journal()
    ids = [f"agent:{e['seq']}" for e in journal]
    assert ids, "the agent reported nothing"
    assert node.applied == ids                     # every event, once, in seq order
    return journal


@needs_tools
def test_install_to_file_target(node: FakeNode, tmp_path: Path,
                                image: tuple[Path, str]) -> None:
    node.add_task(SN, MAC)
    agent = Agent(options(node, tmp_path), inventory=inventory())
    assert run_agent(agent) == 0
    target = tmp_path / "target.img"
    written = target.read_bytes()
    # the image as served, except the seed files added to its cidata partition
    assert len(written) == image[0].stat().st_size
    assert written[:3 * 1024 * 1024] == image[0].read_bytes()[:3 * 1024 * 1024]
    assert mtype(target, 6144 * 512, "user-data") == node.seed["user-data"]
    assert mtype(target, 6144 * 512, "network-config") == node.seed["network-config"]
    journal = assert_exactly_once_in_order(node, tmp_path / "spool")
    assert journal[0]["kind"] == "state" and journal[0]["status"] == "installing"
    progress = [e for e in journal if e["step"] == "writing image"]
    assert progress[-1]["bytes_done"] == progress[-1]["bytes_total"] == len(written)
    assert all(e["rate"] >= 0 for e in progress)
    assert journal[-1]["step"] == "rebooting" and journal[-1]["percent"] == 100
    task = node.task(SN)
    assert task.status == "installing" and task.progress.step == "rebooting"
    assert task.progress.bytes_total == len(written)
    assert (tmp_path / "spool" / "token").stat().st_mode & 0o777 == 0o600
    assert node.heartbeats >= 0 and node.registrations[0]["macs"] == [MAC]


@needs_tools
def test_bad_checksum_fails_the_task(node: FakeNode, tmp_path: Path) -> None:
    node.image_sha256 = "0" * 64
    node.add_task(SN, MAC)
    agent = Agent(options(node, tmp_path), inventory=inventory())
    assert "sha256 mismatch" in run_until_failed(node, agent).reason
    assert_exactly_once_in_order(node, tmp_path / "spool")


def test_no_suitable_disk_fails_with_reasons(node: FakeNode, tmp_path: Path) -> None:
    node.add_task(SN, MAC)
    usb = [{"name": "sdz", "size_bytes": 64 << 30, "removable": True, "rotational": False}]
    agent = Agent(options(node, tmp_path, target=None), inventory=inventory(usb))
    assert "sdz: removable" in run_until_failed(node, agent).reason


@needs_tools
@pytest.mark.slow
def test_node_outage_mid_install_loses_and_doubles_nothing(node: FakeNode, tmp_path: Path,
                                                           image: tuple[Path, str]) -> None:
    node.image_rate = 2 * 1024 * 1024        # 8 MiB image: ~4 s of download
    node.add_task(SN, MAC)
    agent = Agent(options(node, tmp_path), inventory=inventory())
    result: list[int] = []
    thread = threading.Thread(target=lambda: result.append(agent.run()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and node.task(SN).progress.bytes_done < 2 * 1024 * 1024:
        time.sleep(0.05)
    assert node.task(SN).progress.bytes_done < image[0].stat().st_size   # mid-install
    node.stop()
    time.sleep(2.0)
    node.image_rate = None
    node.start()                              # same port, same store
    thread.join(90)
    assert result == [0]
    assert hashlib.sha256((tmp_path / "target.img").read_bytes()[:1024 * 1024]).digest() == \
        hashlib.sha256(image[0].read_bytes()[:1024 * 1024]).digest()
    assert [r for r in node.image_requests if r] , "the download resumed with a Range"
    assert_exactly_once_in_order(node, tmp_path / "spool")
    assert node.task(SN).progress.step == "rebooting"


@needs_tools
def test_agent_restart_resends_spool_without_doubles(node: FakeNode, tmp_path: Path) -> None:
    """Events spooled while the node was down are sent, in order, by the next agent."""
    node.add_task(SN, MAC)
    spool = Spool(tmp_path / "spool")
    for i in range(5):
        spool.append(kind="log", message=f"from the previous agent {i}")
    node.stop()                    # the previous agent never reached the node ...
    node.start()
    first = Agent(options(node, tmp_path), inventory=inventory())
    first.register()               # ... and this one registers, then sends them first
    first.start_threads()
    assert first.spool.wait_empty(30)
    first.shutdown()
    second = Agent(options(node, tmp_path), inventory=inventory())
    assert run_agent(second) == 0  # restarted agent: same token, installs
    journal = assert_exactly_once_in_order(node, tmp_path / "spool")
    assert journal[0]["message"] == "from the previous agent 0"
    assert len({e["seq"] for e in journal}) == len(journal)


def test_foreign_token_is_409_and_retried_until_deadline(node: FakeNode, tmp_path: Path) -> None:
    node.add_task(SN, MAC)
    Agent(options(node, tmp_path / "a"), inventory=inventory()).register()
    other = Agent(options(node, tmp_path / "b", deadline=1.5), inventory=inventory())
    assert other.run() == 1        # 409: retried with back-off, then gives up at the deadline
    assert len(node.registrations) >= 3


def test_cli_once_registers_and_prints_inventory_and_answer(node: FakeNode,
                                                            tmp_path: Path) -> None:
    import json
    import subprocess
    import sys

    repo = Path(__file__).resolve().parent.parent.parent
    done = subprocess.run(
        [sys.executable, "-m", "lpmos", "agent", "--once", "--server", node.url,
         "--spool-dir", str(tmp_path / "spool"), "--state-dir", str(tmp_path),
         "--deadline", "20", "--set-clock", "no"],
        capture_output=True, timeout=60, cwd=repo)
    assert done.returncode == 0, done.stderr.decode()
    out = json.loads(done.stdout)
    assert out["inventory"]["schema"] == 1
    assert out["answer"]["idc"] == "dc1" and out["answer"]["sn"]
    assert out["answer"]["token"].startswith("(issued; saved to")      # never printed
    token = (tmp_path / "spool" / "token").read_text()
    assert token and token not in done.stdout.decode()
    assert len(node.registrations) == 1


@needs_tools
def test_restarted_agent_after_write_reboots_without_rewriting(node: FakeNode,
                                                               tmp_path: Path) -> None:
    node.add_task(SN, MAC)
    assert run_agent(Agent(options(node, tmp_path), inventory=inventory())) == 0
    events_before = len(node.applied)
    stamp = (tmp_path / "target.img").stat().st_mtime_ns
    reboots: list[int] = []
    again = Agent(options(node, tmp_path, no_reboot=False), inventory=inventory(),
                  reboot=lambda: reboots.append(1))
    assert run_agent(again) == 0
    assert reboots == [1]
    assert (tmp_path / "target.img").stat().st_mtime_ns == stamp     # not written again
    assert len(node.applied) == events_before                        # nothing new reported
