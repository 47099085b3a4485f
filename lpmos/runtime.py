"""Process plumbing shared by every service: logging and opening the store."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lpmos.config import Config, ConfigError
from lpmos.store import Store
from lpmos.store.keys import Keys

if TYPE_CHECKING:
    from lpmos.store.embedded import EtcdOptions
    from lpmos.store.maintenance import EtcdMaintenance


def setup_logging(level: str = "info", *, name: str = "lpmos") -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )


@dataclass
class StoreHandle:
    store: Store
    keys: Keys
    endpoints: list[str]
    embedded: bool
    config: Config

    def maintenance(self, *, name: str = "etcd-maintenance") -> EtcdMaintenance | None:
        """The etcd maintenance loop of a long-running service, not started
        (:mod:`lpmos.store.maintenance`): alarms and sizes for any etcd,
        defragmentation only of the embedded one.  ``None`` for a store
        that is not etcd."""
        from lpmos.store.etcd import EtcdStore
        from lpmos.store.maintenance import EtcdMaintenance

        if not isinstance(self.store, EtcdStore):
            return None
        return EtcdMaintenance(
            self.store, defragment=self.embedded, name=name,
            quota_bytes=int(self.config["etcd.quota_backend_bytes"]),
            interval=float(self.config["etcd.maintenance_interval"]))


def embedded_options(config: Config) -> EtcdOptions:
    """The flags of an etcd this process starts itself, from the
    ``etcd.auto_compaction_*`` and ``etcd.quota_backend_bytes`` settings."""
    from lpmos.store.embedded import EtcdOptions

    try:
        return EtcdOptions(
            auto_compaction_mode=str(config["etcd.auto_compaction_mode"]),
            auto_compaction_retention=str(config["etcd.auto_compaction_retention"]),
            quota_backend_bytes=int(config["etcd.quota_backend_bytes"]))
    except ValueError as exc:
        raise ConfigError(f"etcd.auto_compaction_retention: {exc}") from None


@contextlib.contextmanager
def open_store(config: Config, *, embedded: bool = False) -> Iterator[StoreHandle]:
    """The configured etcd store; with no endpoints, the private embedded etcd
    of the state directory (started or reused, and released on exit).
    ``embedded``: the configured endpoint is that private etcd, started by a
    parent process (the control plane's gunicorn master)."""
    from lpmos.store.embedded import ensure_local_etcd
    from lpmos.store.etcd import EtcdStore

    endpoints: list[str] = list(config["etcd.endpoints"])
    local = None
    if not endpoints:
        state_dir = Path(config["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        local = ensure_local_etcd(state_dir, embedded_options(config))
        endpoints = [local.client_url]
        logging.getLogger("lpmos").info(
            "no --etcd-endpoints given: using the private etcd at %s (data in %s)",
            local.client_url, local.data_dir)
    store = EtcdStore(
        endpoints,
        timeout=config["etcd.timeout"],
        ca=config["etcd.ca"],
        cert=config["etcd.cert"],
        key=config["etcd.key"],
        user=config["etcd.user"],
        password=config["etcd.password"],
    )
    try:
        yield StoreHandle(store, Keys(config["etcd.prefix"]), endpoints,
                          embedded or local is not None, config)
    finally:
        store.close()
        if local is not None:
            local.release()
