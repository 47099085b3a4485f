"""``lpmos config show``: the effective configuration and where each value came from."""

from __future__ import annotations

import argparse
import importlib
import json
import os
from pathlib import Path

from lpmos.cli import COMMANDS
from lpmos.config import COMMON, Config, Setting, resolve, settings_by_key

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


def _all_settings(only: str | None) -> list[Setting]:
    groups: list[tuple[Setting, ...]] = [COMMON]
    for name, (module_name, _help) in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        groups.append(tuple(getattr(module, "SETTINGS", ())))
    return settings_by_key(groups)


def run(config: Config, args: argparse.Namespace) -> int:
    flags = {k: v for k, v in vars(args).items() if v is not None}
    config_file = args.config or (Path(os.environ["LPMOS_CONFIG"])
                                  if os.environ.get("LPMOS_CONFIG") else None)
    full = resolve(_all_settings(args.for_command), flags, os.environ, config_file)
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
