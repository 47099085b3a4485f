"""The control plane's single watch over etcd: :class:`ConsoleCache`, a
:class:`WatchCache` over the whole LPMOS prefix minus the audit records
(they only grow; the audit API reads them from etcd page by page).
:class:`web.index.ConsoleIndex` follows it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lpmos.store import Event, KeyValue, Page, Store, Watch
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys


class _WithoutAudit:
    """A read-only :class:`Store` view that hides the audit records.

    Only what :class:`WatchCache` calls is offered.  ``range`` skips the
    audit key range with one jump, so a prefix with millions of audit
    records loads as fast as one without."""

    def __init__(self, store: Store, keys: Keys) -> None:
        self._store = store
        self.timeout = store.timeout
        self._skip = keys.audit_prefix()
        self._skip_end = self._skip[:-1] + chr(ord(self._skip[-1]) + 1)

    def range(self, prefix: str, *, start: str | None = None, limit: int = 0,
              revision: int = 0) -> Page:
        while True:
            if start is not None and self._skip <= start < self._skip_end:
                start = self._skip_end
            page = self._store.range(prefix, start=start, limit=limit, revision=revision)
            revision = page.revision
            kept = [kv for kv in page.items if not kv.key.startswith(self._skip)]
            if kept or not page.more or not page.items:
                return Page(kept, page.revision, page.more)
            start = max(page.items[-1].key + "\x00", self._skip_end)

    def watch(self, prefix: str, start_revision: int) -> Watch:
        return self._store.watch(prefix, start_revision)

    def get(self, key: str) -> KeyValue | None:
        return self._store.get(key)


class ConsoleCache(WatchCache):
    """The single watch of a control-plane process (everything but audit)."""

    def __init__(self, store: Store, keys: Keys, **kwargs: Any) -> None:
        self._audit_prefix = keys.audit_prefix()
        super().__init__(_WithoutAudit(store, keys), keys.root(),  # type: ignore[arg-type]
                         name="console", **kwargs)

    def apply(self, events: Sequence[Event], revision: int) -> None:  # type: ignore[override]
        super().apply([e for e in events if not e.key.startswith(self._audit_prefix)], revision)
