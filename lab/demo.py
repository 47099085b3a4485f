"""``lpmos demo`` — everything on this machine with a QEMU lab (``make demo``).

It builds (or reuses) the live agent image and the lab OS image, starts a
private etcd, the control plane, a regional node on an isolated lab network
(a network namespace with dnsmasq as the site's DHCP server) and QEMU VMs that
network-boot through the real ProxyDHCP, TFTP and boot HTTP into the agent.
It prints the console URL and the demo users, then follows the VMs' boot
stages until Ctrl-C, and removes everything it created on the way out.

``--lab-only`` (``make lab``) skips the control plane and the demo users:
the lab, its etcd and node, and the VMs, for working on the boot path.

Needs root (network namespaces, taps, DHCP/TFTP ports) and a source
checkout (the image builds read images/).
See docs/lab.md.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from lpmos.config import Config, Setting, choice_list, int_range, parse_hostport

HELP = "run everything on this machine with a QEMU lab"
DESCRIPTION = ("Start a private etcd, the control plane, a regional node on an isolated lab "
               "network and QEMU VMs that network-boot through it; print the console URL and "
               "the demo users; stop everything on Ctrl-C. Needs root and a source checkout.")

SETTINGS: tuple[Setting, ...] = (
    Setting("demo.listen", "--listen", "127.0.0.1:8080", parse_hostport,
            "HOST:PORT of the demo's control plane (the console URL)", metavar="HOST:PORT"),
    Setting("demo.vms", "--vms", 2, int_range(0, 8),
            "how many lab VMs to boot (they alternate BIOS and UEFI)", metavar="N"),
    Setting("demo.firmware", "--firmware", ["bios", "uefi"], choice_list("bios", "uefi"),
            "firmware of the VMs, in turn", metavar="LIST"),
    Setting("demo.vm_memory", "--vm-memory", 1024, int_range(512, 8192),
            "memory of each VM in MiB", metavar="MB"),
)

REPO = Path(__file__).resolve().parent.parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lab-only", action="store_true",
                        help="only the lab: etcd, regional node and VMs (no control plane)")


def _source_tree() -> None:
    """The image builds read their inputs from the checkout (images/live,
    images/lab-os), which an installed wheel does not carry."""
    if not (REPO / "images" / "live").is_dir() or not (REPO / "images" / "lab-os").is_dir():
        raise SystemExit("lpmos demo: needs a source checkout (images/ next to lab/)")


def _print(msg: str = "") -> None:
    sys.stdout.write(msg + "\n")
    sys.stdout.flush()


def run(config: Config, args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        sys.stderr.write("lpmos demo: the lab needs root (network namespaces, taps, DHCP and "
                         "TFTP ports): run 'sudo make demo'\n")
        return 1
    _source_tree()
    from images import build
    from lab.runner import Lab, LabError, control_plane
    from lpmos.runtime import setup_logging

    setup_logging(config["log_level"], name="lpmos-demo")
    # Ctrl-C must unwind even when started in the background of a script
    # (where SIGINT arrives ignored): the lab's __exit__ does the cleanup
    signal.signal(signal.SIGINT, signal.default_int_handler)
    state = Path(config["state_dir"])
    started = time.monotonic()
    try:
        build.build_live()
        build.build_lab_os()
        build.build_debian_cloud()
    except build.BuildError as exc:
        sys.stderr.write(f"lpmos demo: image build failed: {exc}\n")
        return 1
    node_args = ["--etcd-prefix", config["etcd.prefix"]]
    if config.get("catalog"):
        node_args += ["--catalog", str(config["catalog"])]
    try:
        with Lab(state / "lab", etcd_endpoints=config["etcd.endpoints"], node_args=node_args,
                 memory_mb=config["demo.vm_memory"]) as lab:
            host, port = config["demo.listen"]
            if args.lab_only:
                _boot_and_follow(lab, config, None, started)
                return 0
            with control_plane(lab, port=port, listen=host,
                               extra=["--etcd-prefix", config["etcd.prefix"]]) as url:
                users = _demo_users(lab, config)
                _boot_and_follow(lab, config, (url, users), started)
    except LabError as exc:
        sys.stderr.write(f"lpmos demo: {exc}\n")
        return 1
    except KeyboardInterrupt:
        pass
    except SystemExit:   # SIGTERM / SIGHUP (the lab turns them into SystemExit)
        _print("lpmos demo: terminated; the lab network, VMs, node, control plane and etcd "
               "are gone")
        raise
    _print("lpmos demo: stopped; the lab network, VMs, node, control plane and etcd are gone")
    return 0


def _demo_users(lab: Any, config: Config) -> list[tuple[str, str, str]]:
    from lpmos.auth import Auth
    from lpmos.store.etcd import EtcdStore
    from lpmos.store.keys import Keys

    try:
        from web.demo_users import ensure_demo_users
    except ImportError:
        return []
    store = EtcdStore(lab.etcd_endpoints, timeout=5.0)
    try:
        return ensure_demo_users(Auth(store, Keys(config["etcd.prefix"])))
    finally:
        store.close()


def _boot_and_follow(lab: Any, config: Config,
                     console: tuple[str, list[tuple[str, str, str]]] | None,
                     started: float) -> None:
    firmwares = config["demo.firmware"]
    # 4 GiB disks: room for the 2 GiB Debian image, its seed and its growth
    vms = [lab.boot_vm(f"{firmwares[i % len(firmwares)]}-{i + 1}",
                       firmware=firmwares[i % len(firmwares)], disk_gb=4)
           for i in range(config["demo.vms"])]
    _print("")
    _print(f"LPMOS demo is up ({time.monotonic() - started:.0f} s)")
    if console is not None:
        url, users = console
        _print(f"  console:       {url}")
        for name, role, password in users:
            _print(f"  user {name:<10} role {role:<9} password {password}")
    _print(f"  etcd:          {', '.join(lab.etcd_endpoints)}")
    _print(f"  regional node: {lab.node_url} (namespace {lab.ns}; logs in {lab.workdir})")
    for vm in vms:
        _print(f"  VM {vm.name}: serial {vm.serial}, MAC {vm.mac}, console log {vm.serial_log}")
    _print("The VMs appear in the console as they finish discovery; create a task for one "
           "and approve it to watch the install: image 'debian-12-generic' (real Debian 12, "
           "cloud-init; give it your SSH key and a static address such as 10.77.0.211/24, "
           f"then log in with: ip netns exec {lab.ns} ssh debian@10.77.0.211) or 'lab-os' "
           "(the tiny lab OS, a minute faster). Ctrl-C stops everything.")
    shown: dict[str, int] = {vm.name: 0 for vm in vms}
    while True:
        for vm in vms:
            events = list(vm.events)
            for event in events[shown[vm.name]:]:
                _print(f"  [{vm.name} +{event.at:6.1f} s] {event.stage}: {event.line[:100]}")
            shown[vm.name] = len(events)
        time.sleep(1.0)
