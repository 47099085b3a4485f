"""``lpmos regional``: run a regional boot node."""

from __future__ import annotations

import argparse
import importlib
import logging

from bootsvc.settings import NODE_SETTINGS
from lpmos.config import Config, Setting, settings_by_key
from lpmos.runtime import open_store, setup_logging

HELP = "run a regional boot node: ProxyDHCP, TFTP and boot HTTP"
DESCRIPTION = (
    "Run a regional boot node for one IDC: ProxyDHCP (UDP 67 and 4011), TFTP (UDP 69) and "
    "boot HTTP (8081). It watches /os/{idc}/ in etcd and answers boots from that cache; "
    "only installs go back to etcd (a fresh read and a compare-and-swap claim). Every port "
    "and address is a flag, so it runs unprivileged on loopback high ports for tests. "
    "Binding ports below 1024 needs root or CAP_NET_BIND_SERVICE.")

_SERVICE_MODULES = ("bootsvc.dhcp.settings", "bootsvc.tftp.settings", "bootsvc.http.settings",
                    "bootsvc.images.settings",
                    "bootsvc.power.settings",
                    "bootsvc.dhcp6.settings",
                    "bootsvc.state.install_log")


def _service_settings() -> list[Setting]:
    groups: list[tuple[Setting, ...]] = [NODE_SETTINGS]
    for name in _SERVICE_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            logging.getLogger(__name__).debug("%s not available: %s", name, exc)
            continue
        groups.append(tuple(getattr(module, "SETTINGS", ())))
    return settings_by_key(groups)


SETTINGS: tuple[Setting, ...] = tuple(_service_settings())


def run(config: Config, args: argparse.Namespace) -> int:
    from bootsvc.node import RegionalNode, ensure_state_dir
    from lpmos.sdnotify import Notifier

    setup_logging(config["log_level"], name=f"regional[{config['regional.idc']}]")
    # before the embedded etcd starts: it must not inherit $NOTIFY_SOCKET
    notifier = Notifier.from_environ()
    ensure_state_dir(config)
    with open_store(config) as handle:
        node = RegionalNode(config, handle.store, handle.keys,
                            maintenance=handle.maintenance(), notifier=notifier)
        return node.run_forever()
