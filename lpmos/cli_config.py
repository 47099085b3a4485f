"""``lpmos config show``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from lpmos.cli import COMMANDS, all_settings
from lpmos.config import Config, Setting, resolve

HELP = "show the effective configuration and its sources"
DESCRIPTION = ("Print every setting with its effective value and where it came from "
               "(flag, env LPMOS_*, the config file, or default). Secrets are masked.")
SETTINGS: tuple[Setting, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["show"], help="what to do (show)")
    parser.add_argument("--for", dest="for_command", default=None,
                        choices=[c for c in COMMANDS if c not in ("config", "token")],
                        help="include the settings of this service (default: every service "
                             "whose module is installed)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def run(config: Config, args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    config_file = args.config or (Path(os.environ["LPMOS_CONFIG"])
                                  if os.environ.get("LPMOS_CONFIG") else None)
    # keys of the file that no command reads were reported on stderr by lpmos.cli
    full = resolve(all_settings(args.for_command)[0], flags, os.environ, config_file)
    rows = full.describe()
    if args.json:
        print(json.dumps({k: {"value": v, "source": s} for k, v, s in rows}, indent=2))
        return 0
    print(f"# config file: {full.config_file or 'none'}")
    width = max(len(k) for k, _, _ in rows)
    vwidth = min(48, max(len(v) for _, v, _ in rows))
    for key, value, source in rows:
        print(f"{key:<{width}}  {value:<{vwidth}}  ({source})")
    return 0
