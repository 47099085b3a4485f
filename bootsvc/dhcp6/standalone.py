"""``python -m bootsvc.dhcp6.standalone``: the DHCPv6 service alone.

For the network tests (a namespace per test) and development; prints
``READY`` once bound; SIGTERM/SIGINT stop it and write the counters to
``--stats-file``.  Bad settings exit 2 with one line on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from bootsvc.dhcp.standalone import serve_until_signalled
from bootsvc.dhcp6.service import Dhcp6Service, Dhcp6Settings
from bootsvc.policy.bootfile import BootPolicy, parse_bootfile
from bootsvc.policy.bootfile6 import Boot6Policy
from bootsvc.state.dhcp_leases import parse_range6
from lpmos.store.keys import Keys

PROG = "python -m bootsvc.dhcp6.standalone"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--interface", required=True, help="the interface to serve")
    p.add_argument("--mode", choices=("proxy", "full"), default="proxy",
                   help="proxy: boot options only, next to the site's DHCPv6 server "
                        "(default); full: addresses too, from --range (lab segments)")
    p.add_argument("--range", default=None, metavar="A-B",
                   help="full mode: the IPv6 addresses to hand out")
    p.add_argument("--lease-time", type=int, default=3600, metavar="SECONDS")
    p.add_argument("--tftp-address", default="", metavar="ADDR",
                   help="the node's IPv6 address TFTP boot file URLs name")
    p.add_argument("--advertise-url", default="", metavar="URL",
                   help="the node's boot HTTP over IPv6, e.g. http://[fd00::1]:8080")
    p.add_argument("--efi64", default="ipxe.efi", help="x86-64 UEFI boot file (or none)")
    p.add_argument("--bios", default="undionly.kpxe", help="BIOS boot file (or none)")
    p.add_argument("--arm64", default="none", help="arm64 UEFI boot file (or none)")
    p.add_argument("--port", type=int, default=547, help="server port (tests)")
    p.add_argument("--client-port", type=int, default=546, help="client port (tests)")
    p.add_argument("--proxy-port", type=int, default=4011, help="boot service port (tests)")
    p.add_argument("--etcd-endpoints", default="", help="etcd for full-mode leases")
    p.add_argument("--etcd-prefix", default="/os")
    p.add_argument("--idc", default="default")
    p.add_argument("--stats-file", default=None, help="write counters as JSON at exit")
    p.add_argument("--log-level", default="info")
    return p


def settings_from(args: argparse.Namespace) -> Dhcp6Settings:
    url = args.advertise_url.rstrip("/")
    boot = BootPolicy(bootfiles={"bios": parse_bootfile(args.bios), "efi32": None,
                                 "efi64": parse_bootfile(args.efi64),
                                 "arm64": parse_bootfile(args.arm64)},
                      script_url=f"{url}/boot.ipxe" if url else "",
                      http_base=f"{url}/ipxe" if url else "")
    rng = parse_range6(args.range)
    if args.mode == "full" and rng is None:
        raise ValueError("--mode full needs --range")
    return Dhcp6Settings(interface=args.interface, policy=Boot6Policy(boot, args.tftp_address),
                         mode=args.mode, range=rng, lease_time=args.lease_time,
                         listen_port=args.port, client_port=args.client_port,
                         proxy_port=args.proxy_port)



def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from(args)
    except ValueError as exc:
        sys.stderr.write(f"{PROG}: {exc}\n")
        return 2
    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    store: Any = None
    if args.etcd_endpoints:
        from lpmos.store.etcd import EtcdStore
        store = EtcdStore(args.etcd_endpoints.split(","), timeout=5.0)
    service = Dhcp6Service(settings, store=store, keys=Keys(args.etcd_prefix), idc=args.idc)
    try:
        asyncio.run(serve_until_signalled(service, lambda: "READY"))
    finally:
        if args.stats_file:
            with open(args.stats_file, "w") as fh:
                json.dump(service.metrics.snapshot(), fh, indent=1, sort_keys=True)
        if store is not None:
            store.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
