"""The regional node's view of its IDC: an index over the IDC watch cache.

Boot decisions are made from this index (no etcd round trip on the hot
path).  It follows the :class:`lpmos.store.cache.WatchCache` of
``/os/{idc}/`` and keeps lookups by MAC, UUID and SN of tasks and servers.
Only destructive answers go back to etcd (a fresh read and a CAS claim).
"""

from __future__ import annotations

import logging
import threading

from bootsvc.policy.machine import MachineView
from lpmos.models import Server, Task, ValidationError
from lpmos.store import KeyValue
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)


class MachineIndex:
    def __init__(self, cache: WatchCache, keys: Keys, idc: str) -> None:
        self.cache = cache
        self.keys = keys
        self.idc = idc
        self._lock = threading.Lock()
        self._tasks: dict[str, tuple[Task, int]] = {}
        self._servers: dict[str, Server] = {}
        self._by_mac: dict[str, str] = {}      # mac -> sn (tasks win over servers)
        self._by_uuid: dict[str, str] = {}
        cache.add_listener(self._on_change, on_reset=self.rebuild)
        self.rebuild()

    # -- maintenance (cache thread)
    def rebuild(self) -> None:
        tasks: dict[str, tuple[Task, int]] = {}
        servers: dict[str, Server] = {}
        for kv in self.cache.items(self.keys.idc(self.idc)):
            self._load(kv, tasks, servers)
        with self._lock:
            self._tasks, self._servers = tasks, servers
            self._reindex()

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

    def _reindex(self) -> None:
        by_mac: dict[str, str] = {}
        by_uuid: dict[str, str] = {}
        for sn, server in self._servers.items():
            for mac in server.macs:
                by_mac[mac] = sn
            if server.uuid:
                by_uuid[server.uuid] = sn
        for sn, (task, _rev) in self._tasks.items():
            by_mac[task.mac] = sn
        self._by_mac, self._by_uuid = by_mac, by_uuid

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        parsed = self.keys.parse(key)
        if parsed is None or parsed.idc != self.idc or parsed.kind not in ("task", "server"):
            return
        with self._lock:
            tasks, servers = dict(self._tasks), dict(self._servers)
            if parsed.kind == "task":
                tasks.pop(parsed.name, None)
            else:
                servers.pop(parsed.name, None)
            if new is not None:
                self._load(new, tasks, servers)
            self._tasks, self._servers = tasks, servers
            self._reindex()

    # -- lookups (any thread)
    def sn_for(self, mac: str | None = None, uuid: str | None = None,
               serial: str | None = None) -> str | None:
        """The SN of a machine by MAC, then UUID, then serial."""
        with self._lock:
            if mac and mac in self._by_mac:
                return self._by_mac[mac]
            if uuid and uuid in self._by_uuid:
                return self._by_uuid[uuid]
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
            return mac in self._by_mac

    def tasks(self) -> list[tuple[Task, int]]:
        with self._lock:
            return list(self._tasks.values())
