"""A watch cache: a prefix of etcd kept in memory and followed by a watch.

The regional node answers boots from this cache (no etcd round trip on the
hot path) and the control plane feeds every browser from one of these per
process.  Contract:

* :meth:`WatchCache.start` loads the prefix at one revision (paged), then
  watches from that revision + 1;
* after a broken stream it resumes from the last revision seen + 1, with
  jittered exponential back-off (capped), so no event is missed or repeated;
* when etcd has compacted past that revision it reloads the whole prefix and
  tells listeners (``on_reset``), since deletes in the gap are unknowable;
* :meth:`WatchCache.staleness` is the number of seconds since the cache was
  last confirmed current by etcd (an event or a progress answer); it grows
  while etcd is unreachable.  ``inf`` before the first load;
* listeners run on the cache's thread, in revision order, after the cache
  itself has been updated; a listener that raises is logged and skipped.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Protocol

from lpmos.store import Compacted, Event, KeyValue, Store, StoreError, range_all

log = logging.getLogger(__name__)


class Listener(Protocol):
    def __call__(self, key: str, old: KeyValue | None, new: KeyValue | None,
                 revision: int) -> None: ...


class WatchCache:
    def __init__(
        self,
        store: Store,
        prefix: str,
        *,
        progress_interval: float = 1.0,
        backoff_max: float = 2.0,
        name: str = "cache",
    ) -> None:
        self.store = store
        self.prefix = prefix
        self.name = name
        self._data: dict[str, KeyValue] = {}
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self.revision = 0
        self._confirmed = -math.inf      # monotonic time of the last confirmation
        self._listeners: list[Listener] = []
        self._reset_listeners: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watch: object | None = None
        self._progress_interval = progress_interval
        self._backoff_max = backoff_max
        self._loaded = threading.Event()
        self.reloads = 0
        self.resumes = 0
        self.last_error = ""

    # -- reading ----------------------------------------------------------------

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            return self._data.get(key)

    def items(self, prefix: str = "") -> list[KeyValue]:
        """Entries under ``prefix`` (default: all), in key order."""
        with self._lock:
            keys = sorted(k for k in self._data if k.startswith(prefix or self.prefix))
            return [self._data[k] for k in keys]

    def __len__(self) -> int:
        with self._lock:
            return len(self._data)

    def staleness(self) -> float:
        """Seconds since etcd last confirmed this cache is current."""
        return time.monotonic() - self._confirmed

    @property
    def loaded(self) -> bool:
        return self._loaded.is_set()

    def wait_loaded(self, timeout: float) -> bool:
        return self._loaded.wait(timeout)

    def wait_for_revision(self, revision: int, timeout: float) -> bool:
        """Block until the cache has applied ``revision`` (read-your-writes)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while self.revision < revision:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._changed.wait(remaining)
            return True

    # -- listening --------------------------------------------------------------

    def add_listener(self, fn: Listener, on_reset: Callable[[], None] | None = None) -> None:
        """``fn(key, old, new, revision)`` on every change; ``on_reset()``
        after every full (re)load, when listeners should rebuild from
        :meth:`items`."""
        self._listeners.append(fn)
        if on_reset is not None:
            self._reset_listeners.append(on_reset)

    # -- running ----------------------------------------------------------------

    def start(self, wait: float = 0.0) -> WatchCache:
        """Start following in a daemon thread; wait up to ``wait`` seconds
        for the first load (the cache may start empty when etcd is down)."""
        self._thread = threading.Thread(target=self._run, name=f"watch-{self.name}", daemon=True)
        self._thread.start()
        if wait:
            self._loaded.wait(wait)
        return self

    def stop(self) -> None:
        self._stop.set()
        watch = self._watch
        if watch is not None:
            watch.close()  # type: ignore[attr-defined]
        if self._thread is not None:
            self._thread.join(timeout=5)

    def load(self) -> None:
        """(Re)load the prefix at one revision; replaces the cache content."""
        page = range_all(self.store, self.prefix)
        with self._changed:
            self._data = {kv.key: kv for kv in page.items}
            self.revision = page.revision
            self._confirmed = time.monotonic()
            self._changed.notify_all()
        self._loaded.set()
        for fn in self._reset_listeners:
            try:
                fn()
            except Exception:
                log.exception("%s: reset listener failed", self.name)

    def apply(self, events: Iterable[Event], revision: int) -> None:
        """Apply a batch of watch events (public for tests and replays)."""
        changes = []
        with self._changed:
            for ev in events:
                if ev.mod_revision <= self.revision and ev.mod_revision != 0:
                    continue   # already seen (resume overlap)
                old = self._data.get(ev.key)
                if ev.type == "put":
                    new: KeyValue | None = ev.as_kv()
                    self._data[ev.key] = new  # type: ignore[assignment]
                else:
                    new = None
                    self._data.pop(ev.key, None)
                changes.append((ev.key, old, new, ev.mod_revision))
            if revision > self.revision:
                self.revision = revision
            self._confirmed = time.monotonic()
            self._changed.notify_all()
        for key, old, new, rev in changes:
            for fn in self._listeners:
                try:
                    fn(key, old, new, rev)
                except Exception:
                    log.exception("%s: listener failed on %s", self.name, key)

    def _run(self) -> None:
        backoff = 0.1
        need_load = not self.loaded   # start() after load() resumes from it
        while not self._stop.is_set():
            try:
                if need_load:
                    self.load()
                    need_load = False
                self._follow()
                backoff = 0.1
            except Compacted:
                log.warning("%s: watch revision %d compacted; reloading", self.name,
                            self.revision + 1)
                self.reloads += 1
                need_load = True
                continue
            except StoreError as exc:
                self.last_error = str(exc)
                if not self._stop.is_set():
                    log.warning("%s: etcd unavailable (%s); retrying in %.1fs", self.name, exc,
                                backoff)
            except Exception as exc:   # never let the cache thread die
                self.last_error = repr(exc)
                log.exception("%s: unexpected error in watch loop", self.name)
            self._stop.wait(random.uniform(backoff / 2, backoff))
            backoff = min(self._backoff_max, backoff * 2)
            self.resumes += 1

    def _follow(self) -> None:
        watch = self.store.watch(self.prefix, self.revision + 1)
        self._watch = watch
        # a watchdog asks for progress; an unanswered request means a dead stream
        answered = threading.Event()
        answered.set()
        stop_dog = threading.Event()

        def watchdog() -> None:
            asked = time.monotonic()
            while not stop_dog.wait(self._progress_interval):
                if not answered.is_set():
                    if time.monotonic() - asked > self.store.timeout:
                        log.warning("%s: watch did not answer a progress request; reconnecting",
                                    self.name)
                        watch.close()
                        return
                    continue
                answered.clear()
                asked = time.monotonic()
                try:
                    watch.progress()
                except Exception:
                    watch.close()
                    return

        dog = threading.Thread(target=watchdog, name=f"watchdog-{self.name}", daemon=True)
        dog.start()
        try:
            if self._stop.is_set():
                return
            for events, revision in watch:
                answered.set()
                if events:
                    self.apply(events, revision)
                else:
                    with self._changed:
                        # a progress answer: current as of `revision`
                        if revision > self.revision:
                            self.revision = revision
                        self._confirmed = time.monotonic()
                        self._changed.notify_all()
                if self._stop.is_set():
                    return
            if not self._stop.is_set():
                raise StoreError("watch closed")
        finally:
            stop_dog.set()
            watch.close()
            self._watch = None
