"""Helpers for the boot HTTP integration tests: a regional node's HTTP
service on a real etcd, a test image catalog, a store that counts the
requests made from the HTTP service's threads."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bootsvc.context import NodeContext
from bootsvc.http.service import HttpService
from bootsvc.http.settings import SETTINGS
from bootsvc.settings import NODE_SETTINGS
from bootsvc.state.machines import MachineIndex
from bootsvc.state.timeline import EtcdTimeline
from lpmos import testing
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.metrics import Registry
from lpmos.store.cache import WatchCache
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.store.testing import CountingStore
from lpmos.testing import ROCKY_9, UBUNTU_24_04

IDC = "dc1"


def on_http_thread() -> bool:
    """Whether this call comes from the HTTP service (``http-loop`` answers
    inline, ``http-worker_N`` runs the app)."""
    return threading.current_thread().name.startswith("http-")


def write_catalog(root: Path) -> tuple[Path, dict[str, bytes]]:
    """A catalog with the live image, an image-mode OS ("lab-os", 1 MiB) and
    installer entries (Rocky 9 and Ubuntu 24.04, official mirror URLs, never
    fetched); also the files' bytes."""
    return testing.write_catalog(root, disk_name="lab-os", disk_bytes=1 << 20,
                                 live_bytes=(200_000, 300_000),
                                 installers=(ROCKY_9, UBUNTU_24_04))


@dataclass
class Node:
    ctx: NodeContext
    service: HttpService
    store: CountingStore
    cache: WatchCache
    timeline: EtcdTimeline
    url: str

    def stop(self) -> None:
        self.service.stop()
        self.timeline.stop()
        self.cache.stop()
        self.store.close()


def start_node(etcd_url: str, keys: Keys, state_dir: Path, name: str, catalog: Path,
               *, etcd_timeout: float = 2.0, **flags: str) -> Node:
    settings = settings_by_key([COMMON, NODE_SETTINGS, SETTINGS])
    values = {"state_dir": str(state_dir), "etcd__prefix": keys.prefix, "catalog": str(catalog),
              "regional__listen": "127.0.0.1", "regional__node_name": name,
              "regional__idc": IDC, "http__port": "0", "http__threads": "8",
              "http__event_interval": "0.2", "etcd__timeout": str(etcd_timeout)}
    known = {st.dest for st in settings}
    values.update({k: v for k, v in flags.items() if k in known})
    config = resolve(settings, values, environ={}, config_file=None)
    # other services' settings (tftp.root ...) are not in this table
    config = config.with_values(**{k: v for k, v in flags.items() if k not in known})
    store = CountingStore(EtcdStore([etcd_url], timeout=etcd_timeout), counted=on_http_thread)
    cache = WatchCache(store, keys.idc(IDC), name=f"cache-{name}",
                       progress_interval=0.5).start(wait=10)
    machines = MachineIndex(cache, keys, IDC)
    metrics = Registry()
    timeline = EtcdTimeline(store, keys, IDC, machines, metrics,
                            node=name, interval=0.2)
    ctx = NodeContext(config=config, idc=IDC, node_name=name, store=store,
                      keys=keys, cache=cache, machines=machines, metrics=metrics,
                      timeline=timeline)
    service = HttpService(ctx).start()
    timeline.start()
    return Node(ctx, service, store, cache, timeline, ctx.advertise_url)


def eventually(fn: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s (last: {last!r})")
