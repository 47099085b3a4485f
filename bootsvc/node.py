"""The regional node: one process running ProxyDHCP, TFTP and boot HTTP.

It builds the :class:`bootsvc.context.NodeContext` (the IDC watch cache, the
machine index, metrics, the timeline) and runs the chosen services:
DHCP, TFTP and boot HTTP on one asyncio loop in the main thread (the parts
of the HTTP app that wait on etcd run on a bounded thread pool).  It
registers itself at ``/os/{idc}/nodes/{node}`` under a lease kept alive
while it runs, and keeps serving from its cache while etcd is unreachable
(RELIABILITY: degraded, not down).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import random
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from bootsvc.context import MemoryTimeline, NodeContext
from bootsvc.http.settings import HttpSettings
from bootsvc.netif import default_server_ip, url_host
from bootsvc.policy.bootfile import FAMILIES, GRUB_LOADERS
from bootsvc.policy.reaping import Timeouts
from bootsvc.state.machines import MachineIndex
from bootsvc.state.reaper import Reaper
from lpmos import __version__
from lpmos.config import Config
from lpmos.metrics import Registry
from lpmos.sdnotify import Notifier, run_watchdog
from lpmos.store import Store, StoreError
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys
from lpmos.store.maintenance import EtcdMaintenance

log = logging.getLogger(__name__)

NODE_LEASE_TTL = 10


class AsyncService(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NodeRegistration:
    """``/os/{idc}/nodes/{node}`` under a lease, refreshed with jitter;
    re-created after etcd comes back or the lease is lost."""

    def __init__(self, ctx: NodeContext, info: dict[str, Any]) -> None:
        self.ctx = ctx
        # who we are: this process, and the (host, state directory) a restart
        # of this node comes back with
        self.info = {**info, "instance": uuid.uuid4().hex, "host": socket.gethostname(),
                     "state_dir": str(ctx.config.get("state_dir", ""))}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="node-registration", daemon=True)
        self._lease = 0
        #: ``fn(lease)`` after a new lease is granted (keys put under the
        #: old one went with it: the image sync puts its states again)
        self.lease_listeners: list[Callable[[int], None]] = []
        self.registered = False
        self.conflict: str | None = None
        self._conflict_logged = 0.0
        ctx.metrics.gauge("node_name_conflict", lambda: float(self.conflict is not None),
                          "1 while another live node registers under this node's name and "
                          "IDC (each overwrites the other's record)")

    @property
    def lease(self) -> int:
        """The registration's lease while it is registered (0: none now).
        Other keys of this node (its image copies) are put under it, so they
        vanish with the node."""
        return self._lease if self.registered else 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        if self._lease:
            with contextlib.suppress(StoreError):
                self.ctx.store.revoke(self._lease)

    def _value(self) -> bytes:
        info = dict(self.info)
        info["updated_at"] = time.time()
        info["cache_staleness"] = round(min(self.ctx.cache.staleness(), 1e9), 3)
        info["counters"] = {
            name: self.ctx.metrics.total(name)
            for name in ("dhcp_packets_out_total", "tftp_sessions_total", "http_requests_total")
        }
        return json.dumps(info, separators=(",", ":")).encode()

    def _check_name(self, raw: bytes | None) -> None:
        """Whose record is under our name: ours, our own previous run's (same
        host and state directory; its lease outlives a quick restart), or
        another live node's, which is an operator's mistake we can only
        report: refusing to run would also refuse a node replaced in haste."""
        other: dict[str, Any] = {}
        if raw is not None:
            with contextlib.suppress(ValueError, TypeError):
                other = dict(json.loads(raw))
        mine = self.info
        if not other or other.get("instance") in (None, mine["instance"]) or \
                (other.get("host"), other.get("state_dir")) == (mine["host"], mine["state_dir"]):
            if self.conflict is not None:
                log.info("node registration: the name %s is ours alone again",
                         self.ctx.node_name)
            self.conflict = None
            self.ctx.warnings.pop("node_name", None)
            return
        self.conflict = (f"another node registers as {self.ctx.node_name!r} in IDC "
                         f"{self.ctx.idc!r} (host {other.get('host')}, address "
                         f"{other.get('address') or '?'}, state dir {other.get('state_dir')}); "
                         "each overwrites the other's record: give every node its own "
                         "--node-name")
        self.ctx.warnings["node_name"] = self.conflict
        now = time.monotonic()
        if now - self._conflict_logged >= 60:
            self._conflict_logged = now
            log.error("node registration: %s", self.conflict)

    def _run(self) -> None:
        key = self.ctx.keys.node(self.ctx.idc, self.ctx.node_name)
        while not self._stop.is_set():
            try:
                fresh = False
                if not self._lease or self.ctx.store.keepalive(self._lease) <= 0:
                    self._lease = self.ctx.store.grant(NODE_LEASE_TTL)
                    fresh = True
                current = self.ctx.store.get(key)
                self._check_name(current.value if current is not None else None)
                self.ctx.store.put(key, self._value(), lease=self._lease)
                self.registered = True
                if fresh:
                    for fn in self.lease_listeners:
                        try:
                            fn(self._lease)
                        except Exception:
                            log.exception("node registration: lease listener failed")
            except StoreError as exc:
                self.registered = False
                log.warning("node registration: etcd unavailable (%s); will retry", exc)
            self._stop.wait(random.uniform(NODE_LEASE_TTL / 4, NODE_LEASE_TTL / 3))


def grub_warnings(config: Config) -> list[str]:
    """What an operator must know about a node that offers GRUB (a
    ``dhcp.bootfile_*`` of shim or GRUB, for Secure Boot): Debian 12's signed
    GRUB 2.06 reads its TFTP server from the DHCP ACK only, so in proxy mode
    the site's DHCP must name this node (next-server) for it to boot."""
    grub = sorted({str(config.get(f"dhcp.bootfile_{family}") or "") for family in FAMILIES}
                  & GRUB_LOADERS)
    if not grub or config.get("dhcp.mode", "proxy") != "proxy":
        return []
    return [f"dhcp: {grub[0]} starts Debian's signed GRUB, which ignores ProxyDHCP offers and "
            "finds its TFTP server in the DHCP ACK only: make the site's DHCP name this node "
            "as next-server (siaddr / option 66) for Secure Boot machines, or run "
            "--dhcp-mode full on a segment this node serves alone"]


class RegionalNode:
    def __init__(self, config: Config, store: Store, keys: Keys, *,
                 maintenance: EtcdMaintenance | None = None,
                 notifier: Notifier | None = None) -> None:
        """``maintenance`` (:meth:`lpmos.runtime.StoreHandle.maintenance`)
        runs while the node does; etcd's alarms make /healthz degraded.
        ``notifier`` tells systemd (``Type=notify``) when the node serves,
        how it fares, and pings its watchdog from the event loop."""
        self.config = config
        self._notifier = notifier or Notifier(None)
        idc = str(config["regional.idc"])
        cache = WatchCache(store, keys.idc(idc), name=f"idc-{idc}")
        machines = MachineIndex(cache, keys, idc)
        server_ip = default_server_ip(config)
        http_port = HttpSettings.from_config(config).port or HttpSettings().port
        advertise = (config["regional.advertise_url"]
                     or f"http://{url_host(server_ip)}:{http_port}")
        for line in grub_warnings(config):
            log.warning("%s", line)
        self.ctx = NodeContext(
            config=config, idc=idc, node_name=str(config["regional.node_name"]), store=store,
            keys=keys, cache=cache, machines=machines, metrics=Registry(),
            timeline=MemoryTimeline(), advertise_url=advertise, server_ip=server_ip,
        )
        # machines that come over IPv6 get IPv6 URLs (--dhcp6-advertise-url, else
        # the one the node's DHCPv6 hands out)
        self.ctx.advertise_url6 = str(config.get("dhcp6.advertise_url") or "").rstrip("/")
        if not self.ctx.advertise_url6 and config.get("dhcp6.mode", "off") != "off":
            from bootsvc.dhcp6.service import advertise6

            self.ctx.advertise_url6 = advertise6(config)[2]
            if not self.ctx.advertise_url6:
                log.warning("dhcp6: the interface has no global IPv6 address yet and no "
                            "--dhcp6-address or --dhcp6-advertise-url is set: machines that "
                            "boot over IPv6 get the IPv4 URL %s; set --dhcp6-advertise-url",
                            advertise)
        self.services: list[str] = list(config["regional.services"])
        self._async: list[AsyncService] = []
        self._http: Any = None
        self._timeline: Any = None
        self._registration: NodeRegistration | None = None
        self._reaper: Reaper | None = None
        self._images: Any = None
        self._power: Any = None
        self.ctx.metrics.gauge("node_cache_staleness_seconds",
                               lambda: min(cache.staleness(), 1e9),
                               "seconds since etcd last confirmed the IDC cache is current")
        self.ctx.metrics.gauge("node_cache_keys", lambda: float(len(cache)),
                               "keys in the IDC cache")
        self._maintenance = maintenance
        if maintenance is not None:
            maintenance.describe(self.ctx.metrics)
            self.ctx.degraded_checks.append(maintenance.reasons)

    # -- lifecycle
    def _start_core(self) -> None:
        ctx = self.ctx
        if self._maintenance is not None:
            self._maintenance.start()
        ctx.cache.start(wait=3.0)
        if not ctx.cache.loaded:
            log.warning("etcd unreachable at start: serving degraded (no installs) until it "
                        "answers; last error: %s", ctx.cache.last_error or "timeout")
        try:
            from bootsvc.state.timeline import EtcdTimeline
        except ImportError:
            log.warning("bootsvc.state.timeline missing: the boot timeline stays in memory")
        else:
            self._timeline = EtcdTimeline(ctx.store, ctx.keys, ctx.idc, ctx.machines,
                                          ctx.metrics, node=ctx.node_name)
            self._timeline.start()
            ctx.timeline = self._timeline

    async def _start_http(self) -> None:
        """HTTP last: once /healthz answers, DHCP and TFTP are already bound.
        It runs on the same event loop as DHCP and TFTP."""
        if "http" in self.services:
            from bootsvc.http.service import HttpService

            self._http = HttpService(self.ctx)
            await self._http.start_async()
            for service in self._async:
                attach = getattr(service, "attach", None)
                if attach is not None:        # TFTP: GRUB's configs and files
                    attach(self._http.boot)

    def _start_rest(self) -> None:
        ctx = self.ctx
        self._reaper = Reaper(ctx, Timeouts(
            agent=float(self.config["regional.agent_timeout"]),
            firstboot=float(self.config["regional.firstboot_timeout"]),
            boot=float(self.config["regional.boot_timeout"])),
            images=self._http.boot if self._http is not None else None)
        self._reaper.start()
        self._registration = NodeRegistration(ctx, {
            "node": ctx.node_name, "idc": ctx.idc, "address": ctx.server_ip,
            "advertise_url": ctx.advertise_url, "version": __version__,
            "services": self.services, "started_at": time.time(),
        })
        self._registration.start()
        if self._http is not None:
            self._start_images(self._registration)
        self._start_power()

    def _start_power(self) -> None:
        """The power worker (issue #21): this IDC's power requests, carried
        out against the BMCs on its own bounded threads."""
        from bootsvc.power.worker import PowerSettings, PowerWorker

        self._power = PowerWorker(self.ctx, PowerSettings.from_config(self.config))
        self._power.start()

    def _start_images(self, registration: NodeRegistration) -> None:
        """The managed image sync (issue #25): it feeds the boot HTTP's
        catalog and its boot decision; without boot HTTP nothing would serve
        the images, so it runs only with it."""
        from bootsvc.images.settings import ImageSettings
        from bootsvc.images.sync import ImageSync

        boot = self._http.boot
        sync = ImageSync(self.ctx, ImageSettings.from_config(self.config),
                         on_catalog=boot.set_managed_images, lease=lambda: registration.lease)
        boot.image_waits = sync.wait_reason
        registration.lease_listeners.append(lambda _lease: sync.wake())
        sync.start()
        self._images = sync

    async def _start_async(self) -> None:
        if "tftp" in self.services:
            from bootsvc.tftp.service import TftpService

            tftp = TftpService(self.ctx)
            await tftp.start()
            self._async.append(tftp)
        if "dhcp" in self.services and self.config.get("dhcp.mode", "proxy") != "off":
            from bootsvc.dhcp.service import DhcpService

            dhcp = DhcpService(self.ctx)
            await dhcp.start()
            self._async.append(dhcp)
        if "dhcp" in self.services and self.config.get("dhcp6.mode", "off") != "off":
            from bootsvc.dhcp6.service import node_service

            dhcp6_service = node_service(self.ctx)
            await dhcp6_service.start()
            self._async.append(dhcp6_service)

    async def _stop_async(self) -> None:
        if self._http is not None:
            try:
                await self._http.stop_async()
            except Exception:
                log.exception("error stopping boot HTTP")
            self._http = None
        for service in reversed(self._async):
            try:
                await service.stop()
            except Exception:
                log.exception("error stopping %s", type(service).__name__)
        self._async.clear()

    def _stop_sync(self) -> None:
        if self._power is not None:
            self._power.stop()
        if self._images is not None:
            self._images.stop()
        if self._reaper is not None:
            self._reaper.stop()
        if self._registration is not None:
            self._registration.stop()
        if self._timeline is not None:
            self._timeline.stop()
        if self._maintenance is not None:
            self._maintenance.stop()
        self.ctx.cache.stop()

    async def serve(self, stop: asyncio.Event) -> None:
        """Start everything, run until ``stop`` is set, stop everything."""
        self._start_core()
        watchdog: asyncio.Task[None] | None = None
        try:
            await self._start_async()
            await self._start_http()
            self._start_rest()
            # everything built so far lives as long as the process: move it out
            # of the collector's way so GC pauses stay short on the DHCP path
            gc.collect()
            gc.freeze()
            log.info("regional node %s for IDC %s up: services %s, machines reach it at %s "
                     "(boot HTTP %s)", self.ctx.node_name, self.ctx.idc,
                     ",".join(self.services), self.ctx.server_ip, self.ctx.advertise_url)
            # READY once every socket is bound; with etcd unreachable the node
            # still serves from its cache (RELIABILITY: degraded, not down), so
            # readiness does not wait for etcd: STATUS= says degraded instead
            self._notifier.ready(self.systemd_status())
            watchdog = asyncio.create_task(run_watchdog(self._notifier, self.systemd_status))
            await stop.wait()
        finally:
            if watchdog is not None:
                watchdog.cancel()
            self._notifier.stopping(f"stopping node {self.ctx.node_name}")
            log.info("regional node %s stopping", self.ctx.node_name)
            await self._stop_async()
            self._stop_sync()
            log.info("regional node %s stopped", self.ctx.node_name)

    def systemd_status(self) -> str:
        """One line for ``systemctl status``, from memory only (it runs on
        the event loop): the services and whether the IDC cache is current."""
        cache = self.ctx.cache
        staleness = cache.staleness()
        if not cache.loaded:
            health = "degraded: the IDC cache has not loaded from etcd yet"
        elif staleness > 10.0:
            # in tens of seconds, so the line changes (and is sent) rarely
            health = ("degraded: etcd has not confirmed the IDC cache for "
                      f"{staleness // 10 * 10:.0f}+ s")
        else:
            health = "cache current"
        return (f"node {self.ctx.node_name}, IDC {self.ctx.idc}: {','.join(self.services)} at "
                f"{self.ctx.server_ip}; {health}")

    def run_forever(self) -> int:
        """Run until SIGINT or SIGTERM."""
        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            await self.serve(stop)

        asyncio.run(main())
        return 0


def ensure_state_dir(config: Config) -> Path:
    state = Path(config["state_dir"])
    state.mkdir(parents=True, exist_ok=True)
    return state
