"""The boot timeline's cost under a storm of unknown machines, on the
in-memory store with the real machine index: unknown machines park and
write nothing, are written once their MAC is linked to an SN, stay within
the cap (counted), expire, and a flush costs the new entries, not the
parked ones."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from bootsvc.state.machines import MachineIndex
from bootsvc.state.timeline import EtcdTimeline
from lpmos.metrics import Registry
from lpmos.models import Server
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore

IDC = "dc1"


def mac(i: int) -> str:
    return f"02:00:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"


class Env:
    def __init__(self, **kw: object) -> None:
        self.store = MemoryStore()
        self.keys = Keys("/os")
        self.cache = WatchCache(self.store, self.keys.idc(IDC)).start(wait=5)
        self.machines = MachineIndex(self.cache, self.keys, IDC)
        self.metrics = Registry()
        self.timeline = EtcdTimeline(self.store, self.keys, IDC, self.machines, self.metrics,
                                     node="n1", **kw)  # type: ignore[arg-type]

    def register(self, sn: str, *macs: str) -> None:
        before = self.machines.generation
        self.store.put(self.keys.server(IDC, sn),
                       Server(idc=IDC, sn=sn, macs=list(macs)).to_json())
        deadline = time.monotonic() + 5
        while self.machines.generation == before:
            assert time.monotonic() < deadline
            time.sleep(0.005)

    def stored(self, sn: str) -> list[str]:
        kv = self.store.get(self.keys.timeline(IDC, sn))
        return [] if kv is None else [e["stage"] for e in json.loads(kv.value)["entries"]]

    def timeline_keys(self) -> int:
        return len(self.store.range(self.keys.idc(IDC) + "timeline/").items)


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.cache.stop()


def test_unknown_machines_park_then_are_written_once_known(env: Env) -> None:
    t = env.timeline
    for i in range(50):
        t.record(mac(i), "dhcp", {"type": "OFFER"})
    t.record("ip:10.0.0.9", "script", {"decision": "discovery"})
    assert t.flush() == 0 and t.waiting() == 51
    writes = env.store.range("/").revision
    t.record(mac(1), "tftp", {"file": "ipxe.efi"})
    assert t.flush() == 0 and env.store.range("/").revision == writes    # nothing to etcd
    env.register("SN-1", mac(1))
    t.record(mac(2), "dhcp", {"type": "OFFER"})          # a new entry, machine still unknown
    assert t.flush() == 1
    assert env.stored("SN-1") == ["dhcp", "tftp"]        # the parked ones, in order
    # an address resolves through a MAC seen with it; the parked ip: entry follows
    t.record(mac(3), "http", {"mac": mac(3), "ip": "10.0.0.9"})
    env.register("SN-3", mac(3))
    assert t.flush() == 1
    assert env.stored("SN-3") == ["dhcp", "script", "http"]
    assert t.waiting() == 48


def test_the_cap_holds_and_says_what_it_dropped() -> None:
    e = Env(max_pending=100)
    try:
        for i in range(250):
            e.timeline.record(mac(i), "dhcp")
            if i % 50 == 0:
                e.timeline.flush()
        e.timeline.flush()
        assert e.timeline.waiting() == 100
        assert e.metrics.get("timeline_dropped_total", reason="too_many_machines") == 150
        e.register("SN-NEW", mac(249))                    # the newest are kept
        e.register("SN-OLD", mac(0))                      # the oldest were dropped
        e.timeline.flush()
        assert e.stored("SN-NEW") == ["dhcp"] and e.stored("SN-OLD") == []
    finally:
        e.cache.stop()


def test_parked_machines_expire_after_hold() -> None:
    e = Env(hold=0.2)
    try:
        e.timeline.record(mac(1), "dhcp")
        e.timeline.flush()
        time.sleep(0.3)
        e.timeline.record(mac(2), "dhcp")
        e.timeline.flush()
        assert e.timeline.waiting() == 1
        assert e.metrics.get("timeline_dropped_total", reason="expired") == 1
    finally:
        e.cache.stop()


def test_a_flush_costs_the_new_entries_not_the_parked_ones(env: Env) -> None:
    """20,000 unknown machines parked; then a second of a storm's worth of
    new ones, plus a registration: each flush stays small."""
    t = env.timeline
    for i in range(20_000):
        t.record(mac(i), "dhcp", {"type": "OFFER"})
    t.flush()
    env.register("SN-A", mac(19_999))    # recent: the cap drops the oldest first
    timings = []
    for round_ in range(5):
        for i in range(100):
            t.record(mac(100_000 + round_ * 100 + i), "dhcp", {"type": "OFFER"})
        started = time.perf_counter()
        t.flush()
        timings.append(time.perf_counter() - started)
    assert env.stored("SN-A") == ["dhcp"]
    # the old flush walked all 20,000 parked machines every time (~60 ms here)
    assert max(timings) < 0.015, timings
