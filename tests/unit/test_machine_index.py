"""The node's machine index over a watch cache of the in-memory store:
lookups after every kind of change, who wins a shared MAC, and that a
change costs O(the record) (a storm of new machines stays linear)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from bootsvc.state.machines import LINKED_KEPT, MachineIndex
from lpmos.models import Server, Task
from lpmos.store import KeyValue
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore

IDC = "dc1"


class Env:
    def __init__(self) -> None:
        self.store = MemoryStore()
        self.keys = Keys("/os")
        self.cache = WatchCache(self.store, self.keys.idc(IDC)).start(wait=5)
        self.index = MachineIndex(self.cache, self.keys, IDC)

    def _settle(self, write: Callable[[], object]) -> None:
        """Run ``write`` (one task or server change) and wait until the index
        has it (listeners run after the cache itself has the revision)."""
        before = self.index.generation
        write()
        deadline = time.monotonic() + 5
        while self.index.generation == before:
            assert time.monotonic() < deadline, "the index never saw the change"
            time.sleep(0.005)

    def server(self, sn: str, *macs: str, uuid: str = "") -> None:
        s = Server(idc=IDC, sn=sn, macs=list(macs), uuid=uuid)
        self._settle(lambda: self.store.put(self.keys.server(IDC, sn), s.to_json()))

    def task(self, sn: str, mac: str) -> None:
        t = Task(idc=IDC, sn=sn, mac=mac, os_type="Lab OS")
        self._settle(lambda: self.store.put(self.keys.task(IDC, sn), t.to_json()))

    def delete(self, key: str) -> None:
        self._settle(lambda: self.store.delete(key))


@pytest.fixture
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.cache.stop()


A, B, C = "52:54:00:00:00:0a", "52:54:00:00:00:0b", "52:54:00:00:00:0c"
U1 = "4c4c4544-0042-3510-8051-b4c04f4e4e31"


def test_lookups_follow_every_change(env: Env) -> None:
    g0 = env.index.generation
    env.server("sn-1", A, B, uuid=U1)
    assert env.index.generation > g0
    assert (env.index.sn_for(mac=A), env.index.sn_for(mac=B)) == ("sn-1", "sn-1")
    assert env.index.sn_for(uuid=U1) == "sn-1" and env.index.known_mac(A)
    env.server("sn-1", B)                        # A is gone from the record, and the uuid
    assert env.index.sn_for(mac=A) is None and not env.index.known_mac(A)
    assert env.index.sn_for(uuid=U1) is None and env.index.sn_for(mac=B) == "sn-1"
    env.task("sn-2", C)                          # a task alone makes its MAC known
    assert env.index.sn_for(mac=C) == "sn-2" and env.index.view("sn-2").task is not None
    env.delete(env.keys.task(IDC, "sn-2"))
    assert env.index.sn_for(mac=C) is None and env.index.view("sn-2").task is None
    env.delete(env.keys.server(IDC, "sn-1"))
    assert env.index.sn_for(mac=B) is None and env.index.sn_for(serial="sn-1") is None


def test_a_task_wins_a_mac_and_the_newest_server_wins_among_servers(env: Env) -> None:
    env.server("sn-old", A)
    env.server("sn-new", A)                       # a moved NIC: the newest record wins
    assert env.index.sn_for(mac=A) == "sn-new"
    env.task("sn-task", A)
    assert env.index.sn_for(mac=A) == "sn-task"
    env.delete(env.keys.task(IDC, "sn-task"))     # back to the servers
    assert env.index.sn_for(mac=A) == "sn-new"
    env.delete(env.keys.server(IDC, "sn-new"))    # and to the one that still lists it
    assert env.index.sn_for(mac=A) == "sn-old"
    # a full reload (after a compaction gap) gives the same answers
    env.index.rebuild()
    assert env.index.sn_for(mac=A) == "sn-old" and env.index.sn_for(mac=B) is None


def test_linked_since_names_the_new_macs_or_says_it_cannot(env: Env) -> None:
    g = env.index.generation
    assert env.index.linked_since(g) == []
    env.server("sn-1", A, B)
    env.task("sn-2", C)
    assert sorted(env.index.linked_since(g) or []) == [A, B, C]
    g2 = env.index.generation
    assert env.index.linked_since(g2) == []
    env.index.rebuild()                      # a reload: everything may have changed
    assert env.index.linked_since(g2) is None
    g3 = env.index.generation
    for i in range(LINKED_KEPT + 1):         # more links than it keeps
        env.index._on_change(env.keys.server(IDC, f"x-{i}"), None,
                             _kv(env, f"x-{i}", f"52:54:01:00:{i >> 8 & 255:02x}:{i & 255:02x}"),
                             0)
    assert env.index.linked_since(g3) is None
    assert env.index.linked_since(env.index.generation - 1) == ["52:54:01:00:10:00"]


def test_a_malformed_record_drops_the_old_one(env: Env) -> None:
    env.task("sn-1", A)
    env._settle(lambda: env.store.put(env.keys.task(IDC, "sn-1"), b"{not json"))
    assert env.index.sn_for(mac=A) is None and env.index.view("sn-1").task is None


def test_a_change_costs_the_record_not_the_idc(env: Env) -> None:
    """20,000 machines, then 500 changes: each as cheap as in a small IDC."""
    def changes(first: int, n: int) -> float:
        started = time.perf_counter()
        for i in range(first, first + n):
            mac = f"52:54:{i >> 24 & 255:02x}:{i >> 16 & 255:02x}:{i >> 8 & 255:02x}:{i & 255:02x}"
            env.index._on_change(env.keys.server(IDC, f"sn-{i}"), None,
                                 _kv(env, f"sn-{i}", mac), 0)
        return (time.perf_counter() - started) / n

    small = changes(0, 500)
    changes(500, 19_500)
    large = changes(20_000, 500)
    assert env.index.sn_for(mac="52:54:00:00:4e:20") == "sn-20000"
    # the old index rebuilt every lookup table per change: ~40x slower here
    assert large < 5 * small + 50e-6, (small, large)


def _kv(env: Env, sn: str, mac: str) -> KeyValue:
    value = Server(idc=IDC, sn=sn, macs=[mac]).to_json()
    return KeyValue(env.keys.server(IDC, sn), value, 1, 1)

