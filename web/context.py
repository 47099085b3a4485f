"""What every blueprint of the control plane shares: the WebContext.

``create_app`` builds exactly one per application and stores it in
``app.extensions["lpmos"]``; views reach it with :func:`ctx`.  There are no
module-level clients or mutable globals (STYLE principle 8).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from flask import current_app

from lpmos.auth import Auth
from lpmos.catalog import Catalog
from lpmos.config import Config
from lpmos.metrics import Registry
from lpmos.store import Store
from lpmos.store.keys import Keys
from lpmos.store.maintenance import EtcdMaintenance
from lpmos.tasks import TaskService
from web.index import ConsoleCache, ConsoleIndex
from web.ratelimit import RateLimiter


class LiveHub(Protocol):
    """What the rest of the app asks of the WebSocket hub
    (:class:`web.ws.Hub`, which the ``/ws`` route uses in full)."""

    def client_count(self) -> int: ...

    def close(self) -> None: ...


@dataclass
class WebContext:
    config: Config
    store: Store
    keys: Keys
    cache: ConsoleCache
    index: ConsoleIndex
    tasks: TaskService
    auth: Auth
    #: the seed catalog file (``None``: none configured, any OS name goes)
    seed_catalog: Catalog | None
    metrics: Registry
    login_limiter: RateLimiter
    mutate_limiter: RateLimiter
    hub: LiveHub
    settings: dict[str, Any] = field(default_factory=dict)
    owns_cache: bool = True
    #: etcd's alarms and sizes (None: not watched, e.g. a test's MemoryStore)
    maintenance: EtcdMaintenance | None = None
    #: background workers stopped with the app (the webhook dispatcher)
    workers: list[Any] = field(default_factory=list)

    _catalog_memo: tuple[int, Catalog | None] | None = field(default=None, repr=False)

    @property
    def catalog(self) -> Catalog | None:
        """What tasks are checked against: the seed catalog plus the managed
        images that are available (every file in; :mod:`lpmos.images`),
        rebuilt when an image record changes.  ``None`` while no
        seed catalog is configured."""
        seed = self.seed_catalog
        if seed is None:
            return None
        revision = self.index.images_generation
        memo = self._catalog_memo
        if memo is not None and memo[0] == revision:
            return memo[1]
        managed = [img.catalog_entry() for img, _rev in self.index.images() if img.offered]
        merged = seed.with_images(managed) if managed else seed
        self._catalog_memo = (revision, merged)
        return merged

    def setting(self, key: str, default: Any = None) -> Any:
        """A ``web.*`` value: the resolved config's, else the default here."""
        if key in self.settings:
            return self.settings[key]
        return self.config.get(key, default)

    def close(self) -> None:
        for worker in self.workers:
            worker.stop()
        self.hub.close()
        if self.maintenance is not None:
            self.maintenance.stop()
        if self.owns_cache:
            self.cache.stop()


def ctx() -> WebContext:
    context: WebContext = current_app.extensions["lpmos"]
    return context
