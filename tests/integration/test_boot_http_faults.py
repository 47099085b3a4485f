"""The boot HTTP API when etcd stalls: events are spooled to disk, acked,
and replayed in order; nothing is lost, nothing applied twice."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, eventually, start_node, write_catalog

from bootsvc.state.events import EventPipeline
from lpmos.metrics import Registry
from lpmos.models import ProgressEvent, Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.store.testing import BrokenStore
from lpmos.tasks import TaskService

MAC = "52:54:00:5f:00:01"


def events(first: int, last: int, **extra: Any) -> list[dict[str, Any]]:
    return [{"source": "agent", "seq": i, "kind": "progress", "percent": float(i),
             "message": f"step {i}", **extra} for i in range(first, last + 1)]


@pytest.mark.slow
def test_events_spooled_while_etcd_stalls_then_replayed_in_order(
        private_etcd: Any, keys: Keys, tmp_path: Path) -> None:
    root = tmp_path / "images"
    root.mkdir()
    catalog, _ = write_catalog(root)
    store = EtcdStore([private_etcd.url], timeout=2.0)
    tasks = TaskService(store, keys)
    node = start_node(private_etcd.url, keys, tmp_path / "state", "node-s", catalog,
                      etcd_timeout=0.5)
    try:
        reg = requests.post(f"{node.url}/agent/v1/register", json={
            "sn": "SPOOL-1", "uuid": "", "macs": [MAC], "boot_mac": MAC, "inventory": {}},
            timeout=10)
        assert reg.status_code == 200
        token = reg.json()["token"]
        headers = {"Authorization": f"Bearer {token}"}
        tasks.create(Task(idc=IDC, sn="SPOOL-1", mac=MAC, os_type="Lab OS"), by="a")
        tasks.transition(IDC, "SPOOL-1", "approved", by="b")
        tasks.transition(IDC, "SPOOL-1", "booting", by="b")
        eventually(lambda: node.ctx.machines.view("SPOOL-1").task is not None)
        url = f"{node.url}/agent/v1/events"
        ok = requests.post(url, json={"sn": "SPOOL-1", "events": events(1, 3)},
                           headers=headers, timeout=10)
        assert ok.json()["acked"] == ["agent:1", "agent:2", "agent:3"]

        private_etcd.stop()                      # SIGSTOP: calls hang until their deadline
        try:
            batches = [events(4, 6),
                       [{"source": "agent", "seq": 7, "kind": "state", "status": "installing",
                         "message": "writing"}],
                       events(8, 9),
                       events(8, 9)]           # a resend of a spooled batch
            for batch in batches:
                r = requests.post(url, json={"sn": "SPOOL-1", "events": batch},
                                  headers=headers, timeout=20)
                assert r.status_code == 200, r.text
                assert r.json()["acked"] == [f"agent:{e['seq']}" for e in batch]
            spool = tmp_path / "state" / "spool" / "node-s" / "events.jsonl"
            lines = [json.loads(x) for x in spool.read_text().splitlines()]
            assert [e["seq"] for rec in lines for e in rec["events"]] == [4, 5, 6, 7, 8, 9, 8, 9]
            # boot answers keep coming from the cache
            r = requests.get(f"{node.url}/boot/52:54:00:5f:00:99.ipxe", timeout=10)
            assert r.status_code == 200 and "(decision discovery)" in r.text
            h = requests.get(f"{node.url}/healthz", timeout=10)
            assert h.status_code == 503 and h.json()["events_spooled_tasks"] == 1
        finally:
            private_etcd.cont()

        def replayed() -> bool:
            stored = tasks.get(IDC, "SPOOL-1")
            return stored is not None and stored.task.event_seq.get("agent") == 9
        eventually(replayed, timeout=30)
        stored = tasks.get(IDC, "SPOOL-1")
        assert stored is not None
        assert stored.task.status == "installing"
        assert stored.task.progress.percent == 9.0
        logged = [line for line in stored.task.logs if "step " in line]
        assert logged == [f"[agent] step {i}" for i in (1, 2, 3, 4, 5, 6, 8, 9)]
        eventually(lambda: node.service.boot.events.spooled_tasks() == set(), timeout=10)
        assert spool.read_text() == ""
    finally:
        node.stop()
        store.close()


def test_spool_survives_a_node_restart(etcd_store: EtcdStore, keys: Keys,
                                       tmp_path: Path) -> None:
    tasks = TaskService(etcd_store, keys)
    tasks.create(Task(idc=IDC, sn="RS-1", mac=MAC, os_type="Lab OS"), by="a")
    spool = tmp_path / "spool"
    down = EventPipeline(TaskService(BrokenStore(), keys), IDC, Registry(), spool,
                         interval=0.05)
    evs = [ProgressEvent.from_dict(e) for e in events(1, 5)]
    done = down.submit("RS-1", evs[:3])
    assert done.spooled and done.acked == ["agent:1", "agent:2", "agent:3"]
    assert down.submit("RS-1", evs[3:]).spooled        # behind the spooled ones
    # a torn last line (power cut mid-append) is ignored, not fatal
    with (spool / "events.jsonl").open("a") as fh:
        fh.write('{"sn": "RS-1", "eve')
    up = EventPipeline(tasks, IDC, Registry(), spool, interval=0.05)
    assert up.spooled_tasks() == {"RS-1"}
    up.start()
    try:
        eventually(lambda: tasks.get(IDC, "RS-1").task.event_seq.get("agent") == 5,  # type: ignore[union-attr]
                   timeout=15)
    finally:
        up.stop()
    stored = tasks.get(IDC, "RS-1")
    assert stored is not None and stored.task.progress.percent == 5.0
    # replaying again changes nothing
    rev = stored.revision
    again = EventPipeline(tasks, IDC, Registry(), spool, interval=0.05)
    assert again.replay() == 0
    assert tasks.get(IDC, "RS-1").revision == rev  # type: ignore[union-attr]
    time.sleep(0)
