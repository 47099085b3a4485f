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

What a storm of unknown machines costs: recording is O(1) under a lock;
a flush looks only at the machines recorded since the last one, and
entries that cannot be attached yet are *parked*; parked machines are
looked at again only for the MACs the machine index newly links to an SN
(:meth:`bootsvc.state.machines.MachineIndex.linked_since`), not on every
flush.  Unknown machines write nothing to etcd.  At most ``max_pending``
machines wait in memory: past that the one heard from least recently is
dropped (``timeline_dropped_total{reason="too_many_machines"}``), and a
machine still unknown after ``hold`` seconds is dropped too
(``reason="expired"``).
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
        # recorded since the last flush; then parked (by MAC, or other whos
        # such as ip:ADDRESS), least recently heard from first
        self._pending: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._parked: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._parked_other: OrderedDict[str, deque[dict[str, Any]]] = OrderedDict()
        self._ip_mac: OrderedDict[str, str] = OrderedDict()
        self._generation = getattr(machines, "generation", 0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        metrics.gauge("timeline_pending_machines", self.waiting,
                      "machines with boot timeline entries not yet written to etcd")
        metrics.describe("timeline_writes_total", "boot timeline writes to etcd")
        metrics.describe("timeline_write_failed_total",
                         "boot timeline writes that failed (kept for the next try)")
        metrics.describe("timeline_dropped_total", "boot timeline entries dropped, by reason")

    def waiting(self) -> float:
        """Machines whose entries wait in memory (new or parked)."""
        with self._lock:
            return float(len(self._pending) + len(self._parked) + len(self._parked_other))

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
                    self._cap()
                entries.append(entry)
        except Exception:  # a timeline must never break a boot
            log.exception("timeline record failed")

    def _cap(self) -> None:
        """At most ``max_pending`` machines wait: drop the least recently
        heard from, parked ones first (under the lock)."""
        while len(self._pending) + len(self._parked) + len(self._parked_other) > \
                self.max_pending:
            for queue in (self._parked, self._parked_other, self._pending):
                if queue:
                    queue.popitem(last=False)
                    break
            self.metrics.inc("timeline_dropped_total", reason="too_many_machines")

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
        machines written.  Entries that cannot be written stay queued
        (parked when their machine is not known yet)."""
        with self._lock:
            pending, self._pending = self._pending, OrderedDict()
            revived = self._revive()
            work = [*revived, *pending.items()]
            # the address -> MAC links these whos need (not the whole map)
            ip_mac = {key: mac for who, _ in work if who.count(":") != 5
                      and not who.startswith("sn:")
                      for key in (who[3:] if who.startswith("ip:") else who,)
                      if (mac := self._ip_mac.get(key)) is not None}
        outgoing: dict[str, list[dict[str, Any]]] = {}
        unresolved: list[tuple[str, deque[dict[str, Any]]]] = []
        for who, entries in work:
            sn = self._resolve_with(who, ip_mac)
            if sn is None:
                unresolved.append((who, entries))
            else:
                outgoing.setdefault(sn, []).extend(entries)
        failed: list[tuple[str, list[dict[str, Any]]]] = []
        written = 0
        for sn, batch in outgoing.items():
            batch.sort(key=lambda e: float(e["at"]))
            try:
                self._write(sn, batch)
                written += 1
            except StoreError as exc:
                self.metrics.inc("timeline_write_failed_total")
                log.debug("timeline of %s not written: %s", sn, exc)
                failed.append(("sn:" + sn, batch))
        with self._lock:
            for who, batch in failed:            # the next flush tries again
                newer = self._pending.get(who, ())
                self._pending[who] = deque([*batch, *newer], maxlen=self.per_machine)
            for who, entries in unresolved:
                self._park(who, entries)
            self._expire(time.time() - self.hold)
            self._cap()
        return written

    def _park(self, who: str, entries: deque[dict[str, Any]]) -> None:
        """Keep ``entries`` of a machine not known yet (under the lock)."""
        parked = self._parked if who.count(":") == 5 else self._parked_other
        held = parked.pop(who, None)
        if held is not None:
            held.extend(entries)
            entries = held
        parked[who] = entries                   # now the most recently heard from

    def _revive(self) -> list[tuple[str, deque[dict[str, Any]]]]:
        """Parked machines whose MAC the index has linked to an SN since the
        last flush, taken out of the parking (under the lock).  Cost: the
        new links, plus the few non-MAC whos; all parked machines only when
        the index cannot say what changed."""
        generation = getattr(self.machines, "generation", None)
        if generation is None or generation == self._generation:
            return []
        linked = self.machines.linked_since(self._generation)
        self._generation = generation
        out: list[tuple[str, deque[dict[str, Any]]]] = []
        if linked is None:
            out.extend(self._parked.items())
            self._parked = OrderedDict()
        else:
            for mac in linked:
                entries = self._parked.pop(mac, None)
                if entries is not None:
                    out.append((mac, entries))
        out.extend(self._parked_other.items())
        self._parked_other = OrderedDict()
        return out

    def _expire(self, cutoff: float) -> None:
        """Drop parked machines not heard from since ``cutoff`` (under the lock)."""
        for parked in (self._parked, self._parked_other):
            while parked:
                _who, entries = next(iter(parked.items()))
                if entries and float(entries[-1]["at"]) >= cutoff:
                    break
                parked.popitem(last=False)
                self.metrics.inc("timeline_dropped_total", reason="expired")

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
