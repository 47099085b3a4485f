"""RELIABILITY "agent clock wrong (1921, 2038) → ordering by etcd revision and
sequence, never agent wall time; expiry judged by the server", through the
real ``lpmos regional`` process."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import requests

from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import IDC, Regional, auth, register

MAC = "52:54:00:c0:00:01"
Y1921 = -1_546_300_800.0          # 1921-01-01
Y2038 = 2_147_483_650.0           # just past the 32-bit rollover


@pytest.mark.slow
def test_events_with_a_wrong_agent_clock_are_ordered_by_seq_and_stamped_by_the_server(
        etcd_server: Any, keys: Keys, regional_factory: Callable[..., Regional]) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tasks = TaskService(store, keys)
    node = regional_factory(etcd_server.url, keys.prefix, name="node-clock",
                            flags=["--services", "http"]).start(wait_for=("ok",))
    try:
        reg = register(node.url, "CLOCK-1", MAC, "")
        assert abs(reg.json()["server_time"] - time.time()) < 60     # the agent may adopt it
        token = reg.json()["token"]
        tasks.create(Task(idc=IDC, sn="CLOCK-1", mac=MAC, os_type="Lab OS"), by="alice")
        for status in ("approved", "booting"):
            tasks.transition(IDC, "CLOCK-1", status, by="bob")
        url = f"{node.url}/agent/v1/events"
        # the agent's clock jumps between 2038 and 1921; its seq is what counts
        batches: list[list[dict[str, Any]]] = [
            [{"source": "agent", "seq": 1, "kind": "state", "status": "installing",
              "message": "start", "at": Y2038}],
            [{"source": "agent", "seq": 2, "kind": "progress", "percent": 20.0,
              "message": "p20", "at": Y1921}],
            [{"source": "agent", "seq": 4, "kind": "progress", "percent": 40.0,
              "message": "p40", "at": Y1921},
             {"source": "agent", "seq": 3, "kind": "progress", "percent": 30.0,
              "message": "p30", "at": Y2038}],
            [{"source": "agent", "seq": 2, "kind": "progress", "percent": 99.0,
              "message": "late duplicate", "at": Y2038 + 1000}],
        ]
        started = time.time()
        for batch in batches:
            r = requests.post(url, json={"sn": "CLOCK-1", "events": batch},
                              headers=auth(token), timeout=30)
            assert r.status_code == 200, r.text
        stored = tasks.get(IDC, "CLOCK-1")
        assert stored is not None
        task = stored.task
        assert task.status == "installing" and task.event_seq == {"agent": 4}
        assert task.progress.percent == 40.0           # seq 4 last, whatever the clocks said
        assert [ln for ln in task.logs if ln.startswith("[agent]")] == \
            ["[agent] start", "[agent] p20", "[agent] p30", "[agent] p40"]
        # transition and progress times are the server's, not the agent's
        last = task.history[-1]
        assert last.to_status == "installing"
        assert started - 60 < last.at < time.time() + 60
        assert started - 60 < task.progress.updated_at < time.time() + 60
    finally:
        node.stop()
        store.close()
