"""What every service of a regional node shares: the NodeContext.

The regional node (``bootsvc.node``) builds one NodeContext and hands it to
the ProxyDHCP, TFTP and boot HTTP services.  Services read from it and
count into it; they do not build their own store clients or caches.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from bootsvc.state.machines import MachineIndex
from lpmos.config import Config
from lpmos.metrics import Registry
from lpmos.store import Store
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys


class TimelineSink(Protocol):
    """Records a boot stage for a machine; must never block or raise.

    ``who`` is the MAC (lowercase, colons) when that is all the service
    knows (DHCP, TFTP), or ``sn:<SN>`` once the machine is identified.
    """

    def record(self, who: str, stage: str, detail: dict[str, Any] | None = None) -> None: ...


class MemoryTimeline:
    """A bounded in-memory timeline (tests, and the node before etcd is up)."""

    def __init__(self, per_machine: int = 100) -> None:
        self._lock = threading.Lock()
        self._entries: dict[str, deque[dict[str, Any]]] = {}
        self._per_machine = per_machine

    def record(self, who: str, stage: str, detail: dict[str, Any] | None = None) -> None:
        with self._lock:
            entries = self._entries.setdefault(who, deque(maxlen=self._per_machine))
            entries.append({"at": time.time(), "stage": stage, "detail": detail or {}})

    def entries(self, who: str) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._entries.get(who, ()))


@dataclass
class NodeContext:
    config: Config
    idc: str
    node_name: str
    store: Store
    keys: Keys
    cache: WatchCache
    machines: MachineIndex
    metrics: Registry = field(default_factory=Registry)
    timeline: TimelineSink = field(default_factory=MemoryTimeline)
    #: base URL machines use to reach this node's HTTP server, e.g. http://10.0.0.1:8081
    advertise_url: str = ""
    #: the same for machines that reach it over IPv6 (``--dhcp6-mode``'s URL,
    #: e.g. http://[fd00::1]:8081); "" when the node does not boot over IPv6
    advertise_url6: str = ""
    #: address machines reach this node at (DHCP option 54 / siaddr / TFTP server)
    server_ip: str = ""
    #: checks, one per service with a thread pool, true while it has work queued
    #: or running (see :meth:`threads_busy`)
    busy_checks: list[Callable[[], bool]] = field(default_factory=list)
    #: conditions an operator should fix that do not stop the node, by topic;
    #: /healthz lists them (a node name used twice, for one)
    warnings: dict[str, str] = field(default_factory=dict)
    #: checks of conditions that make the node degraded (etcd's NOSPACE alarm,
    #: for one), each returning its reasons; /healthz says degraded and lists them
    degraded_checks: list[Callable[[], list[str]]] = field(default_factory=list)

    def threads_busy(self) -> bool:
        """True while some service's threads have work.  The event loop then
        must not keep the GIL busy: a thread waiting for it gets it only
        when the loop blocks, or after a whole switch interval (5 ms) per
        acquisition, so a busy-polling loop (TFTP's ``tftp.spin_us``) would
        turn a 2 ms install claim into tens of milliseconds."""
        return any(check() for check in self.busy_checks)
