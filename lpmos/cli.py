"""The ``lpmos`` command: one CLI, one subcommand per service or tool.

Each subcommand lives in the package that owns it and exposes:

* ``HELP`` — one line for ``lpmos --help``;
* ``SETTINGS`` — the :class:`lpmos.config.Setting` s it takes beyond
  :data:`lpmos.config.COMMON` (each becomes a flag with its help);
* ``add_arguments(parser)`` — optional, for positional arguments and actions;
* ``run(config, args) -> int`` — the exit code.

Only the chosen subcommand's module is imported, so ``lpmos agent`` works on
an install that has the agent's dependencies only.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from lpmos.config import (
    COMMON,
    Config,
    ConfigError,
    Setting,
    parse_bool,
    resolve,
    settings_by_key,
    unknown_keys,
)
from lpmos.store import StoreUnavailable

#: name → (module, one-line help).  Order is the order of ``lpmos --help``.
COMMANDS: dict[str, tuple[str, str]] = {
    "control-plane": ("web.cli", "run the web console and REST API (default 127.0.0.1:8080)"),
    "regional": ("bootsvc.cli", "run a regional boot node: ProxyDHCP, TFTP and boot HTTP"),
    "agent": ("agent.cli", "run the live-image agent, or print this host's inventory"),
    "demo": ("lab.demo", "run everything on this machine with a QEMU lab"),
    "config": ("lpmos.cli_config", "show the effective configuration and its sources"),
    "token": ("lpmos.cli_token", "create, list and revoke API tokens and users"),
    "render": ("bootsvc.render_cli", "preview a rendered boot script or install config"),
    "login": ("lpmos.cli_client", "API client: store a control plane's URL and token as a profile"),
    "task": ("lpmos.cli_client", "API client: create, list, show, approve ... install tasks"),
    "server": ("lpmos.cli_client", "API client: list and show discovered machines"),
    "node": ("lpmos.cli_client", "API client: list the regional nodes alive"),
    "audit": ("lpmos.cli_client", "API client: list audit records"),
    "template": ("lpmos.cli_client", "API client: list and show task templates"),
    "webhook": ("lpmos.cli_client", "API client: manage outbound webhooks (admins)"),
    "image": ("lpmos.cli_client", "API client: add, list, show and remove managed OS images"),
    "completion": ("lpmos.cli_client", "print a shell completion script (bash)"),
}

EXIT_USAGE = 2


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n"
                              f"Run '{self.prog} --help' for the options.\n")


def add_setting_flags(parser: argparse.ArgumentParser, settings: Sequence[Setting]) -> None:
    for s in settings:
        default = s.default
        if isinstance(default, list):
            default = ",".join(str(d) for d in default) or "none"
        shown = "********" if s.secret and default else default
        choices = getattr(s.parse, "choices", None)
        metavar = s.metavar or ("|".join(choices) if choices else s.key.split(".")[-1].upper())
        extra: dict[str, Any] = {}
        if s.parse is parse_bool:
            # a boolean flag given alone means true (``--no-reboot``); a value still works
            extra = {"nargs": "?", "const": "true"}
            metavar = s.metavar or "on|off"
            shown = "on" if default else "off"
        parser.add_argument(
            s.flag, dest=s.dest, default=None, metavar=metavar,
            help=f"{s.help} (default: {shown}; env {s.env_var}; file key {s.key})", **extra,
        )


def load_command(name: str) -> ModuleType:
    module_name = COMMANDS[name][0]
    try:
        return importlib.import_module(module_name)
    except ImportError as exc:
        sys.stderr.write(
            f"lpmos {name}: cannot load {module_name}: {exc}.\n"
            "This install lacks what the command needs; install the project with "
            "'pip install lpmos[server]' (or run 'make setup').\n")
        raise SystemExit(EXIT_USAGE) from None


def command_settings(module: ModuleType) -> list[Setting]:
    """A command's settings: the common ones (state dir, etcd, log level ...)
    unless the module says ``COMMON_SETTINGS = False`` (the API client, which
    talks only to a control plane's REST API), then its own."""
    common = COMMON if getattr(module, "COMMON_SETTINGS", True) else ()
    return settings_by_key([common, getattr(module, "SETTINGS", ())])


def all_settings(only: str | None = None) -> tuple[list[Setting], list[str]]:
    """The settings of every command (or of ``only``), and the commands whose
    module is not installed here (their settings are unknown)."""
    groups: list[tuple[Setting, ...]] = [COMMON]
    missing = []
    for name, (module_name, _help) in COMMANDS.items():
        if only is not None and name != only:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            missing.append(name)
            continue
        groups.append(tuple(getattr(module, "SETTINGS", ())))
    return settings_by_key(groups), missing


def ignored_file_keys(config: Config, module: ModuleType) -> list[str]:
    """Lines for the config file's keys that no command reads.  A key another
    command reads is fine: one file serves every service of a host.  Nothing
    is reported when some command's module is not installed, since its keys
    cannot be told from typos."""
    own = {s.key for s in command_settings(module)}
    if all(key in own for key in config.file_keys):
        return []
    settings, missing = all_settings()
    if missing:
        return []
    return unknown_keys(config.file_keys, (s.key for s in settings))


def build_parser(selected: str | None) -> tuple[argparse.ArgumentParser, ModuleType | None]:
    parser = _Parser(
        prog="lpmos",
        description="LPMOS bare-metal provisioning. Every setting can also come from an "
                    "LPMOS_* environment variable or the TOML config file; flags win over "
                    "the environment, which wins over the file, which wins over defaults.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    module = None
    for name, (_mod, help_text) in COMMANDS.items():
        if name == selected:
            module = load_command(name)
            p = sub.add_parser(name, help=help_text,
                               description=getattr(module, "DESCRIPTION", help_text))
            p.add_argument("--config", type=Path, default=None, metavar="FILE",
                           help="TOML configuration file (default: /etc/lpmos/lpmos.toml "
                                "when it exists; env LPMOS_CONFIG)")
            add_arguments = getattr(module, "add_arguments", None)
            if add_arguments is not None:
                add_arguments(p)
            add_setting_flags(p, command_settings(module))
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser, module


def config_for(module: ModuleType, args: argparse.Namespace,
               environ: dict[str, str] | None = None) -> Config:
    environ = dict(os.environ) if environ is None else environ
    config_file = args.config
    if config_file is None and environ.get("LPMOS_CONFIG"):
        config_file = Path(environ["LPMOS_CONFIG"])
    flags = {k: v for k, v in vars(args).items() if v is not None}
    return resolve(command_settings(module), flags, environ, config_file)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if a in COMMANDS), None)
    parser, module = build_parser(selected)
    args = parser.parse_args(argv)
    if args.command is None or module is None:
        parser.print_help()
        return EXIT_USAGE if args.command is None else 0
    try:
        config = config_for(module, args)
    except ConfigError as exc:
        sys.stderr.write(f"lpmos {args.command}: {exc}\n")
        return EXIT_USAGE
    for line in ignored_file_keys(config, module):
        sys.stderr.write(f"lpmos {args.command}: warning: config file {config.config_file}: "
                         f"{line}\n")
    try:
        return int(module.run(config, args) or 0)
    except ConfigError as exc:
        sys.stderr.write(f"lpmos {args.command}: {exc}\n")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (``lpmos config show | head``): not an error; stdout
        # points at /dev/null so that the interpreter's final flush stays quiet
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (OSError, StoreUnavailable) as exc:
        # a port in use, a missing interface, an unreachable etcd: the operator's
        # to fix, so one line that says what, not a traceback
        what = str(exc)
        if isinstance(exc, StoreUnavailable):
            endpoints = ", ".join(config.get("etcd.endpoints") or []) or "the embedded etcd"
            what = f"etcd is unavailable ({endpoints}): {exc}"
        sys.stderr.write(f"lpmos {args.command}: {what}\n")
        if config.get("log_level") == "debug":
            traceback.print_exc()
        else:
            sys.stderr.write(f"lpmos {args.command}: (--log-level debug prints the traceback)\n")
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
