"""Which managed images a regional node fetches, keeps and evicts, and why a
task waits for one: pure functions of what the node knows.

:mod:`bootsvc.images.sync` carries the plan out (fetches on a thread,
deletes files, writes the node's copy states to etcd).  Inputs are the
catalog records (:class:`lpmos.images.ManagedImage`), the node's local
copies (:class:`LocalCopy`, read from its cache directory), what it knows
of past failures (:class:`Failure`) and the images the IDC's active tasks
need.  No I/O, no clock: ``now`` is passed in.

The cache policy (:func:`decide_sync`):

| local copy of ...                                   | action                          |
| --------------------------------------------------- | ------------------------------- |
| a name with no record (removed by an operator)      | ``remove``: files and state key |
| a record whose sha256 changed (another image)       | ``remove`` the old bytes        |
| a record wanted here, available, not ready          | ``fetch`` (needed-by-task first)|
| ... after a failure, before its retry time          | nothing (stays failed)          |
| ... that does not fit the bound                     | ``evict`` others (below), or    |
|                                                     | ``full``: failed "cache full"   |
| a ready record no longer wanted here                | kept, evicted first (LRU)       |
| a partial copy of a record no longer wanted here    | ``remove``                      |

To make room, evict in this order, least recently used first: ready copies
of records no longer wanted in this IDC (or no longer available); then,
only for an image an active task needs, wanted copies no task needs.  A
copy an active task needs is never evicted, and an image no task needs
never evicts a wanted one (two wanted images that do not fit together
would otherwise evict each other in turn).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from lpmos.images import ManagedImage, NodeImageState
from lpmos.models import Task
from lpmos.states import TaskStatus

#: task states that hold their image on the node (never evicted)
ACTIVE = (TaskStatus.APPROVED, TaskStatus.BOOTING, TaskStatus.INSTALLING)

#: first retry of a failed fetch, doubled per failure up to RETRY_MAX
RETRY_MIN = 60.0
RETRY_MAX = 3600.0


@dataclass(frozen=True)
class LocalCopy:
    """What the node's cache directory holds of one image name.

    ``verified``: role -> sha256 of each file checked and in place;
    ``bytes``: every byte on disk for the name (verified files and partial
    ``.part`` downloads); ``last_used``: when it last became ready or was
    last needed by an active task (node clock)."""

    name: str
    verified: Mapping[str, str] = field(default_factory=dict)
    bytes: int = 0
    last_used: float = 0.0

    def ready_for(self, record: ManagedImage) -> bool:
        """Whether every file of ``record`` is verified here with its digest."""
        return all(self.verified.get(role) == f.sha256
                   for role, f in record.files.items()) and \
            all(role in record.files for role in record.file_roles)

    def stale_for(self, record: ManagedImage) -> bool:
        """Whether it holds a verified file that is not ``record``'s (the
        record was replaced under the same name)."""
        return any(record.files.get(role) is None or record.files[role].sha256 != sha
                   for role, sha in self.verified.items())


@dataclass(frozen=True)
class Failure:
    """A fetch of ``revision`` of the record that failed ``count`` times in a
    row, the last one at ``at``; ``retry`` is False for a failure that
    only a change of the record or of the cache can mend (cache full is
    judged again on every pass instead)."""

    revision: int
    at: float
    count: int = 1
    reason: str = ""
    retry: bool = True

    def retry_at(self) -> float:
        return self.at + min(RETRY_MAX, RETRY_MIN * float(2 ** min(self.count - 1, 30)))


@dataclass(frozen=True)
class Plan:
    """What to do now.  ``fetch``: names in the order to fetch (the worker
    takes the first it is not already busy with); ``evict``: ready copies to
    delete to make room (their records stay); ``remove``: copies (and state
    keys) of records gone or replaced; ``full``: name -> the "cache full"
    reason of a wanted image that cannot fit."""

    fetch: tuple[str, ...] = ()
    evict: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    full: Mapping[str, str] = field(default_factory=dict)


def image_of(record_names: Iterable[str], records: Mapping[str, ManagedImage],
             task: Task) -> str:
    """The managed image a task asks for ("" when none): by ``image``
    name, else by ``os_type`` (and version when given), case-blind, as
    :meth:`lpmos.catalog.Catalog.find` resolves them."""
    if task.image:
        return task.image if task.image in records else ""
    wanted = task.os_type.strip().lower()
    for name in sorted(record_names):
        rec = records[name]
        if wanted in (rec.os_type.lower(), rec.name) and (
                not task.os_version or task.os_version == rec.version):
            return name
    return ""


def needed_images(tasks: Iterable[Task], records: Mapping[str, ManagedImage]) -> set[str]:
    """The managed images the active tasks (approved, booting, installing) need."""
    names = list(records)
    return {name for task in tasks if task.state in ACTIVE
            for name in (image_of(names, records, task),) if name}


def _need(record: ManagedImage, copy: LocalCopy | None) -> int:
    """Bytes still to write for ``record`` (its size less what is on disk;
    an unknown size counts as nothing yet: the fetch stops at the bound)."""
    have = copy.bytes if copy is not None else 0
    return max(0, record.size - have)


def decide_sync(records: Mapping[str, ManagedImage], local: Mapping[str, LocalCopy], *,
                idc: str, capacity: int, needed: set[str],
                failures: Mapping[str, Failure], revisions: Mapping[str, int],
                now: float) -> Plan:
    """The plan for one pass (see the module table).  ``revisions``: each
    record's mod_revision (a failure of an older revision is forgotten);
    ``capacity``: the cache bound in bytes."""
    def wanted(name: str) -> bool:
        rec = records.get(name)
        return rec is not None and rec.offered and rec.wanted_in(idc)

    remove = sorted(name for name, copy in local.items()
                    if name not in records or copy.stale_for(records[name]) or
                    (not wanted(name) and not copy.ready_for(records[name])))
    kept = {name: copy for name, copy in local.items() if name not in remove}
    used = sum(copy.bytes for copy in kept.values())

    todo = []
    for name, rec in records.items():
        if not wanted(name):
            continue
        copy = kept.get(name)
        if copy is not None and copy.ready_for(rec):
            continue
        fail = failures.get(name)
        if fail is not None and fail.revision == revisions.get(name, 0) and fail.count and \
                (not fail.retry or now < fail.retry_at()):
            continue
        todo.append(name)
    # needed by a task first, then the oldest record first (stable by name)
    todo.sort(key=lambda n: (n not in needed, records[n].created_at, n))

    ready = {name for name, copy in kept.items()
             if name in records and copy.ready_for(records[name])}
    unwanted = sorted((n for n in ready if not wanted(n) and n not in needed),
                      key=lambda n: (kept[n].last_used, n))
    spare = sorted((n for n in ready if wanted(n) and n not in needed),
                   key=lambda n: (kept[n].last_used, n))
    evict: list[str] = []
    fetch: list[str] = []
    full: dict[str, str] = {}
    for name in todo:
        rec = records[name]
        need = _need(rec, kept.get(name))
        free = capacity - used
        pool = unwanted + (spare if name in needed else [])
        chosen: list[str] = []
        for victim in pool:
            if free >= need:
                break
            if victim in evict or victim == name:
                continue
            chosen.append(victim)
            free += kept[victim].bytes
        if free < need:
            full[name] = cache_full_reason(need, capacity - used)
            continue
        for victim in chosen:
            evict.append(victim)
            used -= kept[victim].bytes
            for group in (unwanted, spare):
                if victim in group:
                    group.remove(victim)
        used += need          # reserved for it
        fetch.append(name)
    return Plan(tuple(fetch), tuple(evict), tuple(remove), full)


def cache_full_reason(need: int, free: int) -> str:
    return f"cache full: needs {_size(need)}, {_size(max(0, free))} free"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def next_failure(previous: Failure | None, *, revision: int, now: float, reason: str,
                 retry: bool) -> Failure:
    """The failure record after a fetch of ``revision`` failed at ``now``."""
    count = previous.count + 1 if previous is not None and previous.revision == revision else 1
    return Failure(revision=revision, at=now, count=count, reason=reason, retry=retry)


def wait_reason(record: ManagedImage | None, state: NodeImageState | None, *, idc: str,
                node: str) -> str:
    """Why a task for ``record`` waits on ``node`` ("" when it need not:
    the copy is ready, or there is no such managed image and the ordinary
    "not in the catalog" reason applies)."""
    if record is None:
        return ""
    name = record.name
    if not record.offered:
        return f"image {name} is still being uploaded to the control plane"
    if not record.wanted_in(idc):
        return (f"image {name} is not offered in IDC {idc} (it is for "
                f"{', '.join(record.idcs)})")
    if state is None:
        return f"image {name} is queued for fetching on node {node}"
    if state.state == "ready":
        return ""
    return f"image {name} {state.describe(node)}"


@dataclass
class ProgressThrottle:
    """Whether a fetch's progress is worth writing to etcd: at most every
    ``interval`` seconds, or sooner after ``step`` of the total (5 %)."""

    interval: float = 1.0
    step: float = 0.05
    _at: float = float("-inf")
    _bytes: int = 0

    def due(self, done: int, total: int, now: float) -> bool:
        if now - self._at >= self.interval or (
                total > 0 and done - self._bytes >= self.step * total and
                now - self._at >= self.interval / 4):
            self._at, self._bytes = now, done
            return True
        return False
