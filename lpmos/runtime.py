"""Process plumbing shared by every service: logging and opening the store."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lpmos.config import Config
from lpmos.store import Store
from lpmos.store.keys import Keys


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


@contextlib.contextmanager
def open_store(config: Config) -> Iterator[StoreHandle]:
    """The configured etcd store; with no endpoints, the private embedded etcd
    of the state directory (started or reused, and released on exit)."""
    from lpmos.store.embedded import ensure_local_etcd
    from lpmos.store.etcd import EtcdStore

    endpoints: list[str] = list(config["etcd.endpoints"])
    local = None
    if not endpoints:
        state_dir = Path(config["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        local = ensure_local_etcd(state_dir)
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
        yield StoreHandle(store, Keys(config["etcd.prefix"]), endpoints, local is not None)
    finally:
        store.close()
        if local is not None:
            local.release()
