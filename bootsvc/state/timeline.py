"""The boot timeline of each machine, kept in etcd.

Every stage of a machine's boot this node sees — ProxyDHCP answer, TFTP
file sent, boot script served (which decision and why), install config
fetched, callbacks, agent registration — is recorded with
:meth:`EtcdTimeline.record`, which never blocks on etcd and never raises.
A flush thread writes the entries, coalesced (at most one write per
machine per ``interval``), to ``keys.timeline(idc, sn)``:

    {"sn": SN, "idc": IDC, "updated_at": t,
     "entries": [{"at": t, "stage": str, "node": str, "who": str, "detail": {...}}, ...]}

newest last, at most ``per_machine`` entries (the newest are kept); several
nodes of one IDC merge their entries by a CAS read-modify-write.

``who`` is ``sn:<SN>`` once the machine is identified, else its MAC (DHCP,
TFTP) or ``ip:<address>``.  Entries recorded by MAC or address before the
SN is known wait in memory (bounded, for at most ``hold`` seconds) and are
attached once the MAC resolves to an SN in the machine index (after the
agent registers, or a task names the MAC); an address resolves through a
MAC seen with it in an earlier entry (``detail`` with ``mac`` and ``ip``).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from bootsvc.state.machines import MachineIndex
from lpmos.metrics import Registry
from lpmos.store import Store, StoreError, atomic_update
from lpmos.store.keys import Keys

log = logging.getLogger(__name__)

DETAIL_KEYS_MAX = 16
DETAIL_VALUE_MAX = 200


def _bounded_detail(detail: dict[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for i, (k, v) in enumerate((detail or {}).items()):
        if i >= DETAIL_KEYS_MAX:
            break
        if v is None or isinstance(v, bool | int | float):
            out[str(k)[:32]] = v
        else:
            out[str(k)[:32]] = str(v)[:DETAIL_VALUE_MAX]
    return out


def merge_entries(existing: list[dict[str, Any]], new: list[dict[str, Any]],
                  limit: int) -> list[dict[str, Any]]:
    """Both lists, ordered by time (stable), the newest ``limit`` kept."""
    merged = sorted([*existing, *new], key=lambda e: float(e.get("at", 0.0)))
    return merged[-limit:]


class EtcdTimeline:
    """A :class:`bootsvc.context.TimelineSink` that persists to etcd."""

    def __init__(self, store: Store, keys: Keys, idc: str, machines: MachineIndex,
                 metrics: Registry, *, node: str = "", per_machine: int = 100,
                 interval: float = 1.0, hold: float = 3600.0, max_pending: int = 20000) -> None:
        self.store = store
        self.keys = keys
        self.idc = idc
        self.machines = machines
        self.metrics = metrics
        self.node = node
        self.per_machine = per_machine
        self.interval = interval
        self.hold = hold
        self.max_pending = max_pending
        self._lock = threading.Lock()
        self._pending: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._ip_mac: OrderedDict[str, str] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.gauge("timeline_pending_machines", lambda: float(len(self._pending)),
                      "machines with boot timeline entries not yet written to etcd")

    # -- recording (hot path: no I/O) -------------------------------------------------

    def record(self, who: str, stage: str, detail: dict[str, Any] | None = None) -> None:
        try:
            entry: dict[str, Any] = {"at": time.time(), "stage": str(stage)[:64], "node": self.node,
                     "who": str(who)[:80], "detail": _bounded_detail(detail)}
            mac = entry["detail"].get("mac")
            ip = entry["detail"].get("ip")
            with self._lock:
                if isinstance(mac, str) and isinstance(ip, str) and mac and ip:
                    self._ip_mac[ip] = mac.lower()
                    self._ip_mac.move_to_end(ip)
                    while len(self._ip_mac) > self.max_pending:
                        self._ip_mac.popitem(last=False)
                entries = self._pending.get(entry["who"])
                if entries is None:
                    entries = self._pending[entry["who"]] = deque(maxlen=self.per_machine)
                    while len(self._pending) > self.max_pending:
                        self._pending.popitem(last=False)
                        self.metrics.inc("timeline_dropped_total", reason="too_many_machines")
                entries.append(entry)
        except Exception:  # a timeline must never break a boot
            log.exception("timeline record failed")

    # -- resolving and writing -----------------------------------------------------------

    def _resolve(self, who: str) -> str | None:
        if who.startswith("sn:"):
            return who[3:] or None
        if who.startswith("ip:"):
            mac = self._ip_mac.get(who[3:])
            return self.machines.sn_for(mac=mac) if mac else None
        if who.count(":") == 5:
            return self.machines.sn_for(mac=who.lower())
        mac = self._ip_mac.get(who)
        return self.machines.sn_for(mac=mac) if mac else None

    def flush(self) -> int:
        """Write what can be attached to an SN; returns the number of
        machines written.  Entries that cannot be written stay queued."""
        with self._lock:
            pending, self._pending = self._pending, OrderedDict()
            ip_mac = dict(self._ip_mac)
        outgoing: dict[str, list[dict[str, Any]]] = {}
        keep: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        cutoff = time.time() - self.hold
        for who, entries in pending.items():
            sn = self._resolve_with(who, ip_mac)
            if sn is None:
                fresh = deque((e for e in entries if e["at"] >= cutoff), maxlen=self.per_machine)
                if fresh:
                    keep[who] = fresh
                continue
            outgoing.setdefault(sn, []).extend(entries)
        written = 0
        for sn, batch in outgoing.items():
            try:
                self._write(sn, batch)
                written += 1
            except StoreError as exc:
                self.metrics.inc("timeline_write_failed_total")
                log.debug("timeline of %s not written: %s", sn, exc)
                keep.setdefault("sn:" + sn, deque(maxlen=self.per_machine)).extend(batch)
        if keep:
            with self._lock:
                for who, entries in keep.items():
                    merged = self._pending.get(who)
                    if merged is None:
                        self._pending[who] = entries
                    else:
                        entries.extend(merged)
                        self._pending[who] = entries
        return written

    def _resolve_with(self, who: str, ip_mac: dict[str, str]) -> str | None:
        if who.startswith("ip:") or (who.count(":") != 5 and not who.startswith("sn:")):
            mac = ip_mac.get(who[3:] if who.startswith("ip:") else who)
            return self.machines.sn_for(mac=mac) if mac else None
        return self._resolve(who)

    def _write(self, sn: str, entries: list[dict[str, Any]]) -> None:
        key = self.keys.timeline(self.idc, sn)
        limit = self.per_machine

        def fn(raw: bytes | None) -> bytes:
            existing: list[dict[str, Any]] = []
            if raw:
                try:
                    data = json.loads(raw)
                    if isinstance(data, dict) and isinstance(data.get("entries"), list):
                        existing = [e for e in data["entries"] if isinstance(e, dict)]
                except ValueError:
                    existing = []
            return json.dumps({"sn": sn, "idc": self.idc, "updated_at": time.time(),
                               "entries": merge_entries(existing, entries, limit)},
                              separators=(",", ":")).encode()

        atomic_update(self.store, key, fn, retries=4)
        self.metrics.inc("timeline_writes_total")

    def read(self, sn: str) -> list[dict[str, Any]]:
        """The stored timeline of ``sn`` (a fresh read; for tools and tests)."""
        kv = self.store.get(self.keys.timeline(self.idc, sn))
        if kv is None:
            return []
        data = json.loads(kv.value)
        entries = data.get("entries", []) if isinstance(data, dict) else []
        return [e for e in entries if isinstance(e, dict)]

    # -- the flush thread ----------------------------------------------------------------

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="timeline", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            self.flush()
        except Exception:
            log.exception("final timeline flush failed")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.flush()
            except Exception:
                log.exception("timeline flush failed")
