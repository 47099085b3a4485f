"""The agent against the REAL regional node (``lpmos regional --services http``
in its own process, on a real etcd), through a bandwidth-limited proxy so an
install takes long enough to be interrupted.

* An install to a file target has the right content (sha256 verified while
  writing, the seed in the cidata partition) and the task gets the progress
  events; the firstboot callback then completes it.
* The node is killed (SIGKILL) in the middle of the install and restarted:
  the download resumes, the task completes, and every event the agent
  reported is stored exactly once, in order.
* The agent is killed in the middle of the install and restarted: its
  spool is resent, nothing lost, nothing doubled.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.inventory import collect_inventory
from agent.spool import Spool
from lpmos.models import Task
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.unit.test_agent_install import make_image, mtype, needs_tools

pytestmark = [needs_tools, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent.parent
IDC = "dc1"
MIB = 1024 * 1024
IMAGE_MIB = 24
RATE = 3 * MIB          # bytes/s through the proxy: ~8 s per full download


class ThrottleProxy:
    """TCP proxy on loopback that limits the node → agent direction to
    ``rate`` bytes/s per connection.  When the node dies, its connections
    are cut on the agent's side too, as on a real network."""

    MAX_CONNECTIONS = 64

    def __init__(self, upstream_port: int, rate: float) -> None:
        self.upstream_port = upstream_port
        self.rate = rate
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.conns: set[socket.socket] = set()
        self.lock = threading.Lock()
        self.closed = False
        self.refuse_new = False          # cut new connections (existing ones keep flowing)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse_new:
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=5)
            except OSError:
                client.close()                      # node down: connection refused/reset
                continue
            with self.lock:
                if len(self.conns) >= self.MAX_CONNECTIONS:
                    client.close()
                    upstream.close()
                    continue
                self.conns.update((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream, 0.0), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, self.rate),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, rate: float) -> None:
        try:
            src.settimeout(None)
            while True:
                data = src.recv(32 * 1024)
                if not data:
                    break
                dst.sendall(data)
                if rate:
                    time.sleep(len(data) / rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
                with self.lock:
                    self.conns.discard(s)

    def close(self) -> None:
        self.closed = True
        self.listener.close()
        with self.lock:
            conns = list(self.conns)
        for s in conns:
            s.close()


class NodeProcess:
    """``lpmos regional --services http`` as a child process we can kill."""

    def __init__(self, etcd_url: str, keys: Keys, tmp: Path, catalog: Path, port: int,
                 advertise: str) -> None:
        self.args = [sys.executable, "-m", "lpmos", "regional", "--services", "http",
                     "--etcd-endpoints", etcd_url, "--etcd-prefix", keys.prefix,
                     "--idc", IDC, "--node-name", "n1", "--listen", "127.0.0.1",
                     "--http-port", str(port), "--advertise-url", advertise,
                     "--catalog", str(catalog), "--state-dir", str(tmp / "node-state"),
                     "--event-interval", "0.2", "--heartbeat-interval", "2",
                     "--http-threads", "16"]
        self.port = port
        self.log = tmp / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.args, cwd=REPO, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz",
                                            timeout=2) as resp:
                    if json.loads(resp.read())["cache"]["loaded"]:
                        return
            except OSError:
                pass
            assert self.proc.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.2)
        raise AssertionError("node did not become healthy:\n" + self.log.read_text()[-3000:])

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


class Lab:
    def __init__(self, tmp: Path, etcd_url: str, keys: Keys) -> None:
        self.tmp = tmp
        self.keys = keys
        self.image = tmp / "images" / "lab-disk.img"
        self.image.parent.mkdir()
        make_image(self.image, size_mib=IMAGE_MIB)
        with self.image.open("r+b") as fh:             # payload after the seed partition
            fh.seek(8 * MIB)
            fh.write(os.urandom((IMAGE_MIB - 10) * MIB))
        self.sha = hashlib.sha256(self.image.read_bytes()).hexdigest()
        catalog = tmp / "images" / "catalog.toml"
        catalog.write_text(
            '[[image]]\nname = "lab"\nos_type = "Lab"\nos_family = "lab"\nmode = "image"\n'
            f'disk_image = "lab-disk.img"\nsha256 = "{self.sha}"\n'
            f'size = {self.image.stat().st_size}\n')
        node_port = free_port()
        self.proxy = ThrottleProxy(node_port, RATE)
        self.url = f"http://127.0.0.1:{self.proxy.port}"
        self.node = NodeProcess(etcd_url, keys, tmp, catalog, node_port, self.url)
        self.store = EtcdStore([etcd_url], timeout=5.0)
        self.tasks = TaskService(self.store, keys)
        self.target = tmp / "target.img"
        self.spool_dir = tmp / "agent-spool"
        self.agent: subprocess.Popen[bytes] | None = None
        self.agent_log = tmp / "agent.log"
        nics = collect_inventory(use_ipmitool=False)["nics"]
        if not nics:
            pytest.skip("this host has no Ethernet interface for the agent's identity")
        self.mac = nics[0]["mac"]
        self.sn = "LAB-" + self.mac.replace(":", "")[-6:]

    def add_task(self) -> None:
        self.tasks.create(Task(idc=IDC, sn=self.sn, mac=self.mac, os_type="Lab", image="lab"),
                          by="test")
        self.tasks.transition(IDC, self.sn, "approved", by="test")

    def task(self) -> Task:
        stored = self.tasks.get(IDC, self.sn)
        assert stored is not None
        return stored.task

    def start_agent(self) -> None:
        with self.agent_log.open("ab") as log:
            self.agent = subprocess.Popen(
                [sys.executable, "-m", "lpmos", "agent", "--server", self.url,
                 "--spool-dir", str(self.spool_dir), "--target", str(self.target),
                 "--no-reboot", "--state-dir", str(self.tmp / "agent-state"),
                 "--deadline", "60", "--set-clock", "no", "--stall-timeout", "60",
                 "--log-level", "debug"], cwd=REPO, stdout=log, stderr=log)

    def wait_written(self, fraction: float, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        want = fraction * self.image.stat().st_size
        while time.monotonic() < deadline:
            if self.target.exists() and self.target.stat().st_size >= want:
                return
            assert self.agent is not None and self.agent.poll() is None, self.logs()
            time.sleep(0.05)
        raise AssertionError("the install did not progress\n" + self.logs())

    def wait_agent(self, timeout: float = 150) -> int:
        assert self.agent is not None
        try:
            return self.agent.wait(timeout)
        except subprocess.TimeoutExpired:
            self.agent.kill()
            self.agent.wait(10)
            raise AssertionError("agent did not finish\n" + self.logs()) from None

    def logs(self) -> str:
        return ("--- agent\n" + self.agent_log.read_text(errors="replace")[-4000:] +
                "\n--- node\n" + self.node.log.read_text(errors="replace")[-4000:])

    def close(self) -> None:
        if self.agent is not None and self.agent.poll() is None:
            self.agent.kill()
            self.agent.wait(10)
        self.node.stop()
        self.proxy.close()
        self.store.close()


@pytest.fixture
def lab(tmp_path: Path, etcd_server, keys: Keys) -> Iterator[Lab]:
    lab = Lab(tmp_path, etcd_server.url, keys)
    lab.node.start()
    try:
        yield lab
    finally:
        lab.close()


def check_installed(lab: Lab) -> None:
    written = lab.target.read_bytes()
    served = lab.image.read_bytes()
    assert len(written) == len(served)
    # identical outside the seed partition (3-7 MiB), where the agent added the seed
    assert written[:3 * MIB] == served[:3 * MIB]
    assert hashlib.sha256(written[7 * MIB:]).digest() == hashlib.sha256(served[7 * MIB:]).digest()
    user_data = mtype(lab.target, 6144 * 512, "user-data")
    assert user_data.startswith("#cloud-config")
    assert mtype(lab.target, 6144 * 512, "meta-data").strip()


def check_events_exactly_once(lab: Lab) -> list[dict]:
    """Every event in the agent's journal is in the task, once, in seq order."""
    journal = Spool(lab.spool_dir).journal()
    assert journal, "the agent reported nothing"
    task = lab.task()
    assert task.event_seq.get("agent") == journal[-1]["seq"]
    expected = [f"[agent] {e['step'] + ': ' if e['step'] else ''}{e['message']}"
                for e in journal if e["message"]]
    stored = [line for line in task.logs if line.startswith("[agent] ")]
    assert len(expected) < 200, "too many events for the bounded task log"
    assert stored == expected
    return journal


def complete_with_callback(lab: Lab) -> None:
    token = (lab.spool_dir / "token").read_text().strip()
    req = urllib.request.Request(
        f"http://127.0.0.1:{lab.node.port}/callback/{lab.sn}?token={token}",
        data=json.dumps({"event": "firstboot", "status": "succeeded",
                         "message": "first boot done"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and lab.task().status != "succeeded":
        time.sleep(0.1)
    assert lab.task().status == "succeeded"


def test_install_via_real_node_with_node_killed_mid_install(lab: Lab) -> None:
    lab.add_task()
    lab.start_agent()
    lab.wait_written(0.3)
    assert lab.task().status == "installing"
    deadline = time.monotonic() + 10         # heartbeats keep the liveness lease alive
    while time.monotonic() < deadline and lab.store.get(lab.keys.lease(IDC, lab.sn)) is None:
        time.sleep(0.1)
    assert lab.store.get(lab.keys.lease(IDC, lab.sn)) is not None
    lab.node.kill()                       # SIGKILL: no goodbye, in-flight requests die
    time.sleep(2.0)
    lab.node.start()
    assert lab.wait_agent() == 0, lab.logs()
    assert "image stream interrupted" in lab.agent_log.read_text()   # it did resume
    check_installed(lab)
    journal = check_events_exactly_once(lab)
    assert journal[0]["status"] == "installing"
    progress = [e for e in journal if e["step"] == "writing image"]
    assert len(progress) >= 10
    assert progress[-1]["bytes_done"] == lab.image.stat().st_size
    steps = [b["bytes_done"] - a["bytes_done"] for a, b in itertools.pairwise(progress)]
    assert max(steps) <= 0.02 * lab.image.stat().st_size + 1024 * 1024   # every 2 % at most
    task = lab.task()
    assert task.progress.step == "rebooting" and task.progress.percent == 100
    assert task.progress.bytes_total == lab.image.stat().st_size
    complete_with_callback(lab)


def test_agent_killed_mid_install_resumes_from_spool(lab: Lab) -> None:
    lab.add_task()
    lab.start_agent()
    lab.wait_written(0.2)
    lab.proxy.refuse_new = True           # the image keeps flowing, events cannot be sent
    lab.wait_written(0.5)
    assert lab.agent is not None
    lab.agent.send_signal(signal.SIGKILL)
    lab.agent.wait(10)
    pending_before = len(Spool(lab.spool_dir))
    lab.proxy.refuse_new = False
    lab.start_agent()                     # same spool dir: same token, same seq counter
    assert lab.wait_agent() == 0, lab.logs()
    check_installed(lab)
    journal = check_events_exactly_once(lab)
    starts = [e for e in journal if e["kind"] == "state" and e["status"] == "installing"]
    assert len(starts) == 2               # the second agent started the write again
    assert len(Spool(lab.spool_dir)) == 0
    assert pending_before >= 1            # the killed agent left unsent events behind
    complete_with_callback(lab)
