"""The regional node's view of its IDC: an index over the IDC watch cache.

Boot decisions are made from this index (no etcd round trip on the hot
path).  It follows the :class:`lpmos.store.cache.WatchCache` of
``/os/{idc}/`` and keeps lookups by MAC, UUID and SN of tasks and servers.
Only destructive answers go back to etcd (a fresh read and a CAS claim).
"""

from __future__ import annotations

import logging
import threading
from collections import deque

from bootsvc.policy.machine import MachineView
from lpmos.models import Server, Task, ValidationError
from lpmos.store import KeyValue
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)

#: MAC links remembered for :meth:`MachineIndex.linked_since`
LINKED_KEPT = 4096


class MachineIndex:
    """Lookups by MAC, UUID and SN over the IDC's tasks and servers.

    A change costs O(the changed record's MACs), not O(the IDC): a boot
    storm of thousands of machines changes records thousands of times a
    second.  A MAC named by a task maps to that task's SN over any server
    that lists it; among servers (or tasks) that share a MAC or UUID, the
    one stored last wins, and removing it hands the MAC back to the others.
    :attr:`generation` grows with every change (readers that keep
    unresolved work re-check it only when it moved).
    """

    def __init__(self, cache: WatchCache, keys: Keys, idc: str) -> None:
        self.cache = cache
        self.keys = keys
        self.idc = idc
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[Task, int]] = {}
        self._servers: dict[str, Server] = {}
        # key -> the SNs naming it, oldest first (dict as an ordered set)
        self._task_macs: dict[str, dict[str, None]] = {}
        self._server_macs: dict[str, dict[str, None]] = {}
        self._uuids: dict[str, dict[str, None]] = {}
        self.generation = 0
        # MACs linked to an SN, with the generation that linked them (bounded;
        # :meth:`linked_since` says when a reader fell further behind)
        self._linked: deque[tuple[int, str]] = deque(maxlen=LINKED_KEPT)
        self._linked_floor = 0
        cache.add_listener(self._on_change, on_reset=self.rebuild)
        self.rebuild()

    # -- maintenance (cache thread)
    def rebuild(self) -> None:
        tasks: dict[str, tuple[Task, int]] = {}
        servers: dict[str, Server] = {}
        for kv in self.cache.items(self.keys.idc(self.idc)):
            self._load(kv, tasks, servers)
        with self._lock:
            self.generation += 1
            self._tasks, self._servers = {}, {}
            self._task_macs, self._server_macs, self._uuids = {}, {}, {}
            for sn, server in servers.items():
                self._put_server(sn, server)
            for sn, entry in tasks.items():
                self._put_task(sn, entry)
            self._linked.clear()
            self._linked_floor = self.generation

    def _load(self, kv: KeyValue, tasks: dict[str, tuple[Task, int]],
              servers: dict[str, Server]) -> None:
        parsed = self.keys.parse(kv.key)
        if parsed is None or parsed.idc != self.idc:
            return
        try:
            if parsed.kind == "task":
                tasks[parsed.name] = (Task.from_json(kv.value), kv.mod_revision)
            elif parsed.kind == "server":
                servers[parsed.name] = Server.from_json(kv.value)
        except ValidationError as exc:
            log.warning("ignoring malformed %s: %s", kv.key, exc)

    # the four below run under self._lock
    def _put_task(self, sn: str, entry: tuple[Task, int]) -> None:
        self._drop_task(sn)
        self._tasks[sn] = entry
        _link(self._task_macs, entry[0].mac, sn)
        self._linked.append((self.generation, entry[0].mac))

    def _drop_task(self, sn: str) -> None:
        old = self._tasks.pop(sn, None)
        if old is not None:
            _unlink(self._task_macs, old[0].mac, sn)

    def _put_server(self, sn: str, server: Server) -> None:
        self._drop_server(sn)
        self._servers[sn] = server
        for mac in server.macs:
            _link(self._server_macs, mac, sn)
            self._linked.append((self.generation, mac))
        if server.uuid:
            _link(self._uuids, server.uuid, sn)

    def _drop_server(self, sn: str) -> None:
        old = self._servers.pop(sn, None)
        if old is None:
            return
        for mac in old.macs:
            _unlink(self._server_macs, mac, sn)
        if old.uuid:
            _unlink(self._uuids, old.uuid, sn)

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.keys.parse(key)
        if parsed is None or parsed.idc != self.idc or parsed.kind not in ("task", "server"):
            return
        tasks: dict[str, tuple[Task, int]] = {}
        servers: dict[str, Server] = {}
        if new is not None:
            self._load(new, tasks, servers)     # parsed outside the lock
        with self._lock:
            self.generation += 1
            if parsed.kind == "task":
                if parsed.name in tasks:
                    self._put_task(parsed.name, tasks[parsed.name])
                else:                           # deleted, or malformed now
                    self._drop_task(parsed.name)
            elif parsed.name in servers:
                self._put_server(parsed.name, servers[parsed.name])
            else:
                self._drop_server(parsed.name)

    def linked_since(self, generation: int) -> list[str] | None:
        """MACs linked to an SN after ``generation`` (some may since have
        been unlinked again), or ``None`` when the index cannot say (a
        rebuild since, or more links than it keeps): then look everything
        up again."""
        with self._lock:
            if generation >= self.generation:
                return []
            if generation < self._linked_floor or (
                    len(self._linked) == self._linked.maxlen
                    and self._linked[0][0] > generation):
                return None
            return [mac for gen, mac in self._linked if gen > generation]

    # -- lookups (any thread)
    def sn_for(self, mac: str | None = None, uuid: str | None = None,
               serial: str | None = None) -> str | None:
        """The SN of a machine by MAC, then UUID, then serial."""
        with self._lock:
            if mac:
                sns = self._task_macs.get(mac) or self._server_macs.get(mac)
                if sns:
                    return next(reversed(sns))
            if uuid and uuid in self._uuids:
                return next(reversed(self._uuids[uuid]))
            if serial and (serial in self._tasks or serial in self._servers):
                return serial
        return None

    def view(self, sn: str) -> MachineView:
        with self._lock:
            task = self._tasks.get(sn)
            return MachineView(sn, task[0] if task else None, task[1] if task else 0,
                               self._servers.get(sn))

    def lookup(self, mac: str | None = None, uuid: str | None = None,
               serial: str | None = None) -> MachineView | None:
        sn = self.sn_for(mac, uuid, serial)
        return self.view(sn) if sn else None

    def known_mac(self, mac: str) -> bool:
        with self._lock:
            return mac in self._task_macs or mac in self._server_macs

    def tasks(self) -> list[tuple[Task, int]]:
        with self._lock:
            return list(self._tasks.values())


def _link(index: dict[str, dict[str, None]], key: str, sn: str) -> None:
    """``sn`` names ``key``, as the newest of those that do."""
    sns = index.setdefault(key, {})
    sns.pop(sn, None)
    sns[sn] = None


def _unlink(index: dict[str, dict[str, None]], key: str, sn: str) -> None:
    sns = index.get(key)
    if sns is not None:
        sns.pop(sn, None)
        if not sns:
            del index[key]
