"""``lpmos agent``: the live-image agent, or this host's inventory as JSON.

    lpmos agent [run]            register, heartbeat, wait for the task, install
    lpmos agent inventory        print this host's inventory (schema v1) and exit
    lpmos agent --once           register, print the inventory and the node's answer, exit

The node's URL comes from ``--server`` or ``lpmos.server=URL`` on the kernel
command line (the live image).  Needs only ``pip install lpmos[agent]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from lpmos.config import (
    Config,
    ConfigError,
    Setting,
    choice,
    float_range,
    parse_bool,
    parse_optional_path,
    parse_optional_str,
    parse_optional_url,
)

HELP = "run the live-image agent, or print this host's inventory"
DESCRIPTION = ("The live-image agent. 'run' (default) registers with the regional node, keeps "
               "its lease alive, waits for its task and installs it; 'inventory' prints this "
               "host's inventory as JSON; --once registers, prints the inventory and the "
               "node's answer and exits. The node's URL is --server or lpmos.server= on the "
               "kernel command line.")

SETTINGS: tuple[Setting, ...] = (
    Setting("agent.server", "--server", None, parse_optional_url,
            "base URL of the regional node (default: lpmos.server= on the kernel command line)",
            metavar="URL"),
    Setting("agent.spool_dir", "--spool-dir", None, parse_optional_path,
            "directory of the event spool, the token and install checkpoints "
            "(default: STATE_DIR/agent)", metavar="DIR"),
    Setting("agent.no_reboot", "--no-reboot", False, parse_bool,
            "do not reboot after the install; exit instead"),
    Setting("agent.target", "--target", None, parse_optional_path,
            "install to this block device or plain file instead of choosing a disk by the "
            "task's root-device hints", metavar="PATH"),
    Setting("agent.allow_removable", "--allow-removable", False, parse_bool,
            "allow installing to a removable or USB disk"),
    Setting("agent.deadline", "--deadline", 600.0, float_range(0.0, 7 * 86400.0),
            "give up registering after this many seconds (0: never)", metavar="SECONDS"),
    Setting("agent.set_clock", "--set-clock", "auto", choice("auto", "yes", "no"),
            "set the clock from the node's time when it is off by minutes: auto = only in "
            "the live image (lpmos.server= on the kernel command line)"),
    Setting("agent.boot_mac", "--boot-mac", None, parse_optional_str,
            "MAC the machine booted from (default: BOOTIF= on the kernel command line)",
            metavar="MAC"),
    Setting("agent.http_timeout", "--http-timeout", 10.0, float_range(0.5, 300.0),
            "deadline of each HTTP request to the node (long polls add their wait)",
            metavar="SECONDS"),
    Setting("agent.stall_timeout", "--stall-timeout", 600.0, float_range(1.0, 86400.0),
            "fail the install when the image download makes no progress for this long",
            metavar="SECONDS"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", nargs="?", choices=("run", "inventory"), default="run",
                        help="run (default): the agent; inventory: print this host's "
                             "inventory as JSON and exit")
    parser.add_argument("--once", action="store_true",
                        help="register (retrying an unreachable node for up to 30 s unless "
                             "--deadline is given), print the inventory and the node's "
                             "answer, exit")


def _boot_params() -> Any:
    from agent.cmdline import parse_cmdline, read_cmdline

    return parse_cmdline(read_cmdline())


def _boot_mac(config: Config, params: Any) -> str | None:
    from lpmos.models import ValidationError, normalize_mac

    raw = config["agent.boot_mac"]
    if raw:
        try:
            return normalize_mac(raw, "agent.boot_mac")
        except ValidationError as exc:
            raise ConfigError(str(exc)) from None
    return params.boot_mac  # type: ignore[no-any-return]


#: how long ``--once`` retries an unreachable node unless --deadline says otherwise
ONCE_DEADLINE = 30.0


def _deadline(config: Config, once: bool) -> float:
    """The agent's deadline; ``--once`` is a check run by a person, who wants
    an answer in seconds, not the install's default of many minutes."""
    if once and config.sources.get("agent.deadline") == "default":
        return min(ONCE_DEADLINE, float(config["agent.deadline"]) or ONCE_DEADLINE)
    return float(config["agent.deadline"])


def run(config: Config, args: argparse.Namespace) -> int:
    from lpmos.runtime import setup_logging

    setup_logging(config["log_level"], name="lpmos-agent")
    params = _boot_params()
    boot_mac = _boot_mac(config, params)
    if args.action == "inventory" and not args.once:
        from agent.inventory import collect_inventory

        json.dump(collect_inventory(boot_mac=boot_mac), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0

    from agent.client import ClientError
    from agent.runner import Agent, AgentOptions

    server = config["agent.server"] or params.server
    if not server:
        raise ConfigError("agent.server: no --server given and no lpmos.server= on the "
                          "kernel command line")
    spool_dir = config["agent.spool_dir"] or Path(config["state_dir"]) / "agent"
    opts = AgentOptions(
        server=server, spool_dir=Path(spool_dir), no_reboot=config["agent.no_reboot"],
        target=config["agent.target"], allow_removable=config["agent.allow_removable"],
        deadline=_deadline(config, args.once), set_clock=config["agent.set_clock"],
        boot_mac=boot_mac, live=params.live, http_timeout=config["agent.http_timeout"],
        stall_timeout=config["agent.stall_timeout"],
    )
    try:
        agent = Agent(opts)
    except OSError as exc:
        sys.stderr.write(f"lpmos agent: cannot use the spool directory {spool_dir}: {exc}\n")
        return 2
    if args.once:
        body = agent.registration_body()
        try:
            answer = agent.register(body)
        except ClientError as exc:
            sys.stderr.write(f"lpmos agent: registration failed: {exc}\n")
            return 1
        if answer.get("token"):
            answer = dict(answer, token=f"(issued; saved to {opts.spool_dir / 'token'})")
        json.dump({"inventory": body["inventory"], "registration": {
            k: v for k, v in body.items() if k != "inventory"}, "answer": answer},
            sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    return agent.run()
