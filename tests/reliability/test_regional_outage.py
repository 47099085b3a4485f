"""RELIABILITY: a regional node (``lpmos regional`` subprocess) riding out an
etcd outage, and a node starting while etcd is down.

The node runs with the default etcd deadline (2 s), so any etcd request on
the path of a non-destructive answer would show as a >= 2 s answer: the
< 1 s bound on those answers is what proves they come from the cache.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import (
    IDC,
    Regional,
    auth,
    decision_of,
    eventually,
    progress,
    register,
    stop_etcd,
)

FLAGS = ["--etcd-timeout", "2", "--event-interval", "0.1", "--boot-retry-delay", "5"]
FAST = 1.0       # seconds: every non-destructive answer during the outage

MAC_A, MAC_B, MAC_C = "52:54:00:0a:00:01", "52:54:00:0a:00:02", "52:54:00:0a:00:03"
MAC_D, MAC_F = "52:54:00:0a:00:04", "52:54:00:0a:00:06"
UUID_A = "0a0a0a0a-0000-4000-8000-000000000001"
UUID_B = "0a0a0a0a-0000-4000-8000-000000000002"


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.monotonic()
    result = fn()
    return result, time.monotonic() - started


def boot(node: Regional, mac: str, timeout: float = 15) -> requests.Response:
    return requests.get(f"{node.url}/boot/{mac}.ipxe", timeout=timeout)


def events(node: Regional, sn: str, token: str, evs: list[dict[str, Any]]) -> requests.Response:
    return requests.post(f"{node.url}/agent/v1/events", json={"sn": sn, "events": evs},
                         headers=auth(token), timeout=30)


def poll(node: Regional, sn: str, token: str) -> dict[str, Any]:
    r = requests.get(f"{node.url}/agent/v1/task", params={"sn": sn}, headers=auth(token),
                     timeout=30)
    assert r.status_code == 200, r.text
    return dict(r.json())


def heartbeat_status(node: Regional, sn: str, token: str) -> str | None:
    r = requests.post(f"{node.url}/agent/v1/heartbeat", json={"sn": sn, "state": "idle"},
                      headers=auth(token), timeout=30)
    return r.json().get("task_status") if r.status_code == 200 else None


def non_destructive_answers(node: Regional, tmp: Path, xid: int) -> dict[str, float]:
    """Every cached answer once, each timed; asserts their content."""
    took: dict[str, float] = {}
    reply, took["proxydhcp"] = timed(lambda: node.proxy_dhcp("52:54:00:0a:ff:01", xid))
    assert reply.file.rstrip(b"\0") == b"ipxe.efi"
    data, took["tftp"] = timed(lambda: node.tftp("undionly.kpxe", tmp / f"u{xid}.kpxe"))
    assert hashlib.sha256(data).digest() == hashlib.sha256(
        Path("/usr/lib/ipxe/undionly.kpxe").read_bytes()).digest()
    r, took["boot.ipxe"] = timed(lambda: requests.get(f"{node.url}/boot.ipxe", timeout=15))
    assert r.status_code == 200 and r.text.startswith("#!ipxe")
    r, took["discovery"] = timed(lambda: boot(node, MAC_C))
    assert r.status_code == 200 and decision_of(r.text) == "discovery", r.text
    r, took["localboot"] = timed(lambda: boot(node, MAC_F))
    assert r.status_code == 200 and decision_of(r.text) == "localboot", r.text
    return took


@pytest.mark.slow
def test_node_rides_out_etcd_stopped_then_killed(private_etcd: Any, keys: Keys,
                                                 regional_factory: Callable[..., Regional],
                                                 tmp_path: Path) -> None:
    store = EtcdStore([private_etcd.url], timeout=2.0)
    tasks = TaskService(store, keys)
    node = regional_factory(private_etcd.url, keys.prefix, flags=FLAGS).start(wait_for=("ok",))
    try:
        # --- before: A installing (image mode, claimed by its agent's poll), B registered
        # with a task about to be approved, D an installer-mode install, F done.
        reg_a = register(node.url, "OUT-A", MAC_A, UUID_A)
        assert reg_a.status_code == 200, reg_a.text
        tok_a = reg_a.json()["token"]
        tasks.create(Task(idc=IDC, sn="OUT-A", mac=MAC_A, os_type="Lab OS"), by="alice")
        tasks.transition(IDC, "OUT-A", "approved", by="bob")
        answer = eventually(lambda: (a := poll(node, "OUT-A", tok_a))["action"] == "install"
                            and a, what="A's install claim")
        assert answer["install"]["mode"] == "image"
        first = [{"source": "agent", "seq": 1, "kind": "state", "status": "installing",
                  "message": "start writing"}, *progress(2, 3)]
        assert events(node, "OUT-A", tok_a, first).json()["acked"] == \
            ["agent:1", "agent:2", "agent:3"]

        reg_b = register(node.url, "OUT-B", MAC_B, UUID_B)
        tok_b = reg_b.json()["token"]
        tasks.create(Task(idc=IDC, sn="OUT-B", mac=MAC_B, os_type="Lab OS"), by="alice")
        tasks.transition(IDC, "OUT-B", "approved", by="bob")
        eventually(lambda: heartbeat_status(node, "OUT-B", tok_b) == "approved",
                   what="B approved in the node's cache")

        tasks.create(Task(idc=IDC, sn="OUT-D", mac=MAC_D, os_type="Rocky Linux 9"), by="alice")
        tasks.transition(IDC, "OUT-D", "approved", by="bob")
        script_d = eventually(lambda: (r := boot(node, MAC_D)).status_code == 200
                              and decision_of(r.text) == "claim" and r.text,
                              what="D's install script")
        tok_d = re.search(r"/config/OUT-D/t/([A-Za-z0-9_-]+)/ks\.cfg", script_d).group(1)  # type: ignore[union-attr]
        callback_d = f"{node.url}/callback/OUT-D"

        def cb(seq: int, status: str, message: str) -> requests.Response:
            return requests.post(callback_d, headers=auth(tok_d), timeout=30, json={
                "event": "installer", "status": status, "message": message, "seq": seq})

        assert cb(1, "installing", "anaconda started").json()["task_status"] == "installing"

        tasks.create(Task(idc=IDC, sn="OUT-F", mac=MAC_F, os_type="Lab OS"), by="alice")
        for status in ("approved", "booting", "succeeded"):
            tasks.transition(IDC, "OUT-F", status, by="bob")
        eventually(lambda: decision_of(boot(node, MAC_F).text) == "localboot",
                   what="F done in the node's cache")
        revision_before = store.revision()
        non_destructive_answers(node, tmp_path, 1)

        # --- the outage: SIGSTOP (calls hang until their deadline) ...
        stop_etcd(private_etcd)
        outage_started = time.monotonic()
        stopped: bool | None = True
        try:
            took = non_destructive_answers(node, tmp_path, 2)
            assert max(took.values()) < FAST, took
            r = events(node, "OUT-A", tok_a, progress(4, 6))
            assert r.status_code == 200 and r.json()["acked"] == ["agent:4", "agent:5", "agent:6"]
            r = events(node, "OUT-A", tok_a, progress(4, 6))          # a resend: harmless
            assert r.status_code == 200 and r.json()["acked"] == ["agent:4", "agent:5", "agent:6"]
            assert cb(2, "progress", "packages").status_code == 200
            # no install while the claim cannot be made: B's agent is told to wait ...
            assert poll(node, "OUT-B", tok_b)["action"] == "wait"
            # ... and B's boot script is a wait-and-retry script
            r = boot(node, MAC_B, timeout=30)
            assert decision_of(r.text) == "wait" and "etcd unavailable" in r.text
            assert "chain --replace --autofree" in r.text and "lpmos.mode=install" not in r.text
            # A booting again mid-install cannot be confirmed either
            assert decision_of(boot(node, MAC_A, timeout=30).text) == "wait"

            # hold the stall past every deadline (etcd 2 s, events 10 s, health 10 s)
            time.sleep(max(0.0, 12.5 - (time.monotonic() - outage_started)))
            took = non_destructive_answers(node, tmp_path, 3)
            assert max(took.values()) < FAST, took
            h = requests.get(f"{node.url}/healthz", timeout=15)
            assert h.status_code == 503
            health = h.json()
            assert health["status"] == "degraded" and health["etcd"]["reachable"] is False
            assert health["cache"]["staleness_seconds"] > 8
            assert health["events_spooled_tasks"] == 2
            assert health["installs"].startswith("refused")
            assert node.metric("lpmos_node_cache_staleness_seconds") > 8
            assert events(node, "OUT-A", tok_a, progress(7, 8)).status_code == 200

            # ... then SIGKILL: connections refused
            private_etcd.kill()
            stopped = None
            took = non_destructive_answers(node, tmp_path, 4)
            assert max(took.values()) < FAST, took
            r = events(node, "OUT-A", tok_a, progress(9, 10))
            assert r.status_code == 200 and r.json()["acked"] == ["agent:9", "agent:10"]
            assert cb(3, "progress", "bootloader").status_code == 200
            assert poll(node, "OUT-B", tok_b)["action"] == "wait"
            assert decision_of(boot(node, MAC_B, timeout=30).text) == "wait"
            assert node.metric("lpmos_http_events_spooled_total") >= 12
        finally:
            if stopped:
                private_etcd.cont()
            elif stopped is None:
                private_etcd.start()

        # --- etcd is back: the spool is replayed in order, exactly once
        eventually(lambda: requests.get(f"{node.url}/healthz", timeout=10).status_code == 200,
                   timeout=60, interval=0.5, what="node healthy again")
        a = tasks.get(IDC, "OUT-A")
        assert a is not None
        assert a.task.status == "installing" and a.task.event_seq == {"agent": 10}
        assert a.task.progress.percent == 10.0
        assert [line for line in a.task.logs if "step " in line] == \
            [f"[agent] write: step {i}" for i in range(2, 11)]
        assert [h.to_status for h in a.task.history] == ["pending", "approved", "booting",
                                                       "installing"]
        d = tasks.get(IDC, "OUT-D")
        assert d is not None and d.task.status == "installing"
        assert d.task.event_seq == {"installer": 3}
        assert [ln for ln in d.task.logs if ln.startswith("[installer]")] == [
            "[installer] anaconda started", "[installer] packages", "[installer] bootloader"]
        b = tasks.get(IDC, "OUT-B")
        assert b is not None and b.task.status == "approved"     # nothing served it an install
        assert b.revision < revision_before
        assert node.metric("lpmos_http_events_replayed_total") >= 12
        assert node.metric('lpmos_http_install_claims_total{result="refused"}') >= 4

        # --- and the node works as before: B is claimed now, A and D finish
        assert eventually(lambda: poll(node, "OUT-B", tok_b)["action"] == "install",
                          what="B's install after the outage")
        b = tasks.get(IDC, "OUT-B")
        assert b is not None and b.task.status == "booting" and b.task.claimed_by == node.name
        assert events(node, "OUT-A", tok_a, [
            {"source": "agent", "seq": 11, "kind": "progress", "step": "rebooting",
             "percent": 100.0}]).status_code == 200
        fb = requests.post(f"{node.url}/callback/OUT-A", headers=auth(tok_a), timeout=30,
                           json={"event": "firstboot", "status": "succeeded", "message": "up"})
        assert fb.status_code == 200 and fb.json()["task_status"] == "succeeded"
        assert cb(4, "succeeded", "post done").json()["task_status"] == "succeeded"
        for sn in ("OUT-A", "OUT-D"):
            done = tasks.get(IDC, sn)
            assert done is not None
            assert [h.to_status for h in done.task.history].count("succeeded") == 1
        assert node.proc is not None and node.proc.poll() is None
    finally:
        node.stop()
        store.close()


@pytest.mark.slow
def test_node_started_while_etcd_is_down_recovers_by_itself(
        private_etcd: Any, keys: Keys, regional_factory: Callable[..., Regional],
        tmp_path: Path) -> None:
    store = EtcdStore([private_etcd.url], timeout=2.0)
    tasks = TaskService(store, keys)
    try:
        tasks.create(Task(idc=IDC, sn="COLD-1", mac=MAC_D, os_type="Rocky Linux 9"), by="alice")
        tasks.transition(IDC, "COLD-1", "approved", by="bob")
        private_etcd.kill()
        node = regional_factory(private_etcd.url, keys.prefix, name="node-cold", flags=FLAGS)
        node.start(wait_for=("degraded",))
        h = requests.get(f"{node.url}/healthz", timeout=15)
        assert h.status_code == 503
        health = h.json()
        assert health["status"] == "degraded" and health["cache"]["loaded"] is False
        assert health["etcd"]["reachable"] is False
        assert health["cache"]["staleness_seconds"] is None     # never confirmed
        # non-destructive answers from what it has (nothing): discovery, DHCP, TFTP
        reply, took = timed(lambda: node.proxy_dhcp("52:54:00:0c:00:09", 9))
        assert reply.file.rstrip(b"\0") == b"ipxe.efi" and took < FAST
        data, took = timed(lambda: node.tftp("undionly.kpxe", tmp_path / "cold.kpxe"))
        assert data[:2] and took < FAST
        r, took = timed(lambda: boot(node, MAC_C))
        assert decision_of(r.text) == "discovery" and took < FAST
        # the approved machine is unknown to the empty cache: no install
        r = boot(node, MAC_D)
        assert "lpmos.mode=install" not in r.text and "inst.ks=" not in r.text
        time.sleep(3)
        private_etcd.start()
        # back by itself: reconnects, loads the IDC, then installs again
        eventually(lambda: requests.get(f"{node.url}/healthz", timeout=10).status_code == 200,
                   timeout=60, interval=0.5, what="node healthy after etcd started")
        health = requests.get(f"{node.url}/healthz", timeout=10).json()
        assert health["cache"]["loaded"] is True and health["cache"]["staleness_seconds"] < 5
        script = eventually(lambda: (r := boot(node, MAC_D)).status_code == 200
                            and decision_of(r.text) == "claim" and r.text,
                            what="the install once etcd is back")
        assert "inst.ks=" in script
        stored = tasks.get(IDC, "COLD-1")
        assert stored is not None and stored.task.status == "booting"
        assert stored.task.claimed_by == "node-cold"
        assert node.proc is not None and node.proc.poll() is None
        node.stop()
    finally:
        store.close()
