"""RELIABILITY: etcd out of space.  With a small
``--quota-backend-bytes`` filled up, etcd raises its NOSPACE alarm and
refuses every write: a regional node and the control plane (subprocesses,
as operators run them) say so in ``/healthz`` and ``/metrics``, the node
keeps answering non-destructive boots from its cache, refuses installs, and
the control plane refuses writes with a 503 that names the cause."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from lpmos.auth import Auth
from lpmos.models import Task
from lpmos.store import NoSpace
from lpmos.store.embedded import EtcdOptions, start_etcd
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.prometheus_text import has_sample
from tests.prometheus_text import value as metric_value
from tests.reliability.support import IDC, ControlPlane, Regional, auth, decision_of, eventually

QUOTA = 1 << 20
FLAGS = ["--etcd-maintenance-interval", "0.3"]
MAC_P, MAC_S, MAC_A = "52:54:00:0e:00:01", "52:54:00:0e:00:02", "52:54:00:0e:00:03"


@pytest.fixture
def small_etcd(tmp_path: Path) -> Iterator[str]:
    """A private etcd with a 1 MiB backend quota; its client URL."""
    proc, url = start_etcd(tmp_path / "etcd" / "data",
                           options=EtcdOptions(quota_backend_bytes=QUOTA))
    yield url
    proc.kill()
    proc.wait(10)


def boot(node: Regional, mac: str) -> tuple[str, float]:
    started = time.monotonic()
    r = requests.get(f"{node.url}/boot/{mac}.ipxe", timeout=15)
    assert r.status_code == 200, r.text
    return decision_of(r.text), time.monotonic() - started


def nospace_reasons(base: str) -> list[str] | None:
    r = requests.get(f"{base}/healthz", timeout=5)
    body = r.json()
    if r.status_code == 503 and body["status"] == "degraded" and \
            any("NOSPACE" in why for why in body["reasons"]):
        return list(body["reasons"])
    return None


def test_a_full_etcd_shows_in_healthz_and_metrics_and_the_node_boots_from_its_cache(
        small_etcd: str, keys: Keys, regional_factory: Callable[..., Regional],
        control_plane_factory: Callable[..., ControlPlane]) -> None:
    store = EtcdStore([small_etcd], timeout=2.0)
    tasks = TaskService(store, keys)
    a = Auth(store, keys)
    a.put_user("op1", "operator", "reliability-pass-1")
    token, _ = a.create_token("op1")
    tasks.create(Task(idc=IDC, sn="NS-P", mac=MAC_P, os_type="Lab OS"), by="alice")
    tasks.create(Task(idc=IDC, sn="NS-S", mac=MAC_S, os_type="Lab OS"), by="alice")
    for status in ("approved", "booting", "succeeded"):
        tasks.transition(IDC, "NS-S", status, by="bob")
    tasks.create(Task(idc=IDC, sn="NS-A", mac=MAC_A, os_type="Lab OS"), by="alice")
    tasks.transition(IDC, "NS-A", "approved", by="bob")
    node = regional_factory(small_etcd, keys.prefix, flags=FLAGS).start(wait_for=("ok",))
    cp = control_plane_factory(small_etcd, keys.prefix, flags=FLAGS).start()
    try:
        assert requests.get(f"{cp.url}/healthz", timeout=5).json()["reasons"] == []
        assert node.metric('lpmos_etcd_alarm{alarm="nospace"}') == 0
        before = {mac: boot(node, mac)[0] for mac in (MAC_P, MAC_S)}
        assert before == {MAC_P: "discovery", MAC_S: "localboot"}

        with pytest.raises(NoSpace):         # something fills etcd's quota
            for i in range(1000):
                store.put(f"{keys.prefix}/junk/{i}", b"j" * 10_000)

        reasons = eventually(lambda: nospace_reasons(node.url), 10, what="node NOSPACE")
        assert any("refuses every write" in why for why in reasons), reasons
        assert node.metric('lpmos_etcd_alarm{alarm="nospace"}') == 1
        reasons = eventually(lambda: nospace_reasons(cp.url), 10, what="control plane NOSPACE")
        metrics = requests.get(f"{cp.url}/metrics", timeout=5).text
        assert metric_value(metrics, "lpmos_etcd_alarm", alarm="nospace") == 1
        assert has_sample(metrics, "lpmos_etcd_alarm", alarm="corrupt")
        assert metric_value(metrics, "lpmos_etcd_alarm", alarm="corrupt") == 0

        # non-destructive answers come from the node's cache, as before, fast
        for mac, decision in before.items():
            got, took = boot(node, mac)
            assert got == decision and took < 1.0, (mac, got, took)
        # an install needs a claim (a write): refused, fail closed
        assert boot(node, MAC_A)[0] == "wait"
        stored = tasks.get(IDC, "NS-A")
        assert stored is not None and stored.task.status == "approved"
        # the control plane's writes: a quick 503 that says why
        r = requests.post(f"{cp.url}/api/v1/tasks", headers=auth(token), timeout=10,
                          json={"idc": IDC, "sn": "NS-NEW", "mac": "52:54:00:0e:00:09",
                                "os_type": "Lab OS"})
        assert r.status_code == 503 and "NOSPACE" in r.json()["detail"], r.text
        assert tasks.get(IDC, "NS-NEW") is None
    finally:
        store.close()

