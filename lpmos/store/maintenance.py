"""Keeping etcd healthy: its alarms, its database size, defragmentation.

History is compacted by etcd itself (``--auto-compaction-*``: the embedded
etcd gets them from :class:`lpmos.store.embedded.EtcdOptions`, a cluster
from its operator).  Compaction frees pages inside the backend file but
never shrinks it; only a defragmentation does, and etcd's quota
(``--quota-backend-bytes``) counts the whole file.  So each long-running
service runs one :class:`EtcdMaintenance`, which every ``interval``
seconds (jittered):

* reads the alarms (cluster-wide) and the Status of its member (database
  size and the part in use), for ``/healthz`` (:meth:`EtcdMaintenance.reasons`)
  and ``/metrics`` (``etcd_alarm{alarm="nospace"}``, ``etcd_db_size_bytes``,
  ``etcd_db_size_in_use_bytes``, ``etcd_defragmentations_total``);
* with ``defragment`` (the embedded etcd only; a cluster's operator
  schedules its own, member by member), defragments when it pays
  (:func:`decide_defragment`), and after a NOSPACE alarm disarms it once
  the database is back under :data:`DISARM_BELOW` of the quota.

A NOSPACE alarm makes etcd refuse writes (:class:`lpmos.store.NoSpace`);
reads and watches keep working, so a regional node keeps answering
non-destructive boots from its cache while its ``/healthz`` says why it is
degraded.  Several services sharing one embedded etcd each run the loop;
a second defragmentation right after the first finds nothing to gain.
"""

from __future__ import annotations

import functools
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from lpmos.metrics import Registry
from lpmos.store import StoreError
from lpmos.store.etcd import Alarm, MemberStatus

log = logging.getLogger(__name__)

#: etcd's default backend quota (``--quota-backend-bytes 0``)
ETCD_DEFAULT_QUOTA = 2 * 1024**3
#: a NOSPACE alarm is disarmed (embedded etcd) once the file is below this
#: fraction of the quota, so it does not trip again with the next write
DISARM_BELOW = 0.8
#: the alarms every /metrics shows, 0 or 1 (etcd's AlarmType names)
KNOWN_ALARMS = ("NOSPACE", "CORRUPT")


class MaintainedStore(Protocol):
    """What maintenance needs of a store (:class:`lpmos.store.etcd.EtcdStore`)."""

    def status(self) -> MemberStatus: ...

    def alarms(self) -> list[Alarm]: ...

    def defragment(self, timeout: float = 60.0) -> None: ...

    def disarm(self, alarm: Alarm) -> None: ...


@dataclass(frozen=True)
class DefragPolicy:
    """When a defragmentation pays: at least ``min_free_bytes`` and at
    least ``min_free_ratio`` of the file are free pages.  It blocks the
    member while it copies the live pages (about a second per few hundred
    MB), so small gains are not worth it.

    Under a NOSPACE alarm the size in use cannot be trusted: bbolt counts
    the pages a compaction freed as in use until the next write commits,
    and etcd then refuses writes.  Writes fail anyway, so a defragmentation
    costs nothing there; it is tried every ``nospace_retry`` seconds (etcd's
    compactor frees more history in between)."""

    min_free_bytes: int = 64 * 1024**2
    min_free_ratio: float = 0.5
    nospace_retry: float = 60.0


def decide_defragment(status: MemberStatus, policy: DefragPolicy, *, nospace: bool,
                      since_last: float) -> bool:
    """Whether to defragment the member that answered ``status`` (pure);
    ``since_last``: seconds since this process last defragmented it."""
    if nospace:
        return since_last >= policy.nospace_retry
    if status.db_size <= 0 or status.db_size_in_use <= 0:
        return False      # an etcd too old to report the size in use: never guess
    free = status.db_size - status.db_size_in_use
    return free >= policy.min_free_bytes and free >= policy.min_free_ratio * status.db_size


@dataclass(frozen=True)
class Health:
    """The last check: alarms raised, the member's sizes, or why it failed."""

    checked_at: float = 0.0          # time.monotonic(); 0: never
    alarms: tuple[Alarm, ...] = ()
    status: MemberStatus | None = None
    error: str = ""


@dataclass
class _Counts:
    defragmentations: int = 0
    disarmed: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class EtcdMaintenance:
    def __init__(
        self,
        store: MaintainedStore,
        metrics: Registry | None = None,
        *,
        defragment: bool = False,
        quota_bytes: int = 0,
        interval: float = 10.0,
        policy: DefragPolicy | None = None,
        name: str = "etcd-maintenance",
    ) -> None:
        """``defragment``: this process may defragment and disarm (the
        embedded etcd); ``quota_bytes``: its ``--quota-backend-bytes`` (0:
        etcd's default)."""
        self.store = store
        self.defragment = defragment
        self.quota_bytes = quota_bytes or ETCD_DEFAULT_QUOTA
        self.interval = interval
        self.policy = policy or DefragPolicy()
        self.name = name
        self.health = Health()
        self.counts = _Counts()
        self._lock = threading.Lock()      # one check at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._metrics: Registry | None = None
        self._defragmented_at = -math.inf    # time.monotonic()
        if metrics is not None:
            self.describe(metrics)

    def describe(self, m: Registry) -> None:
        """Export the alarms and sizes on ``m`` (a service's registry)."""
        self._metrics = m
        m.describe("etcd_defragmentations_total",
                   "defragmentations of the embedded etcd done by this process")
        for alarm in KNOWN_ALARMS:
            m.gauge("etcd_alarm", functools.partial(self.alarm_level, alarm),
                    "1 while etcd has this alarm raised (NOSPACE: the backend quota is "
                    "full and writes are refused)", alarm=alarm.lower())
        m.gauge("etcd_db_size_bytes", lambda: float(self._size("db_size")),
                "size of the etcd backend file of the member this process talks to")
        m.gauge("etcd_db_size_in_use_bytes", lambda: float(self._size("db_size_in_use")),
                "part of the etcd backend file holding live data (the rest is reclaimed "
                "by defragmentation)")
        m.gauge("etcd_maintenance_check_age_seconds", self._age,
                "seconds since etcd's alarms and sizes were last read")

    def _size(self, name: str) -> int:
        status = self.health.status
        if status is None:
            raise LookupError("not checked yet")   # no sample rather than a false 0
        return int(getattr(status, name))

    def _age(self) -> float:
        if not self.health.checked_at:
            raise LookupError("not checked yet")
        return time.monotonic() - self.health.checked_at

    # -- reading ------------------------------------------------------------------

    def alarm_raised(self, name: str) -> bool:
        return any(a.name == name for a in self.health.alarms)

    def alarm_level(self, name: str) -> float:
        """1.0 while alarm ``name`` is raised, else 0.0 (the metric)."""
        return 1.0 if self.alarm_raised(name) else 0.0

    def reasons(self) -> list[str]:
        """Why the store makes this service degraded, one sentence each
        (empty when it does not).  An unreachable etcd is not reported here:
        the services judge that from their watch caches."""
        out = []
        for alarm in self.health.alarms:
            if alarm.name == "NOSPACE":
                status = self.health.status
                size = f" (database {status.db_size / 2**20:.1f} MiB)" if status else ""
                out.append(f"etcd alarm NOSPACE on member {alarm.member_id:x}{size}: the "
                           "backend quota is full and etcd refuses every write (no installs, "
                           "progress spooled); compact, defragment, then disarm the alarm")
            else:
                out.append(f"etcd alarm {alarm.name} on member {alarm.member_id:x}")
        return out

    # -- checking -----------------------------------------------------------------

    def check(self) -> Health:
        """One pass: read alarms and status; defragment and disarm when
        allowed and it pays.  Never raises: a failure is recorded in
        ``health.error`` and the previous alarms are kept (an etcd that does
        not answer has not cleared its alarm)."""
        with self._lock:
            try:
                alarms = tuple(self.store.alarms())
                status = self.store.status()
                if self.defragment:
                    alarms, status = self._maintain(alarms, status)
            except StoreError as exc:
                what = type(exc).__name__
                self.counts.errors[what] = self.counts.errors.get(what, 0) + 1
                self.health = Health(time.monotonic(), self.health.alarms,
                                     self.health.status, str(exc))
                return self.health
            if alarms and not self.health.alarms:
                log.error("%s: %s", self.name, "; ".join(
                    f"etcd alarm {a.name} on member {a.member_id:x}" for a in alarms))
            elif self.health.alarms and not alarms:
                log.info("%s: etcd alarms cleared", self.name)
            self.health = Health(time.monotonic(), alarms, status)
            return self.health

    def _maintain(self, alarms: tuple[Alarm, ...], status: MemberStatus
                  ) -> tuple[tuple[Alarm, ...], MemberStatus]:
        nospace = any(a.name == "NOSPACE" for a in alarms)
        started = time.monotonic()
        if decide_defragment(status, self.policy, nospace=nospace,
                             since_last=started - self._defragmented_at):
            self._defragmented_at = started
            self.store.defragment()
            self.counts.defragmentations += 1
            if self._metrics is not None:
                self._metrics.inc("etcd_defragmentations_total")
            after = self.store.status()
            log.info("%s: defragmented etcd member %x: %.1f -> %.1f MiB in %.2f s", self.name,
                     status.member_id, status.db_size / 2**20, after.db_size / 2**20,
                     time.monotonic() - started)
            status = after
        if nospace and status.db_size < DISARM_BELOW * self.quota_bytes:
            for alarm in alarms:
                if alarm.name == "NOSPACE":
                    self.store.disarm(alarm)
                    self.counts.disarmed += 1
                    log.warning("%s: disarmed NOSPACE on member %x: the database is %.1f MiB "
                                "of a %.1f MiB quota", self.name, alarm.member_id,
                                status.db_size / 2**20, self.quota_bytes / 2**20)
            alarms = tuple(self.store.alarms())
        return alarms, status

    # -- running ------------------------------------------------------------------

    def start(self) -> EtcdMaintenance:
        """Check now (so /healthz knows from the start), then every
        ``interval`` seconds, jittered, in a daemon thread."""
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.check()
            self._stop.wait(random.uniform(0.8, 1.2) * self.interval)
