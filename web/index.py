"""The control plane's in-memory view of etcd: one watch, indexed for the API.

:class:`web.console_cache.ConsoleCache` is the process's single watch cache
(everything but the audit records).  :class:`ConsoleIndex` follows it and
keeps what the API lists need, so listing, filtering and paging 100,000
tasks never touches etcd:

* tasks by ``(idc, sn)``, plus three sorted lists of ``(-created_at, idc,
  sn)`` — all tasks, per status and per IDC — so a filtered page starts
  with a binary search at the cursor and stops after ``limit`` matches;
* counters per ``(idc, status)`` for the stats panel and list totals;
* servers, agent liveness (machine lease keys), regional nodes and task
  templates.

What a row shows of each record, and the stats' numbers, are the pure
functions of :mod:`web.summaries`.

Writers (the API) use :class:`lpmos.tasks.TaskService` against etcd and may
wait for the cache to reach the revision they wrote
(:meth:`WatchCache.wait_for_revision`) to read their own writes.
"""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from lpmos.images import ManagedImage, NodeImageState
from lpmos.models import Server, Task, ValidationError
from lpmos.states import ACTIVE
from lpmos.store import KeyValue
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys, ParsedKey
from web.console_cache import ConsoleCache
from web.summaries import (
    SortKey,
    TaskEntry,
    diff_summary,
    node_view,
    server_haystack,
    server_summary,
    sort_key,
    task_haystack,
    task_stats,
    task_summary,
)

#: ConsoleCache and task_summary are imported from here by the app and the
#: API blueprints
__all__ = ["ConsoleCache", "ConsoleIndex", "Listener", "task_summary"]

log = logging.getLogger(__name__)

Listener = Callable[[str, dict[str, Any]], None]


class ConsoleIndex:
    """Indexes over :class:`ConsoleCache`; thread-safe readers, one writer
    (the cache thread).  ``subscribe(fn)`` gets ``fn(kind, message)`` for
    every change after the index is updated, and ``fn("reset", {})``
    after a full reload."""

    def __init__(self, cache: WatchCache, keys: Keys) -> None:
        self.cache = cache
        self.keys = keys
        self._lock = threading.RLock()
        self._tasks: dict[tuple[str, str], TaskEntry] = {}
        self._order: list[SortKey] = []
        self._by_status: dict[str, list[SortKey]] = {}
        self._by_idc: dict[str, list[SortKey]] = {}
        self._counts: Counter[tuple[str, str]] = Counter()
        self._servers: dict[tuple[str, str], tuple[Server, int, str]] = {}
        self._server_order: list[tuple[str, str]] = []
        self._online: set[tuple[str, str]] = set()
        self._nodes: dict[tuple[str, str], tuple[dict[str, Any], int]] = {}
        self._templates: dict[str, tuple[dict[str, Any], int]] = {}
        #: managed images (``/os/images/{name}``) and the nodes' copies of them
        self._images: dict[str, tuple[ManagedImage, int]] = {}
        self._node_images: dict[tuple[str, str, str], NodeImageState] = {}
        #: moves whenever a managed image record changes (catalog memos key on it)
        self.images_generation = 0
        self._subscribers: list[Listener] = []
        self._stats_memo: tuple[float, dict[str, Any]] | None = None
        self.malformed = 0
        cache.add_listener(self._on_change, on_reset=self.rebuild)
        self.rebuild()

    def subscribe(self, fn: Listener) -> None:
        self._subscribers.append(fn)

    # -- maintenance (cache thread) ---------------------------------------------

    def rebuild(self) -> None:
        with self._lock:
            self._tasks.clear()
            self._counts.clear()
            self._servers.clear()
            self._online.clear()
            self._nodes.clear()
            self._templates.clear()
            self._images.clear()
            self._node_images.clear()
            for kv in self.cache.items():
                self._load(kv, incremental=False)
            self.images_generation += 1
            self._order = sorted(e.sort for e in self._tasks.values())
            self._by_status = {}
            self._by_idc = {}
            for entry in self._tasks.values():
                self._by_status.setdefault(entry.task.status, []).append(entry.sort)
                self._by_idc.setdefault(entry.task.idc, []).append(entry.sort)
            for lst in (*self._by_status.values(), *self._by_idc.values()):
                lst.sort()
            self._server_order = sorted(self._servers)
            self._stats_memo = None
        for fn in self._subscribers:
            fn("reset", {"revision": self.cache.revision})

    def _load(self, kv: KeyValue, *, incremental: bool) -> None:
        parsed = self.keys.parse(kv.key)
        try:
            if parsed is not None and parsed.kind == "task":
                task = Task.from_json(kv.value)
                self._put_task(task, kv.mod_revision, incremental)
            elif parsed is not None and parsed.kind == "server":
                server = Server.from_json(kv.value)
                self._servers[(server.idc, server.sn)] = (server, kv.mod_revision,
                                                          server_haystack(server))
            elif parsed is not None and parsed.kind == "lease":
                self._online.add((parsed.idc, parsed.name))
            elif parsed is not None and parsed.kind == "node":
                data = json.loads(kv.value)
                self._nodes[(parsed.idc, parsed.name)] = (data if isinstance(data, dict)
                                                          else {}, kv.mod_revision)
            elif parsed is not None and parsed.kind == "image":
                self._images[parsed.name] = (ManagedImage.from_json(kv.value), kv.mod_revision)
            elif parsed is not None and parsed.kind == "node_image":
                node, _, name = parsed.name.partition("/")
                self._node_images[(name, parsed.idc, node)] = NodeImageState.from_json(kv.value)
            elif kv.key.startswith(self.keys.templates()):
                data = json.loads(kv.value)
                if isinstance(data, dict):
                    self._templates[kv.key[len(self.keys.templates()):]] = (data,
                                                                            kv.mod_revision)
        except (ValidationError, ValueError, TypeError) as exc:
            self.malformed += 1
            log.warning("ignoring malformed %s: %s", kv.key, exc)

    def _put_task(self, task: Task, revision: int, incremental: bool) -> None:
        ident = (task.idc, task.sn)
        if incremental:
            self._drop_task(ident)
        entry = TaskEntry(task, revision, sort_key(task), task_haystack(task))
        self._tasks[ident] = entry
        self._counts[(task.idc, task.status)] += 1
        if incremental:
            bisect.insort(self._order, entry.sort)
            bisect.insort(self._by_status.setdefault(task.status, []), entry.sort)
            bisect.insort(self._by_idc.setdefault(task.idc, []), entry.sort)

    def _drop_task(self, ident: tuple[str, str]) -> None:
        old = self._tasks.pop(ident, None)
        if old is None:
            return
        self._counts[(old.task.idc, old.task.status)] -= 1
        if self._counts[(old.task.idc, old.task.status)] <= 0:
            del self._counts[(old.task.idc, old.task.status)]
        for lst in (self._order, self._by_status.get(old.task.status, []),
                    self._by_idc.get(old.task.idc, [])):
            i = bisect.bisect_left(lst, old.sort)
            if i < len(lst) and lst[i] == old.sort:
                del lst[i]

    def _on_change(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        """Apply one change of the cache to the indexes, then hand the
        subscribers ``(kind, message)`` (nobody, for a key no list shows)."""
        parsed = self.keys.parse(key)
        with self._lock:
            self._stats_memo = None
            kind, message = self._apply_change(key, parsed, new)
        if message is not None:
            message["rev"] = revision
            for fn in self._subscribers:
                fn(kind, message)

    def _apply_change(self, key: str, parsed: ParsedKey | None, new: KeyValue | None
                      ) -> tuple[str, dict[str, Any] | None]:
        """The kind of the change and its message (``None``: nothing to tell)."""
        if parsed is not None and parsed.kind == "task":
            return "task", self._task_changed(parsed, new)
        if parsed is not None and parsed.kind == "server":
            return "server", self._server_changed(parsed, new)
        if parsed is not None and parsed.kind == "lease":
            ident = (parsed.idc, parsed.name)
            if new is None:
                self._online.discard(ident)
            else:
                self._online.add(ident)
            return "online", {"idc": parsed.idc, "sn": parsed.name, "online": new is not None}
        if parsed is not None and parsed.kind == "node":
            if new is None:
                self._nodes.pop((parsed.idc, parsed.name), None)
            else:
                self._load(new, incremental=False)
            return "node", {"op": "del" if new is None else "put", "idc": parsed.idc,
                            "name": parsed.name}
        if parsed is not None and parsed.kind in ("image", "node_image"):
            name = parsed.name
            if parsed.kind == "node_image":
                node, _, name = parsed.name.partition("/")
                if new is None:
                    self._node_images.pop((name, parsed.idc, node), None)
            elif new is None:
                self._images.pop(name, None)
            if new is not None:
                self._load(new, incremental=False)
            if parsed.kind == "image":
                self.images_generation += 1     # last: a reader that sees it sees the change
            return "image", {"op": "del" if new is None else "put", "name": name}
        if key.startswith(self.keys.templates()):
            name = key[len(self.keys.templates()):]
            if new is None:
                self._templates.pop(name, None)
            else:
                self._load(new, incremental=False)
            return "template", {"op": "del" if new is None else "put", "name": name}
        if parsed is not None and parsed.kind == "timeline":
            return "timeline", {"idc": parsed.idc, "sn": parsed.name}
        return "", None

    def _task_changed(self, parsed: ParsedKey, new: KeyValue | None) -> dict[str, Any] | None:
        """A task put or deleted; a put carries only the fields that changed."""
        ident = (parsed.idc, parsed.name)
        if new is None:
            self._drop_task(ident)
            return {"op": "del", "idc": parsed.idc, "sn": parsed.name}
        before = self._tasks.get(ident)
        before_summary = task_summary(before.task, before.revision) if before else None
        self._load(new, incremental=True)
        entry = self._tasks.get(ident)
        if entry is None:
            return None
        return {"op": "put", "idc": parsed.idc, "sn": parsed.name,
                "task": diff_summary(before_summary, task_summary(entry.task, entry.revision))}

    def _server_changed(self, parsed: ParsedKey, new: KeyValue | None) -> dict[str, Any] | None:
        """A server put or deleted, kept in ``_server_order``."""
        ident = (parsed.idc, parsed.name)
        if new is None:
            self._servers.pop(ident, None)
            i = bisect.bisect_left(self._server_order, ident)
            if i < len(self._server_order) and self._server_order[i] == ident:
                del self._server_order[i]
            return {"op": "del", "idc": parsed.idc, "sn": parsed.name}
        existed = ident in self._servers
        self._load(new, incremental=False)
        if not existed and ident in self._servers:
            bisect.insort(self._server_order, ident)
        got = self._servers.get(ident)
        if got is None:
            return None
        return {"op": "put", "idc": parsed.idc, "sn": parsed.name,
                "server": server_summary(got[0], got[1], ident in self._online)}

    # -- tasks ------------------------------------------------------------------

    def task(self, idc: str, sn: str) -> TaskEntry | None:
        with self._lock:
            return self._tasks.get((idc, sn))

    def query_tasks(self, *, idc: str = "", status: Sequence[str] = (), q: str = "",
                    after: SortKey | None = None, limit: int = 50
                    ) -> tuple[list[TaskEntry], SortKey | None, int | None]:
        """One page of tasks matching every filter, newest first.

        Returns ``(entries, next_after, total)``: ``next_after`` is the
        cursor of the next page (``None`` on the last page) and ``total`` the
        number of matches when it is known without scanning (no text query).
        """
        needle = q.strip().lower()
        statuses = set(status)
        with self._lock:
            if len(statuses) == 1:
                base = self._by_status.get(next(iter(statuses)), [])
            elif idc:
                base = self._by_idc.get(idc, [])
            else:
                base = self._order
            start = bisect.bisect_right(base, after) if after is not None else 0
            found: list[TaskEntry] = []
            more = False
            for sk in _iter_from(base, start):
                entry = self._tasks.get((sk[1], sk[2]))
                if entry is None:
                    continue
                if idc and entry.task.idc != idc:
                    continue
                if statuses and entry.task.status not in statuses:
                    continue
                if needle and needle not in entry.haystack:
                    continue
                if len(found) == limit:
                    more = True
                    break
                found.append(entry)
            total: int | None = None
            if not needle:
                total = sum(n for (i, s), n in self._counts.items()
                            if (not idc or i == idc) and (not statuses or s in statuses))
        return found, (found[-1].sort if more and found else None), total

    def task_count(self) -> int:
        with self._lock:
            return len(self._tasks)

    # -- servers ----------------------------------------------------------------

    def server(self, idc: str, sn: str) -> tuple[Server, int, bool] | None:
        with self._lock:
            got = self._servers.get((idc, sn))
            if got is None:
                return None
            return got[0], got[1], (idc, sn) in self._online

    def online(self, idc: str, sn: str) -> bool:
        with self._lock:
            return (idc, sn) in self._online

    def query_servers(self, *, idc: str = "", q: str = "", after: tuple[str, str] | None = None,
                      limit: int = 50) -> tuple[list[dict[str, Any]], tuple[str, str] | None]:
        needle = q.strip().lower()
        with self._lock:
            start = bisect.bisect_right(self._server_order, after) if after else 0
            found: list[dict[str, Any]] = []
            more = False
            for ident in _iter_from(self._server_order, start):
                got = self._servers.get(ident)
                if got is None or (idc and ident[0] != idc) or (needle and needle not in got[2]):
                    continue
                if len(found) == limit:
                    more = True
                    break
                summary = server_summary(got[0], got[1], ident in self._online)
                task = self._tasks.get(ident)
                summary["task_status"] = task.task.status if task else None
                found.append(summary)
        last = (found[-1]["idc"], found[-1]["sn"]) if more and found else None
        return found, last

    # -- nodes, IDCs, templates -------------------------------------------------

    def idcs(self) -> list[dict[str, Any]]:
        """Every IDC seen in tasks, servers or nodes, with its regional nodes."""
        now = time.time()
        with self._lock:
            names = {i for i, _ in self._counts} | {i for i, _ in self._servers} | \
                {i for i, _ in self._nodes}
            result = []
            for name in sorted(names):
                nodes = [node_view(n, data, rev, now) for (i, n), (data, rev)
                         in sorted(self._nodes.items()) if i == name]
                result.append({
                    "name": name,
                    "nodes": nodes,
                    "nodes_alive": sum(1 for n in nodes if n["alive"]),
                    "tasks": sum(c for (i, _s), c in self._counts.items() if i == name),
                    "servers": sum(1 for i, _ in self._servers if i == name),
                })
            return result

    def node(self, idc: str, name: str) -> dict[str, Any] | None:
        """A regional node's registration record while it is alive (its key
        lives under the node's lease), else ``None``."""
        with self._lock:
            found = self._nodes.get((idc, name))
        return dict(found[0]) if found is not None else None

    def images(self) -> list[tuple[ManagedImage, int]]:
        """The managed images with their revisions, by name."""
        with self._lock:
            return [self._images[name] for name in sorted(self._images)]

    def image(self, name: str) -> tuple[ManagedImage, int] | None:
        with self._lock:
            return self._images.get(name)

    def image_copies(self, name: str) -> list[tuple[str, str, NodeImageState]]:
        """``(idc, node, state)`` of every live node's copy of image ``name``."""
        with self._lock:
            return [(idc, node, st) for (n, idc, node), st in sorted(self._node_images.items())
                    if n == name]

    def tasks_using(self, name: str) -> list[Task]:
        """Active tasks (pending to installing) that install image ``name``."""
        with self._lock:
            return [e.task for e in self._tasks.values()
                    if e.task.image == name and e.task.status in ACTIVE]

    def templates(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(data, name=name, revision=rev)
                    for name, (data, rev) in sorted(self._templates.items())]

    def template(self, name: str) -> tuple[dict[str, Any], int] | None:
        with self._lock:
            return self._templates.get(name)

    # -- stats ------------------------------------------------------------------

    def stats(self, *, now: float | None = None, max_age: float = 2.0) -> dict[str, Any]:
        """Counts per state and IDC, installs per hour (last 24 h), median
        install time of succeeded tasks; recomputed at most every ``max_age``
        seconds (a scan of every task)."""
        t = time.time() if now is None else now
        with self._lock:
            memo = self._stats_memo
            if memo is not None and now is None and time.monotonic() - memo[0] < max_age:
                return memo[1]
            result = task_stats(self._counts, (e.task for e in self._tasks.values()), t)
            result.update({
                "servers": len(self._servers),
                "servers_online": len(self._online),
                "revision": self.cache.revision,
            })
            if now is None:
                self._stats_memo = (time.monotonic(), result)
            return result


def _iter_from(lst: list[Any], start: int) -> Iterator[Any]:
    for i in range(start, len(lst)):
        yield lst[i]
