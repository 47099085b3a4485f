"""The image sync service of a regional node: it follows the managed image
records in etcd (``{prefix}/images/``, a watch cache of its own), fetches
and verifies the ones its IDC should have into the node's cache directory,
evicts what the bound requires, reports each copy at
``keys.node_image(idc, node, name)`` under the node's registration lease,
and hands the ready ones to the boot HTTP's catalog.

Two threads, neither of them the event loop's:

* the control thread makes a plan every second or on a change
  (:func:`bootsvc.policy.images.decide_sync`: records, the cache directory,
  the IDC's active tasks), carries out removals and evictions, and writes
  the copy states that changed to etcd (all of them again when the
  registration's lease is new: the old one took them along);
* the worker fetches one image at a time (:func:`bootsvc.images.fetch.fetch_file`);
  its progress reaches etcd at most every second or 5 %.

Nothing is offered to a machine before every file of the image is in the
cache with its sha256 checked: the catalog only ever lists verified files.
A plan is made only once the records have loaded from etcd (an empty
cache at start must not read as "every image was removed").
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from bootsvc.context import NodeContext
from bootsvc.images.cache import ImageCache
from bootsvc.images.fetch import FetchError, FetchSettings, fetch_file
from bootsvc.images.settings import ImageSettings
from bootsvc.policy.images import (
    Failure,
    LocalCopy,
    Plan,
    ProgressThrottle,
    decide_sync,
    image_of,
    needed_images,
    next_failure,
    wait_reason,
)
from lpmos.catalog import Image
from lpmos.images import ImageRecordError, ManagedImage, NodeImageState
from lpmos.models import Task
from lpmos.nodeapi import SharedKey, sign
from lpmos.store import KeyValue, StoreError
from lpmos.store.cache import WatchCache

log = logging.getLogger(__name__)

#: seconds between control passes when nothing wakes the thread
PASS_INTERVAL = 1.0
#: how often a needed image's last use is written to its meta.json
TOUCH_EVERY = 60.0


class ImageSync:
    """See the module docstring.  ``on_catalog(images)`` receives the
    catalog entries of the ready images after every change (the boot
    HTTP's :meth:`~bootsvc.http.backend.BootBackend.set_managed_images`);
    ``lease()`` is the registration's current lease (0: none yet)."""

    def __init__(self, ctx: NodeContext, settings: ImageSettings, *,
                 on_catalog: Callable[[list[Image]], None], lease: Callable[[], int]) -> None:
        self.ctx = ctx
        self.settings = settings
        self.on_catalog = on_catalog
        self.lease = lease
        self.fetch_settings = FetchSettings(settings.connect_timeout, settings.read_timeout,
                                            settings.retries)
        self.disk = ImageCache(settings.cache)
        self.records = WatchCache(ctx.store, ctx.keys.images(), name="images")
        self._by_name: dict[str, tuple[ManagedImage, int]] = {}
        self.records.add_listener(self._on_record, on_reset=self._reload)
        self._node_key = SharedKey(ctx.store, ctx.keys)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._work = threading.Condition(self._lock)
        self._stop = threading.Event()
        self._states: dict[str, NodeImageState] = {}
        self._dirty: set[str] = set()
        self._gone: set[str] = set()          # state keys to delete
        self._failures: dict[str, Failure] = {}
        self._queue: tuple[str, ...] = ()
        self._busy = ""
        self._busy_revision = 0
        self._cancel: set[str] = set()
        self._local: dict[str, LocalCopy] = {}
        self._published_lease = 0
        self._catalog_key: tuple[Any, ...] = ()
        self._threads: list[threading.Thread] = []
        self._cache_bytes = 0
        m = ctx.metrics
        m.describe("image_fetch_bytes_total", "bytes of managed images downloaded into the "
                   "node's image cache")
        m.describe("image_fetch_failures_total", "managed image downloads that failed, by "
                   "reason (http_status, timeout, connect, checksum, size, cache_full, "
                   "protocol, io)")
        m.describe("image_fetches_total", "managed images fetched and verified (ready)")
        m.describe("image_evictions_total", "managed images deleted from the node's cache, "
                   "by why (evicted: to make room; removed: the record is gone or changed)")
        m.gauge("image_cache_bytes", lambda: float(self._cache_bytes),
                "bytes in the node's image cache (verified files and partial downloads)")
        m.gauge("image_cache_capacity_bytes", lambda: float(self.settings.cache_bytes),
                "the bound of the node's image cache (--image-cache-bytes)")
        m.gauge("images_ready", self._ready_count,
                "managed images ready (verified) on this node")

    # -- lifecycle
    def start(self) -> None:
        """Serve the verified copies at once (their records as kept in the
        cache: with etcd down at start the node still serves an install in
        progress), then follow etcd."""
        kept = self.disk.records()
        if kept:
            self._update_catalog(kept, self.disk.scan())
        self.records.start()
        for target, name in ((self._control, "image-sync"), (self._worker, "image-fetch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        with self._work:
            self._work.notify_all()
        for thread in self._threads:
            thread.join(timeout=10)
        self.records.stop()

    def wake(self) -> None:
        self._wake.set()

    # -- what the boot decision asks
    def wait_reason(self, task: Task) -> str:
        """Why ``task``'s managed image keeps it waiting on this node ("":
        it is no managed image, or it is ready)."""
        records = self._records()
        name = image_of(records, records, task)
        if not name:
            return ""
        with self._lock:
            state = self._states.get(name)
        return wait_reason(records[name], state, idc=self.ctx.idc, node=self.ctx.node_name)

    def states(self) -> dict[str, NodeImageState]:
        with self._lock:
            return dict(self._states)

    def _ready_count(self) -> float:
        with self._lock:
            return float(sum(1 for s in self._states.values() if s.state == "ready"))

    # -- records
    def _records(self) -> dict[str, ManagedImage]:
        return {name: rec for name, (rec, _rev) in self._parsed().items()}

    def _parsed(self) -> dict[str, tuple[ManagedImage, int]]:
        """The valid records by name, with their mod_revision (kept up to
        date by the watch cache's listener: the boot decision asks on the
        hot path)."""
        with self._lock:
            return dict(self._by_name)

    def _reload(self) -> None:
        prefix = self.ctx.keys.images()
        out: dict[str, tuple[ManagedImage, int]] = {}
        for kv in self.records.items(prefix):
            rec = _parse(kv, prefix)
            if rec is not None:
                out[rec.name] = (rec, kv.mod_revision)
        with self._lock:
            self._by_name = out
        self._wake.set()

    def _on_record(self, key: str, old: KeyValue | None, new: KeyValue | None,
                   revision: int) -> None:
        prefix = self.ctx.keys.images()
        name = key[len(prefix):]
        rec = _parse(new, prefix) if new is not None else None
        with self._lock:
            if rec is None:
                self._by_name.pop(name, None)
            else:
                self._by_name[name] = (rec, new.mod_revision if new is not None else 0)
        self._wake.set()

    # -- the control thread
    def _control(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(PASS_INTERVAL)
            self._wake.clear()
            if self._stop.is_set():
                break
            try:
                if self.records.loaded:
                    self.sync_once()
                self.publish()
            except Exception:        # never let the control thread die
                log.exception("image sync pass failed")

    def sync_once(self, now: float | None = None) -> Plan:
        """One pass: plan, remove, evict, queue fetches, set states."""
        now = time.time() if now is None else now
        parsed = self._parsed()
        records = {name: rec for name, (rec, _rev) in parsed.items()}
        revisions = {name: rev for name, (_rec, rev) in parsed.items()}
        local = self.disk.scan()
        needed = needed_images((t for t, _rev in self.ctx.machines.tasks()), records)
        with self._lock:
            busy = self._busy
            failures = dict(self._failures)
        plan = decide_sync(records, local, idc=self.ctx.idc, capacity=self.settings.cache_bytes,
                           needed=needed, failures=failures, revisions=revisions, now=now)
        for name in plan.remove:
            if name == busy:
                self._cancel_fetch(name)
                continue
            freed = self.disk.remove(name)
            self.ctx.metrics.inc("image_evictions_total", why="removed")
            log.info("image %s: local copy removed (%d bytes freed): its record is gone or "
                     "changed", name, freed)
        for name in plan.evict:
            freed = self.disk.remove(name)
            self.ctx.metrics.inc("image_evictions_total", why="evicted")
            log.info("image %s: evicted from the cache (%d bytes) to make room", name, freed)
        if plan.remove or plan.evict:
            local = self.disk.scan()
        for name in needed:
            copy = local.get(name)
            if copy is not None and now - copy.last_used >= TOUCH_EVERY:
                self.disk.touch(name, now)
        if busy and (busy not in records or revisions[busy] != self._busy_revision):
            self._cancel_fetch(busy)       # removed, or changed under the fetch
        with self._lock:
            self._local = local
            self._cache_bytes = sum(c.bytes for c in local.values())
            self._queue = plan.fetch
            for name in list(self._failures):
                if name not in records or self._failures[name].revision != revisions[name]:
                    del self._failures[name]
            self._update_states(records, local, plan)
            if plan.fetch:
                self._work.notify_all()
        self._update_catalog(records, local)
        return plan

    def _update_states(self, records: dict[str, ManagedImage], local: dict[str, LocalCopy],
                       plan: Plan) -> None:
        """The copy states after a plan (lock held)."""
        now = time.time()
        wanted: dict[str, NodeImageState] = {}
        for name, rec in records.items():
            copy = local.get(name)
            current = self._states.get(name)
            if copy is not None and copy.ready_for(rec):
                wanted[name] = NodeImageState(name, rec.sha256, "ready", rec.size or copy.bytes,
                                              rec.size or copy.bytes, "", now)
            elif name in plan.full:
                wanted[name] = NodeImageState(name, rec.sha256, "failed",
                                              copy.bytes if copy else 0, rec.size,
                                              plan.full[name], now)
            elif name in plan.fetch or name == self._busy:
                if current is not None and current.state == "fetching":
                    wanted[name] = current
                else:
                    wanted[name] = NodeImageState(name, rec.sha256, "fetching",
                                                  copy.bytes if copy else 0, rec.size, "", now)
            elif name in self._failures and rec.offered and rec.wanted_in(self.ctx.idc):
                fail = self._failures[name]
                wanted[name] = NodeImageState(name, rec.sha256, "failed",
                                              copy.bytes if copy else 0, rec.size,
                                              fail.reason, now)
        for name, state in wanted.items():
            old = self._states.get(name)
            if old is None or _differs(old, state):
                self._states[name] = state
                self._dirty.add(name)
                self._gone.discard(name)
        for name in list(self._states):
            if name not in wanted:
                del self._states[name]
                self._dirty.discard(name)
                self._gone.add(name)

    def _update_catalog(self, records: dict[str, ManagedImage],
                        local: dict[str, LocalCopy]) -> None:
        ready = sorted((name, rec) for name, rec in records.items()
                       if (copy := local.get(name)) is not None and copy.ready_for(rec))
        key = tuple((name, rec) for name, rec in ready)
        if key == self._catalog_key:
            return
        images = []
        for _name, rec in ready:
            try:
                images.append(rec.catalog_image(self.disk.paths(rec)))
            except ValueError as exc:
                log.error("image %s: %s", rec.name, exc)
        self.on_catalog(images)
        self._catalog_key = key

    def _cancel_fetch(self, name: str) -> None:
        with self._lock:
            self._cancel.add(name)

    # -- publishing
    def publish(self) -> None:
        """Write the changed copy states to etcd under the registration's
        lease; every state again when the lease is a new one."""
        lease = self.lease()
        if not lease:
            return
        with self._lock:
            if lease != self._published_lease:
                self._dirty |= set(self._states)
            dirty = {name: self._states[name] for name in self._dirty if name in self._states}
            gone = set(self._gone)
        idc, node = self.ctx.idc, self.ctx.node_name
        try:
            for name, state in sorted(dirty.items()):
                self.ctx.store.put(self.ctx.keys.node_image(idc, node, name), state.to_json(),
                                   lease=lease)
                with self._lock:
                    if self._states.get(name) is state:
                        self._dirty.discard(name)
            for name in sorted(gone):
                self.ctx.store.delete(self.ctx.keys.node_image(idc, node, name))
                with self._lock:
                    if name not in self._states:
                        self._gone.discard(name)
            self._published_lease = lease
        except StoreError as exc:
            log.warning("image states: etcd unavailable (%s); will retry", exc)

    # -- the worker
    def _worker(self) -> None:
        while not self._stop.is_set():
            with self._work:
                name = ""
                while not self._stop.is_set():
                    name = next((n for n in self._queue if n not in self._cancel), "")
                    if name:
                        break
                    self._work.wait(PASS_INTERVAL)
                if self._stop.is_set():
                    return
                entry = self._by_name.get(name)
                self._busy = name
                self._busy_revision = entry[1] if entry is not None else 0
                self._cancel.discard(name)
            try:
                if entry is not None:
                    self._fetch(name, entry)
            except Exception:
                log.exception("image %s: fetch crashed", name)
            finally:
                with self._lock:
                    self._busy = ""
                    self._cancel.discard(name)
                    self._queue = tuple(n for n in self._queue if n != name)
                self._wake.set()

    def _fetch(self, name: str, parsed: tuple[ManagedImage, int]) -> None:
        rec, revision = parsed
        copy = self.disk.copy(name)
        done_before = 0
        throttle = ProgressThrottle()
        total = rec.size
        log.info("image %s: fetching %d file(s) (%s source, %s bytes)", name,
                 len(rec.file_roles), rec.source, rec.size or "unknown")

        def cancelled() -> bool:
            return self._stop.is_set() or name in self._cancel

        try:
            for role in rec.file_roles:
                f = rec.files[role]
                if copy is not None and copy.verified.get(role) == f.sha256:
                    done_before += f.size
                    continue
                part = self.disk.prepare(rec, role)
                have = part.stat().st_size if part.exists() else 0
                others = self.disk.total_bytes() - have
                limit = max(0, self.settings.cache_bytes - others)
                last = [have]

                def progress(done: int, role_total: int, base: int = done_before,
                             last: list[int] = last) -> None:
                    self.ctx.metrics.inc("image_fetch_bytes_total", done - last[0])
                    last[0] = done
                    whole = total or base + role_total
                    self._progress(rec, base + done, whole, throttle)

                fetch_file(f.url, part, sha256=f.sha256, size=f.size,
                           settings=self.fetch_settings,
                           headers=self._signer() if rec.source == "upload" else None,
                           progress=progress, cancelled=cancelled, limit=limit,
                           unauthorized=self._refresh_key if rec.source == "upload" else None)
                done_before += self.disk.commit(rec, role, part).stat().st_size
        except FetchError as exc:
            if exc.code == "cancelled":
                log.info("image %s: fetch cancelled", name)
                return
            self.ctx.metrics.inc("image_fetch_failures_total", reason=exc.code)
            log.warning("image %s: fetch failed: %s", name, exc.reason)
            with self._lock:
                fail = next_failure(self._failures.get(name), revision=revision,
                                    now=time.time(), reason=exc.reason,
                                    retry=not exc.permanent or exc.code == "cache_full")
                self._failures[name] = fail
                self._set_state(NodeImageState(name, rec.sha256, "failed", 0, rec.size,
                                               exc.reason, time.time()))
            return
        except OSError as exc:
            self.ctx.metrics.inc("image_fetch_failures_total", reason="io")
            log.error("image %s: cache error: %s", name, exc)
            with self._lock:
                self._failures[name] = next_failure(self._failures.get(name),
                                                    revision=revision, now=time.time(),
                                                    reason=f"cache error: {exc}", retry=True)
                self._set_state(NodeImageState(name, rec.sha256, "failed", 0, rec.size,
                                               f"cache error: {exc}", time.time()))
            return
        self.disk.touch(name, time.time())
        self.ctx.metrics.inc("image_fetches_total")
        log.info("image %s: ready (sha256 %s verified)", name, rec.sha256)
        with self._lock:
            self._failures.pop(name, None)

    def _progress(self, rec: ManagedImage, done: int, total: int,
                  throttle: ProgressThrottle) -> None:
        if not throttle.due(done, total, time.monotonic()):
            return
        with self._lock:
            self._set_state(NodeImageState(rec.name, rec.sha256, "fetching", done, total, "",
                                           time.time()))
        self._wake.set()

    def _set_state(self, state: NodeImageState) -> None:
        """(lock held)"""
        self._states[state.name] = state
        self._dirty.add(state.name)
        self._gone.discard(state.name)

    def _refresh_key(self) -> None:
        """Read the node API key again (rate-limited): a 401 may mean it was rotated."""
        try:
            self._node_key.refresh()
        except (StoreError, ValueError) as exc:
            log.warning("node API key: cannot read it again (%s)", exc)

    def _signer(self) -> Callable[[str], dict[str, str]]:
        """Headers that sign a request to the control plane's image files."""
        def headers(target: str) -> dict[str, str]:
            try:
                key = self._node_key.get()
            except (StoreError, ValueError) as exc:
                raise FetchError("connect", f"no node API key from etcd: {exc}") from None
            return {"Authorization": sign(key, "GET", target, time.time())}
        return headers


def _parse(kv: KeyValue, prefix: str) -> ManagedImage | None:
    """The record of ``kv``, or None (logged) for one that does not parse or
    is stored under another name than its own."""
    try:
        rec = ManagedImage.from_json(kv.value)
    except ImageRecordError as exc:
        log.warning("%s: %s; skipped", kv.key, exc)
        return None
    if rec.name != kv.key[len(prefix):]:
        log.warning("%s: the record names %r; skipped", kv.key, rec.name)
        return None
    return rec


def _differs(old: NodeImageState, new: NodeImageState) -> bool:
    return (old.state, old.sha256, old.bytes, old.total, old.reason) != \
        (new.state, new.sha256, new.bytes, new.total, new.reason)
