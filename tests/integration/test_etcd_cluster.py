"""A 3-member etcd cluster on loopback: the store fails over between
endpoints, and nothing is lost or doubled when a member and then the leader
are killed in the middle of a stream of progress events (RELIABILITY L2)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lpmos.models import ProgressEvent, Task
from lpmos.store import StoreUnavailable
from lpmos.store.cache import WatchCache
from lpmos.store.embedded import free_port, healthy, start_etcd
from lpmos.store.etcd import EtcdStore
from lpmos.tasks import TaskService

pytestmark = pytest.mark.slow


class Member:
    def __init__(self, name: str, base: Path, cluster: str, client: int, peer: int) -> None:
        self.name, self.base, self.cluster = name, base, cluster
        self.client, self.peer = client, peer
        self.proc = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.client}"

    def start(self) -> None:
        self.proc, _ = start_etcd(self.base / self.name, name=self.name,
                                  client_port=self.client, peer_port=self.peer,
                                  initial_cluster=self.cluster, wait_healthy=None,
                                  log_path=self.base / f"{self.name}.log")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def cluster(tmp_path: Path):
    ports = [(free_port(), free_port()) for _ in range(3)]
    spec = ",".join(f"m{i}=http://127.0.0.1:{p}" for i, (_c, p) in enumerate(ports))
    members = [Member(f"m{i}", tmp_path, spec, c, p) for i, (c, p) in enumerate(ports)]
    for m in members:
        m.start()
    deadline = time.monotonic() + 30
    while not all(healthy(m.url) for m in members):
        assert time.monotonic() < deadline, "cluster did not become healthy"
        time.sleep(0.2)
    yield members
    for m in members:
        if m.proc and m.proc.poll() is None:
            m.kill()


def _leader(members: list[Member]) -> Member:
    for m in members:
        if m.proc.poll() is not None:
            continue
        s = EtcdStore([m.url], timeout=2)
        try:
            st = s.status()
            if st.leader == st.member_id:
                return m
        except StoreUnavailable:
            pass
        finally:
            s.close()
    raise AssertionError("no leader")


def _retry(fn, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except StoreUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_member_then_leader_killed_events_stored_exactly_once(cluster, keys) -> None:
    urls = [m.url for m in cluster]
    store = EtcdStore(urls, timeout=2.0)
    svc = TaskService(store, keys)
    svc.create(Task(idc="dc1", sn="sn-c", mac="52:54:00:00:00:01", os_type="lab"), by="t")
    for target in ("approved", "booting", "installing"):
        svc.transition("dc1", "sn-c", target, by="t")
    cache = WatchCache(EtcdStore(urls, timeout=2.0), keys.idc("dc1"),
                       progress_interval=0.3).start(wait=5)

    seq = 0
    failover_times = []

    def send(n: int) -> None:
        nonlocal seq
        for _ in range(n):
            seq += 1
            ev = ProgressEvent(source="agent", seq=seq, percent=min(99, seq),
                               message=f"event {seq}")
            started = time.monotonic()
            _retry(lambda ev=ev: svc.apply_events("dc1", "sn-c", [ev]))
            failover_times.append(time.monotonic() - started)

    send(20)
    follower = next(m for m in cluster if m is not _leader(cluster))
    follower.kill()
    send(20)
    follower.start()
    deadline = time.monotonic() + 30
    while not healthy(follower.url):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    leader = _leader(cluster)
    leader.kill()
    send(20)
    # each send recovered within seconds, never the 300 s "failed node" penalty
    assert max(failover_times) < 10
    final = _retry(lambda: svc.get("dc1", "sn-c"))
    task = final.task
    assert task.event_seq["agent"] == 60
    lines = [line for line in task.logs if "event " in line]
    assert lines == [f"[agent] event {i}" for i in range(1, 61)]
    # the watch cache followed the failover and converged on the same document
    key = keys.task("dc1", "sn-c")
    deadline = time.monotonic() + 20
    while cache.get(key) is None or cache.get(key).mod_revision != final.revision:
        assert time.monotonic() < deadline, "watch cache did not converge after failover"
        time.sleep(0.1)
    cache.stop()
    store.close()
