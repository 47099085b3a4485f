"""``python -m bootsvc.dhcp.standalone``: the DHCP service alone, in its own process.

For development, the network tests and the benchmarks (``bench/dhcp_bench.py``
starts it inside a network namespace), which need the DHCP service without
TFTP, boot HTTP or an etcd of their own.  The regional node (``lpmos
regional``) is the production entry point and runs the same
:class:`bootsvc.dhcp.service.DhcpService`.

The process speaks a small protocol to whoever started it: it prints
``READY <ports json>`` on stdout once bound, and on SIGTERM/SIGINT stops,
writes its counters to ``--stats-file`` (JSON) if given, and exits 0.  Bad
settings exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, Protocol

from bootsvc.context import NodeContext
from bootsvc.dhcp.service import DhcpService
from bootsvc.dhcp.settings import SETTINGS
from bootsvc.netif import default_server_ip
from bootsvc.settings import NODE_SETTINGS
from bootsvc.state.machines import MachineIndex
from lpmos.cli import add_setting_flags
from lpmos.config import COMMON, Config, ConfigError, Setting, resolve, settings_by_key
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys

PROG = "python -m bootsvc.dhcp.standalone"
#: the boot HTTP port machines are sent to when no --advertise-url is given
#: (this process serves no HTTP; the node it stands in for does, there)
HTTP_PORT = 8081


def standalone_settings() -> list[Setting]:
    """The settings this runner takes: the common ones, the node's and DHCP's."""
    return settings_by_key([COMMON, NODE_SETTINGS, SETTINGS])


def advertise_url(configured: str | None, server_ip: str) -> str:
    """The boot HTTP base URL handed to machines: ``--advertise-url``, else
    the node's HTTP port on ``server_ip``, else none (no HTTP answers)."""
    if configured:
        return configured
    return f"http://{server_ip}:{HTTP_PORT}" if server_ip else ""


def _open_store(config: Config) -> Any:
    """etcd when ``--etcd-endpoints`` names one, else a private in-memory store."""
    if config["etcd.endpoints"]:
        from lpmos.store.etcd import EtcdStore
        return EtcdStore(config["etcd.endpoints"], timeout=config["etcd.timeout"])
    from lpmos.store.memory import MemoryStore
    return MemoryStore()


def _node_context(config: Config, store: Any) -> NodeContext:
    keys = Keys(config["etcd.prefix"])
    idc = config["regional.idc"]
    cache = WatchCache(store, keys.idc(idc), name="dhcp").start(wait=2.0)
    # the node's rule, without its last resort: with no address configured
    # each reply answers as the address of the interface it arrived on
    server_ip = default_server_ip(config, fallback=False)
    return NodeContext(config=config, idc=idc, node_name=config["regional.node_name"],
                       store=store, keys=keys, cache=cache,
                       machines=MachineIndex(cache, keys, idc),
                       advertise_url=advertise_url(config["regional.advertise_url"], server_ip),
                       server_ip=server_ip or "")


class _Service(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def serve_until_signalled(service: _Service, ready: Callable[[], str]) -> None:
    """Start ``service``, print ``ready()`` (the READY line), run until
    SIGTERM or SIGINT, stop it."""
    await service.start()
    gc.freeze()     # start-up objects out of the collector's way (fewer long pauses)
    print(ready(), flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, done.set)
    await done.wait()
    await service.stop()


def main(argv: list[str] | None = None) -> int:
    """Only the DHCP service, with a private in-memory store unless
    ``--etcd-endpoints`` is given.  Prints ``READY <ports json>`` once bound;
    on SIGTERM/SIGINT writes the counters to ``--stats-file`` (JSON) and
    exits.  The regional node (``lpmos regional``) is the production entry
    point."""
    settings = standalone_settings()
    parser = argparse.ArgumentParser(prog=PROG, description=main.__doc__)
    parser.add_argument("--stats-file", default=None, help="write counters as JSON at exit")
    add_setting_flags(parser, settings)
    args = parser.parse_args(argv)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    try:
        config = resolve(settings, flags, config_file=None)
    except ConfigError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2
    logging.basicConfig(level=config["log_level"].upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store = _open_store(config)
    ctx = _node_context(config, store)
    try:
        service = DhcpService(ctx)
        asyncio.run(serve_until_signalled(service,
                                          lambda: "READY " + json.dumps(service.ports)))
    finally:
        ctx.cache.stop()
        if args.stats_file:
            with open(args.stats_file, "w") as fh:
                json.dump(ctx.metrics.snapshot(), fh, indent=1, sort_keys=True)
        store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
