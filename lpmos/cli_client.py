"""The API client commands: ``lpmos login``, ``task``, ``server``, ``node``,
``audit``, ``template`` and ``completion``.

They talk only to the control plane's REST API (:mod:`lpmos.client`), so
they work from an operator's laptop against a remote control plane, with
the token of a profile that ``lpmos login`` stored.  One module serves
every noun: :mod:`lpmos.cli` registers each noun under its own name, and
:func:`add_arguments` builds the noun its parser names.

Output is a readable table (the default), or the API's JSON (``--output
json``; lists as one JSON array of their items, every page when ``--all``),
or the same as YAML.  The exit code says what went wrong
(:data:`lpmos.client.EXIT_CODES`); errors are one line on stderr.
"""

from __future__ import annotations

import argparse
import calendar
import datetime
import getpass
import json
import os
import re
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lpmos.client import (
    DEFAULT_PROFILE,
    EXIT_CODES,
    EXIT_OK,
    EXIT_USAGE,
    ApiClient,
    ApiRefused,
    ClientError,
    Profile,
    normalize_url,
    profiles_path,
    read_profiles,
    validate_profile_name,
    write_profiles,
)
from lpmos.config import Config, Setting
from lpmos.states import TaskStatus

HELP = "API client: log in, tasks, servers, nodes, audit, templates"
SETTINGS: tuple[Setting, ...] = ()

OUTPUTS = ("table", "json", "yaml")
PAGE_MAX = 500                  # the API's largest page
LIST_MAX = 100_000              # --all stops here: a bound on what one command prints
CELL_MAX = 48                   # table cells wider than this are cut, but the last column

#: noun → its description (``lpmos NOUN --help``)
DESCRIPTIONS = {
    "login": "Store a profile: the control plane's URL and an API token (from 'lpmos token "
             "create' on the control plane, or the console). The token is checked against "
             "the API first. Profiles live in ~/.config/lpmos/profiles.toml (or "
             "$LPMOS_CLIENT_CONFIG), file mode 0600; the first one, or one given --default, "
             "is the default.",
    "task": "Install tasks through the REST API: create, list, show, approve, reject, cancel, "
            "retry, redeploy, delete, and the full install log. A task is named IDC/SN.",
    "server": "Discovered machines through the REST API: list and show (with inventory); "
              "their BMC (bmc-set, admins: the password is read from a file or standard "
              "input, never the command line; bmc-show never shows it) and power actions "
              "carried out by a regional node of the machine's IDC (power IDC/SN on, off, "
              "reset, cycle, pxe-once or status; --wait follows it to its result).",
    "node": "Regional boot nodes through the REST API: list those alive, per IDC.",
    "audit": "The audit log through the REST API: who did what, when, before and after.",
    "template": "Task templates through the REST API: list and show.",
    "webhook": "Outbound webhooks through the REST API (admins only): list, show, create, "
               "update, delete, and each webhook's delivery log. A new webhook's secret is "
               "printed once, when it is created; give your own with --secret-file.",
    "image": "Managed OS images through the REST API: list, show (per IDC and regional node: "
             "fetching with progress, ready, failed with the reason), add (an upload from this "
             "machine, streamed, or an http(s) URL with its sha256, which the nodes fetch) and "
             "remove (refused while an active task needs the image). Adding and removing need "
             "the admin role. 'add --wait' follows the image until every wanted IDC's nodes "
             "have it.",
    "completion": "Print a shell completion script. Bash: "
                  "'source <(lpmos completion bash)', or save it as "
                  "/etc/bash_completion.d/lpmos.",
}

#: noun → its actions, in the order of the help
ACTIONS: dict[str, tuple[str, ...]] = {
    "task": ("create", "list", "show", "approve", "reject", "cancel", "retry", "redeploy",
             "schedule", "release", "delete", "log"),
    "server": ("list", "show", "bmc-set", "bmc-show", "power"),
    "node": ("list",),
    "audit": ("list",),
    "template": ("list", "show"),
    "webhook": ("list", "show", "create", "update", "delete", "deliveries"),
    "image": ("list", "show", "add", "remove"),
}

#: the client reads no etcd, state dir or catalog: only its own flags
COMMON_SETTINGS = False


def exit_codes_epilog() -> str:
    lines = ["exit codes:"] + [f"  {code}  {text}" for code, text in EXIT_CODES]
    lines += ["", *textwrap.wrap(
        "connection: --profile NAME (env LPMOS_PROFILE) chooses the profile; --url and --token "
        "(env LPMOS_API_URL, LPMOS_API_TOKEN) override its values.", 79)]
    return "\n".join(lines)


# -- parsers ----------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The parser of the noun ``parser`` is for (its prog's last word)."""
    noun = parser.prog.split()[-1]
    parser.description = textwrap.fill(DESCRIPTIONS[noun], 79)
    parser.epilog = exit_codes_epilog()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    if noun == "completion":
        parser.add_argument("shell", choices=["bash"], help="the shell (bash)")
        return
    if noun == "login":
        _add_login(parser)
        return
    _add_connection(parser, in_action=False)
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True,
                                help=", ".join(ACTIONS[noun]))
    builders = {"task": _add_task, "server": _add_server, "node": _add_node,
                "audit": _add_audit, "template": _add_template, "webhook": _add_webhook,
                "image": _add_image}
    builders[noun](sub)


def _add_connection(parser: argparse.ArgumentParser, *, in_action: bool) -> None:
    """The flags of every call, on the noun and again on each action (so
    they work before or after it); an action's default is SUPPRESS, so an
    absent flag does not hide the noun's."""
    dflt: Any = argparse.SUPPRESS if in_action else None
    parser.add_argument("--profile", default=dflt, metavar="NAME",
                        help="the profile to use (default: the profiles file's default; "
                             "env LPMOS_PROFILE)")
    parser.add_argument("--url", default=dflt, metavar="URL",
                        help="control plane URL, over the profile's (env LPMOS_API_URL)")
    parser.add_argument("--token", default=dflt, metavar="TOKEN",
                        help="API token, over the profile's (env LPMOS_API_TOKEN)")
    parser.add_argument("--output", "-o", default=dflt, choices=OUTPUTS,
                        help="table (default), json or yaml")
    parser.add_argument("--timeout", type=float, default=dflt, metavar="SECONDS",
                        help="deadline of each API call (default: 10)")


def _action(sub: Any, name: str, help_text: str, handler: Handler) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + ".",
        epilog=exit_codes_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_connection(p, in_action=True)
    p.set_defaults(handler=handler)
    return p


def _add_ref(p: argparse.ArgumentParser, what: str = "task") -> None:
    p.add_argument("ref", metavar="IDC/SN", help=f"the {what}: its IDC and serial number")


def _add_revision(p: argparse.ArgumentParser) -> None:
    p.add_argument("--revision", type=int, default=None, metavar="N",
                   help="apply only if the task is still at this revision (else exit 5)")


def _add_paging(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--limit", type=int, default=default, metavar="N",
                   help=f"at most N items (1-{PAGE_MAX}, default {default})")
    p.add_argument("--all", action="store_true",
                   help="every item, page after page (ignores --limit)")


def _add_login(p: argparse.ArgumentParser) -> None:
    p.add_argument("url", metavar="URL", help="the control plane, e.g. https://lpmos.example:8080")
    p.add_argument("--token", default=None,
                   help="API token (default: env LPMOS_API_TOKEN, else asked for on the "
                        "terminal)")
    p.add_argument("--profile", default=None, metavar="NAME",
                   help=f"name of the profile to store (default: {DEFAULT_PROFILE})")
    p.add_argument("--default", action="store_true", dest="make_default",
                   help="make this profile the default (the first profile always is)")
    p.add_argument("--no-check", action="store_true",
                   help="store without checking the token against the API")
    p.add_argument("--output", "-o", default="table", choices=OUTPUTS,
                   help="table (default), json or yaml")
    p.add_argument("--timeout", type=float, default=10.0, metavar="SECONDS",
                   help="deadline of the check (default: 10)")


def _add_task(sub: Any) -> None:
    p = _action(sub, "create", "create a pending task", task_create)
    p.add_argument("--idc", required=True, help="the IDC (datacenter) of the machine")
    p.add_argument("--sn", required=True, help="the machine's serial number")
    p.add_argument("--mac", required=True, help="the machine's boot MAC")
    p.add_argument("--os-type", default=None, help="the OS to install (or from --template)")
    p.add_argument("--os-version", default=None, help="the OS version")
    p.add_argument("--image", default=None, help="a catalog image name")
    p.add_argument("--template", default=None, help="a task template filling what is left out")
    p.add_argument("--notes", default=None, help="free text stored with the task")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an install input (repeatable); VALUE is JSON when it parses as JSON, "
                        "else text: --param hostname=web-1 --param 'ssh_keys=[\"ssh-ed25519 "
                        "AAAA...\"]'")
    p.add_argument("--params", default=None, metavar="FILE",
                   help="install inputs as a JSON object from FILE ('-': stdin); --param wins")
    _add_schedule(p)

    p = _action(sub, "list", "list tasks, newest first", task_list)
    p.add_argument("--idc", default=None, help="only this IDC")
    p.add_argument("--status", default=None, metavar="STATUS[,STATUS]",
                   help="only these states: " + ", ".join(s.value for s in TaskStatus))
    p.add_argument("--search", "-q", default=None, metavar="TEXT",
                   help="text in SN, MAC, OS, users or notes")
    _add_paging(p, 50)

    p = _action(sub, "show", "show one task with its history and log tail", task_show)
    _add_ref(p)
    p.add_argument("--fresh", action="store_true",
                   help="read etcd rather than the control plane's cache")

    for name, verb, field in (("approve", "approve a pending task (approver role)", "notes"),
                              ("reject", "reject a pending task (approver role)", "notes"),
                              ("cancel", "cancel an active task (operator role)", "reason"),
                              ("retry", "install a failed task again (approver role)", "notes")):
        p = _action(sub, name, verb, task_transition)
        _add_ref(p)
        p.add_argument(f"--{field}", dest="note", default=None,
                       help=f"why (stored in the task's history as its {field})")
        _add_revision(p)

    p = _action(sub, "redeploy", "install a succeeded task again as a new attempt "
                                 "(approver role)", task_transition)
    _add_ref(p)
    p.add_argument("--notes", dest="note", default=None, help="why")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="an install input to change (repeatable; VALUE as for create; "
                        "KEY=null removes it)")
    _add_revision(p)

    p = _action(sub, "schedule", "change when a task may start (approver role); an option "
                                 "left out keeps its value", task_schedule)
    _add_ref(p)
    _add_schedule(p)
    p.add_argument("--clear", action="store_true", help="remove the schedule: start at once")
    p.add_argument("--notes", dest="note", default=None, help="why (in the audit record)")
    _add_revision(p)

    p = _action(sub, "release", "wipe a succeeded or failed machine's disks and power it off "
                                "(approver role)", task_transition)
    _add_ref(p)
    p.add_argument("--notes", dest="note", default=None, help="why")
    _add_revision(p)

    p = _action(sub, "delete", "delete a task that is not booting or installing", task_delete)
    _add_ref(p)
    _add_revision(p)

    p = _action(sub, "log", "print the full install log of an attempt (from its regional "
                            "node)", task_log)
    _add_ref(p)
    p.add_argument("--attempt", type=int, default=None, metavar="N",
                   help="the attempt (default: the current one)")


def _add_schedule(p: argparse.ArgumentParser) -> None:
    p.add_argument("--not-before", default=None, metavar="TIME",
                   help="do not start before TIME, ISO 8601 with a zone: 2026-12-04T22:00Z "
                        "('' removes it)")
    p.add_argument("--window", default=None, metavar="HH:MM-HH:MM",
                   help="start only inside this daily UTC window, e.g. 22:00-04:00 "
                        "('' removes it)")


def _add_server(sub: Any) -> None:
    p = _action(sub, "list", "list discovered machines", server_list)
    p.add_argument("--idc", default=None, help="only this IDC")
    p.add_argument("--search", "-q", default=None, metavar="TEXT",
                   help="text in SN, MAC, UUID, IP, vendor or product")
    _add_paging(p, 50)
    p = _action(sub, "show", "show one machine with its inventory and task", server_show)
    _add_ref(p, "machine")
    p = _action(sub, "bmc-set", "set a machine's BMC (admin)", server_bmc_set)
    _add_ref(p, "machine")
    p.add_argument("--driver", choices=POWER_DRIVERS, default=None,
                   help="redfish or ipmi (required the first time)")
    p.add_argument("--address", default=None,
                   help="the BMC's IP or host name (default: kept, or the inventory's)")
    p.add_argument("--port", type=int, default=None, help="default: 443 Redfish, 623 IPMI")
    p.add_argument("--user", default=None, help="the BMC user (required the first time)")
    p.add_argument("--password-file", default=None, metavar="PATH",
                   help="read the password from this file ('-': standard input); never on "
                        "the command line, where ps shows it (default: keep the stored one)")
    p.add_argument("--scheme", choices=("https", "http"), default=None,
                   help="Redfish: https (default) or http")
    p.add_argument("--insecure", action="store_true",
                   help="Redfish: do not verify the BMC's TLS certificate (self-signed)")
    p.add_argument("--system", default=None, metavar="PATH",
                   help="Redfish: /redfish/v1/Systems/ID when the BMC has several")
    p = _action(sub, "bmc-show", "show a machine's BMC record (never its password)",
                server_bmc_show)
    _add_ref(p, "machine")
    p = _action(sub, "power", "queue a power action; a regional node carries it out",
                server_power)
    _add_ref(p, "machine")
    p.add_argument("power_action", metavar="ACTION", choices=POWER_ACTIONS,
                   help=", ".join(POWER_ACTIONS))
    p.add_argument("--reason", default=None, help="why (kept with the request and in the audit)")
    p.add_argument("--wait", action="store_true",
                   help="wait for the result; exit 1 when it failed")
    p.add_argument("--wait-timeout", type=float, default=150.0, metavar="SECONDS",
                   help="give up waiting after this long (default 150)")


def _add_node(sub: Any) -> None:
    p = _action(sub, "list", "list the regional nodes alive", node_list)
    p.add_argument("--idc", default=None, help="only this IDC")


def _add_audit(sub: Any) -> None:
    p = _action(sub, "list", "list audit records, newest first", audit_list)
    p.add_argument("--actor", default=None, help="only this user (exact)")
    p.add_argument("--action", dest="audit_action", default=None,
                   help="only actions starting with this (task., task.approve)")
    p.add_argument("--target", default=None, help="only targets containing this text")
    p.add_argument("--since", default=None, metavar="WHEN",
                   help="from WHEN: 30m, 12h, 7d ago, a date (2026-01-31[T12:00:00], UTC) or "
                        "unix seconds (default: 30 days ago)")
    p.add_argument("--until", default=None, metavar="WHEN", help="up to WHEN (default: now)")
    p.add_argument("--oldest-first", action="store_true", help="oldest first")
    _add_paging(p, 100)


def _add_template(sub: Any) -> None:
    _action(sub, "list", "list task templates", template_list)
    p = _action(sub, "show", "show one task template", template_show)
    p.add_argument("name", help="the template's name")


#: the events a webhook may subscribe to (web.webhooks.EVENTS; the client
#: imports nothing of the server, and the API refuses any other)
WEBHOOK_EVENTS = ("task.state", "node.liveness")


def _add_webhook(sub: Any) -> None:
    _action(sub, "list", "list webhooks", webhook_list)
    p = _action(sub, "show", "show one webhook", webhook_show)
    p.add_argument("id", help="the webhook's id")
    p = _action(sub, "create", "create a webhook; prints its secret once", webhook_create)
    p.add_argument("receiver", metavar="RECEIVER_URL", help="where to POST (http or https)")
    _add_webhook_fields(p)
    p = _action(sub, "update", "change a webhook", webhook_update)
    p.add_argument("id", help="the webhook's id")
    p.add_argument("--receiver", default=None, metavar="URL",
                   help="a new receiver URL")
    _add_webhook_fields(p)
    p.add_argument("--enable", dest="enabled", action="store_const", const=True,
                   default=None, help="deliver again")
    p.add_argument("--revision", type=int, default=None, metavar="N",
                   help="apply only if the webhook is still at this revision (else exit 5)")
    p = _action(sub, "delete", "delete a webhook", webhook_delete)
    p.add_argument("id", help="the webhook's id")
    p = _action(sub, "deliveries", "a webhook's last delivery attempts, newest first (each "
                                   "control plane process keeps its own)", webhook_deliveries)
    p.add_argument("id", help="the webhook's id")


def _add_image(sub: Any) -> None:
    _action(sub, "list", "list managed images and how many nodes of each IDC have them",
            image_list)
    p = _action(sub, "show", "show one managed image, per IDC and regional node", image_show)
    p.add_argument("name", help="the image's name")
    p = _action(sub, "add", "add a managed image: --file to upload from here, or --from-url with "
                            "--sha256 for the nodes to fetch", image_add)
    p.add_argument("name", help="its name: 1-64 of a-z, 0-9, '.', '_', '-'")
    p.add_argument("--os-type", required=True, help="what tasks ask for, e.g. 'Debian 12'")
    p.add_argument("--os-family", required=True, choices=("ubuntu", "debian", "rhel", "lab"),
                   help="picks the install templates")
    p.add_argument("--version", default="", help="e.g. 12")
    p.add_argument("--format", default="", help="raw, qcow2, raw.zst, raw.xz, raw.gz or "
                   "installer (default: by the file name's suffix, else raw)")
    p.add_argument("--arch", dest="architectures", action="append", default=None,
                   metavar="ARCH", help="x86_64 (default) or arm64; repeat for several")
    p.add_argument("--idc", dest="idcs", action="append", default=None, metavar="IDC",
                   help="an IDC whose nodes should hold it; repeat; default: every IDC")
    p.add_argument("--file", action="append", default=[], metavar="[ROLE=]PATH",
                   help="upload this file (ROLE disk_image by default; kernel= and initrd= "
                        "for an installer); its sha256 is computed here and checked by the "
                        "control plane")
    p.add_argument("--from-url", dest="from_url", action="append", default=[],
                   metavar="[ROLE=]URL",
                   help="the nodes fetch the file from this http(s) URL (needs --sha256)")
    p.add_argument("--sha256", action="append", default=[], metavar="[ROLE=]HEX",
                   help="the file's sha256 (required with --from-url)")
    p.add_argument("--description", default="", help="what the image is")
    p.add_argument("--kernel-args", default="", help="default kernel arguments (installer)")
    p.add_argument("--disk-size", type=int, default=0, metavar="BYTES",
                   help="the virtual disk's size, for compressed images")
    p.add_argument("--wait", action="store_true",
                   help="follow the image until every wanted IDC's nodes have it ready "
                        "(exit 1 when one fails it)")
    p.add_argument("--wait-timeout", type=float, default=3600.0, metavar="SECONDS",
                   help="how long --wait waits (default 3600)")
    p = _action(sub, "remove", "remove a managed image; every node frees its copy",
                image_remove)
    p.add_argument("name", help="the image's name")


def _add_webhook_fields(p: argparse.ArgumentParser) -> None:
    p.add_argument("--event", dest="events", action="append", default=None,
                   choices=WEBHOOK_EVENTS,
                   help="an event to send (repeatable; create's default: all of them)")
    p.add_argument("--description", default=None, help="what the webhook is for")
    p.add_argument("--secret-file", default=None, metavar="PATH",
                   help="read the HMAC secret from this file (16-256 characters; "
                        "never on the command line, where ps shows it)")
    p.add_argument("--disable", dest="enabled", action="store_const", const=False,
                   default=None, help="keep the webhook but send nothing")


class UsageError(ClientError):
    """Bad flags or local input: exit code 2, like argparse's own errors."""

    exit_code = EXIT_USAGE


@dataclass
class Shown:
    """What a command prints: ``data`` for json and yaml, ``text`` for table."""

    data: Any
    text: str


Handler = Callable[[ApiClient, argparse.Namespace], Shown]


def run(config: Config, args: argparse.Namespace) -> int:
    noun = args.command
    try:
        if noun == "completion":
            sys.stdout.write(render_bash_completion())
            return EXIT_OK
        if noun == "login":
            shown = login(args)
        else:
            client = connect(args)
            shown = args.handler(client, args)
        emit(shown, args.output or "table")
    except ClientError as exc:
        sys.stderr.write(f"lpmos {noun}: {exc}\n")
        return exc.exit_code
    return EXIT_OK


def emit(shown: Shown, output: str) -> None:
    if output == "json":
        text = json.dumps(shown.data, indent=2, ensure_ascii=False) + "\n"
    elif output == "yaml":
        text = render_yaml(shown.data)
    else:
        text = shown.text if not shown.text or shown.text.endswith("\n") else shown.text + "\n"
    sys.stdout.write(text)


def render_yaml(data: Any) -> str:
    """``data`` as YAML (PyYAML's safe dumper); a usage error when PyYAML is
    not installed, as on an agent-only install."""
    try:
        import yaml
    except ImportError:
        raise UsageError("--output yaml needs PyYAML (pip install PyYAML); "
                          "--output json works without it") from None
    if data is None:
        return "null\n"
    return str(yaml.safe_dump(data, sort_keys=False, allow_unicode=True,
                              default_flow_style=False))


def connect(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ApiClient:
    """The client of the chosen profile, with --url/--token (and their
    environment variables) over the profile's values."""
    env = dict(os.environ) if environ is None else environ
    url = getattr(args, "url", None) or env.get("LPMOS_API_URL")
    token = getattr(args, "token", None) or env.get("LPMOS_API_TOKEN")
    profile_name = getattr(args, "profile", None) or env.get("LPMOS_PROFILE")
    if not (url and token) or profile_name:
        path = profiles_path(env)
        profile = read_profiles(path).choose(profile_name)
        warn_if_readable(path)
        url, token = url or profile.url, token or profile.token
    assert url is not None
    try:
        return ApiClient(url, token or "", timeout=_timeout(args))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _timeout(args: argparse.Namespace) -> float:
    timeout = getattr(args, "timeout", None)
    timeout = 10.0 if timeout is None else float(timeout)
    if not 0.1 <= timeout <= 3600:
        raise UsageError("--timeout: 0.1 to 3600 seconds")
    return timeout


def warn_if_readable(path: Path) -> None:
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        sys.stderr.write(f"lpmos: warning: {path} holds API tokens and is mode "
                         f"{mode & 0o777:04o}; chmod 600 it\n")


def login(args: argparse.Namespace) -> Shown:
    name = validate_profile_name(args.profile or DEFAULT_PROFILE)
    try:
        url = normalize_url(args.url)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    token = args.token or os.environ.get("LPMOS_API_TOKEN")
    if not token:
        if not sys.stdin.isatty():
            raise UsageError("give --token TOKEN (or env LPMOS_API_TOKEN)")
        token = getpass.getpass(f"API token for {url}: ").strip()
    if not token:
        raise UsageError("an empty token")
    who: dict[str, Any] = {}
    if not args.no_check:
        answer = ApiClient(url, token, timeout=_timeout(args)).call("GET", "/session")
        who = answer if isinstance(answer, dict) else {}
    path = profiles_path()
    profiles = read_profiles(path)
    profiles.profiles[name] = Profile(name, url, token)
    if args.make_default or not profiles.default or profiles.default not in profiles.profiles:
        profiles.default = name
    write_profiles(path, profiles)
    data = {"profile": name, "url": url, "default": profiles.default == name,
            "file": str(path), "user": who.get("user"), "role": who.get("role")}
    as_who = f" as {who['user']} ({who.get('role')})" if who.get("user") else ""
    text = (f"profile {name}: {url}{as_who}, stored in {path}"
            + (" (the default)" if data["default"] else ""))
    return Shown(data, text)


# -- request helpers -------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str]:
    """``IDC/SN`` → ``(idc, sn)``; a usage error else."""
    idc, sep, sn = ref.partition("/")
    if not sep or not idc or not sn or "/" in sn:
        raise UsageError(f"{ref!r}: name a task or machine as IDC/SN, e.g. dc1/SN123")
    return idc, sn


def _ref_path(ref: str) -> str:
    idc, sn = parse_ref(ref)
    return f"/{urllib.parse.quote(idc, safe='')}/{urllib.parse.quote(sn, safe='')}"


def parse_param(item: str) -> tuple[str, Any]:
    """``KEY=VALUE`` → ``(key, value)``: the value as JSON when it is JSON
    (a list, an object, a number, null), else as text."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--param {item!r}: KEY=VALUE")
    try:
        value: Any = json.loads(raw)
    except ValueError:
        value = raw
    return key.strip(), value


def read_params_file(name: str) -> dict[str, Any]:
    try:
        text = sys.stdin.read() if name == "-" else Path(name).read_text(encoding="utf-8")
        data = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--params {name}: {exc}") from None
    except ValueError as exc:
        raise UsageError(f"--params {name}: not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"--params {name}: a JSON object")
    return data


def collect(client: ApiClient, path: str, query: dict[str, Any],
            args: argparse.Namespace) -> tuple[list[Any], dict[str, Any]]:
    """The items of a paginated list (``limit`` of them, or all with
    ``--all``) and the last page's answer (for ``total``, ``next_cursor``)."""
    if not args.all and not 1 <= args.limit <= PAGE_MAX:
        raise UsageError(f"--limit: 1 to {PAGE_MAX}")
    items: list[Any] = []
    cursor = None
    while True:
        page = client.call("GET", path, query=dict(
            query, limit=PAGE_MAX if args.all else args.limit, cursor=cursor))
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise ClientError(f"GET {path}: an answer without items")
        items.extend(page["items"])
        cursor = page.get("next_cursor")
        if not args.all or not cursor or len(items) >= LIST_MAX:
            return items, page


# -- table rendering (pure) ----------------------------------------------------------

TIME_KEYS = re.compile(r"(^|_|\.)(at|seen|time)$|^(first_seen|last_seen)$")


def format_time(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t))


def format_cell(value: Any, key: str = "") -> str:
    """One value as a table cell: times (keys ``*_at``, ``*_seen``) in UTC,
    ``-`` for nothing, yes/no, lists joined with commas, objects as JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float) and TIME_KEYS.search(key):
        return format_time(float(value)) if value else "-"
    if isinstance(value, float):
        return f"{value:g}" if abs(value) < 1e15 else str(int(value))
    if isinstance(value, list) and all(not isinstance(v, dict | list) for v in value):
        return ", ".join(format_cell(v) for v in value) or "-"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return " ".join(str(value).split())      # one line: a note with newlines stays one cell


def _cut(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def render_table(rows: Sequence[dict[str, Any]],
                 columns: Sequence[tuple[str, str | Callable[[dict[str, Any]], Any]]]) -> str:
    """``rows`` under ``columns`` (header, key or function of the row),
    aligned; every cell but the last column's at most :data:`CELL_MAX` wide.
    An empty list prints the header only, so a script sees the columns."""
    cells = []
    for row in rows:
        line = []
        for _header, get in columns:
            if isinstance(get, str):
                line.append(format_cell(dig(row, get), get))
            else:
                line.append(format_cell(get(row)))
        cells.append(line)
    headers = [h for h, _ in columns]
    last = len(columns) - 1
    cells = [[c if i == last else _cut(c, CELL_MAX) for i, c in enumerate(line)]
             for line in cells]
    widths = [max([len(headers[i])] + [len(line[i]) for line in cells])
              for i in range(len(columns))]
    out = []
    for line in [headers, *cells]:
        out.append("  ".join(c if i == last else c.ljust(widths[i])
                             for i, c in enumerate(line)).rstrip())
    return "\n".join(out) + "\n"


def dig(data: Any, path: str) -> Any:
    """``data["a"]["b"]`` for ``"a.b"``; ``None`` where a step is missing."""
    for part in path.split("."):
        if not isinstance(data, dict):
            return None
        data = data.get(part)
    return data


def flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """``(dotted key, value)`` of every leaf of nested objects, in order;
    lists stay values."""
    out: list[tuple[str, Any]] = []
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.extend(flatten(value, name + "."))
        else:
            out.append((name, value))
    return out


def render_record(data: dict[str, Any], *, first: Sequence[str] = (),
                  skip: Iterable[str] = ()) -> str:
    """One object as ``key: value`` lines (nested keys dotted), the keys
    ``first`` first; a list of objects (a history) becomes an indented
    table after the scalars, a long list of text (a log tail) indented
    lines."""
    skipped = set(skip)
    data = {**{k: data[k] for k in first if k in data}, **data}
    scalars: list[tuple[str, str]] = []
    blocks: list[str] = []
    for key, value in flatten(data):
        if key in skipped:
            continue
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            columns = list(dict.fromkeys(k for v in value for k in v))
            table = render_table(value, [(c.upper(), c) for c in columns])
            blocks.append(f"{key}:\n" + "".join(f"  {line}\n" for line in table.splitlines()))
        elif isinstance(value, list) and len(value) > 3 and all(isinstance(v, str)
                                                                 for v in value):
            blocks.append(f"{key}:\n" + "".join(f"  {line}\n" for line in value))
        else:
            scalars.append((key, format_cell(value, key)))
    width = max((len(k) for k, _ in scalars), default=0)
    text = "".join(f"{k + ':':<{width + 1}} {v}\n" for k, v in scalars)
    return text + "".join("\n" + b for b in blocks)


def _os(row: dict[str, Any]) -> str:
    return " ".join(p for p in (row.get("os_type"), row.get("os_version")) if p)


def _progress(row: dict[str, Any]) -> str:
    p = row.get("progress") or {}
    if not isinstance(p, dict) or not (p.get("percent") or p.get("step")):
        return ""
    return f"{p.get('percent') or 0:g}% {p.get('step') or ''}".strip()


TASK_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("IDC", "idc"), ("SN", "sn"), ("MAC", "mac"), ("OS", _os), ("STATUS", "status"),
    ("ATTEMPT", "attempt"), ("PROGRESS", _progress), ("UPDATED (UTC)", "updated_at"),
    ("CREATED BY", "created_by"), ("NOTES", "notes"),
]
SERVER_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("IDC", "idc"), ("SN", "sn"), ("BOOT MAC", lambda r: r.get("boot_mac") or r.get("macs")),
    ("IP", "ip"), ("STATE", "state"), ("ONLINE", "online"), ("TASK", "task_status"),
    ("LAST SEEN (UTC)", "last_seen"), ("CONFLICT", "conflict"),
    ("HARDWARE", lambda r: " ".join(p for p in (r.get("vendor"), r.get("product")) if p)),
]
NODE_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("IDC", "idc"), ("NODE", "name"), ("ALIVE", "alive"), ("ADDRESS", "address"),
    ("URL", "advertise_url"), ("VERSION", "version"), ("SERVICES", "services"),
    ("STARTED (UTC)", "started_at"),
]
AUDIT_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("TIME (UTC)", "at"), ("ACTOR", "actor"), ("ACTION", "action"), ("TARGET", "target"),
    ("SOURCE", "source"), ("DETAIL", "detail"),
]
TEMPLATE_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("NAME", "name"), ("OS", _os), ("IMAGE", "image"), ("UPDATED BY", "updated_by"),
    ("UPDATED (UTC)", "updated_at"), ("DESCRIPTION", "description"),
]


def _more(shown: int, page: dict[str, Any], what: str) -> None:
    """A note on stderr when the list has more than was printed."""
    total = page.get("total")
    if page.get("next_cursor"):
        of = f" of {total}" if isinstance(total, int) else ""
        sys.stderr.write(f"lpmos: showing {shown}{of} {what}; --all or --limit N for more\n")


# -- handlers ------------------------------------------------------------------------


def task_create(client: ApiClient, args: argparse.Namespace) -> Shown:
    params = read_params_file(args.params) if args.params else {}
    params.update(parse_param(p) for p in args.param)
    body: dict[str, Any] = {"idc": args.idc, "sn": args.sn, "mac": args.mac}
    for field in ("os_type", "os_version", "image", "template", "notes"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    if params:
        body["params"] = params
    for field in ("not_before", "window"):
        if getattr(args, field):
            body[field] = getattr(args, field)
    answer = client.call("POST", "/tasks", body)
    task = answer.get("task", {}) if isinstance(answer, dict) else {}
    text = (f"created {task.get('idc')}/{task.get('sn')}: {task.get('status')} "
            f"(revision {answer.get('revision')})")
    if answer.get("ignored_fields"):
        text += "\nignored fields: " + ", ".join(answer["ignored_fields"])
    return Shown(answer, text)


def task_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    items, page = collect(client, "/tasks", {"idc": args.idc, "status": args.status,
                                              "q": args.search}, args)
    _more(len(items), page, "tasks")
    return Shown(items, render_table(items, TASK_COLUMNS))


def task_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", "/tasks" + _ref_path(args.ref),
                         query={"fresh": "1" if args.fresh else None})
    task = dict(answer.get("task") or {})
    view = {**task, "revision": answer.get("revision"), "online": answer.get("online")}
    history = view.pop("history", [])
    logs = view.pop("logs", [])
    text = render_record(view, first=TASK_FIRST, skip=("event_seq", "schema"))
    if history:
        text += "\nhistory:\n" + "".join(
            f"  {line}\n" for line in render_table(history, [
                ("AT (UTC)", "at"), ("FROM", "from_status"), ("TO", "to_status"),
                ("BY", "by"), ("REASON", "reason")]).splitlines())
    if logs:
        text += "\nlog tail (lpmos task log for the whole log):\n" + "".join(
            f"  {line}\n" for line in logs)
    return Shown(answer, text)


TASK_FIRST = ("idc", "sn", "mac", "status", "os_type", "os_version", "image", "template",
              "attempt", "reason", "notes", "created_by", "created_at", "approved_by",
              "approved_at", "claimed_by", "started_at", "finished_at", "updated_at")
SERVER_FIRST = ("idc", "sn", "state", "online", "boot_mac", "macs", "ip", "uuid", "arch",
                "conflict", "first_seen", "last_seen")
TRANSITION_FIELD = {"cancel": "reason"}


def task_transition(client: ApiClient, args: argparse.Namespace) -> Shown:
    body: dict[str, Any] = {}
    if args.note is not None:
        body[TRANSITION_FIELD.get(args.action, "notes")] = args.note
    if args.revision is not None:
        body["revision"] = args.revision
    if getattr(args, "param", None):
        body["params"] = dict(parse_param(p) for p in args.param)
    answer = client.call("POST", "/tasks" + _ref_path(args.ref) + "/" + args.action, body)
    task = answer.get("task", {}) if isinstance(answer, dict) else {}
    history = task.get("history") or [{}]
    last = history[-1]
    move = f"{last.get('from_status')} → {last.get('to_status')}" if last else task.get("status")
    return Shown(answer, f"{args.ref}: {move} (attempt {task.get('attempt')}, revision "
                         f"{answer.get('revision')})")


def task_schedule(client: ApiClient, args: argparse.Namespace) -> Shown:
    """Options left out keep the task's values: the task is read first and
    the change applies only to the revision read (409 if it changed)."""
    path = "/tasks" + _ref_path(args.ref)
    revision = args.revision
    body: dict[str, Any] = {"not_before": None, "window": None}
    if not args.clear:
        current = client.call("GET", path, query={"fresh": "1"})
        schedule = (current.get("task") or {}).get("schedule") or {}
        body = {"not_before": schedule.get("not_before") or None,
                "window": schedule.get("window") or None}
        revision = revision if revision is not None else current.get("revision")
    for field in ("not_before", "window"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field) or None
    if args.note is not None:
        body["notes"] = args.note
    if revision is not None:
        body["revision"] = revision
    answer = client.call("PUT", path + "/schedule", body)
    schedule = (answer.get("task") or {}).get("schedule") or {}
    text = f"{args.ref}: schedule {schedule.get('summary') or 'none'}"
    if schedule.get("waiting"):
        text += f"; {schedule.get('reason')}"
    return Shown(answer, f"{text} (revision {answer.get('revision')})")


def task_delete(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("DELETE", "/tasks" + _ref_path(args.ref),
                         query={"revision": args.revision})
    return Shown(answer, f"deleted {args.ref}")


def task_log(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", "/tasks" + _ref_path(args.ref) + "/log",
                         query={"attempt": args.attempt})
    lines = answer.get("lines") or []
    if answer.get("truncated"):
        sys.stderr.write(f"lpmos: the node kept the newest lines only: {answer.get('first_line')}"
                         " earlier lines were dropped\n")
    sys.stderr.write(f"lpmos: {args.ref} attempt {answer.get('attempt')} of "
                     f"{answer.get('attempts')}, from node {answer.get('node')}\n")
    return Shown(answer, "".join(f"{line}\n" for line in lines))


def server_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    items, page = collect(client, "/servers", {"idc": args.idc, "q": args.search}, args)
    _more(len(items), page, "servers")
    return Shown(items, render_table(items, SERVER_COLUMNS))


def server_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", "/servers" + _ref_path(args.ref))
    server = dict(answer.get("server") or {})
    inventory = server.pop("inventory", None)
    view = {**server, "online": answer.get("online"), "revision": answer.get("revision")}
    text = render_record(view, first=SERVER_FIRST, skip=("schema",))
    task = answer.get("task")
    if isinstance(task, dict):
        text += "\ntask:\n" + "".join(
            f"  {line}\n" for line in render_table([task], TASK_COLUMNS[3:8]).splitlines())
    if isinstance(inventory, dict) and inventory:
        text += "\ninventory (--output json or yaml for all of it):\n" + "".join(
            f"  {line}\n" for line in render_record(inventory).splitlines())
    return Shown(answer, text)


#: lpmos.power's drivers and API actions (the client imports nothing of the server)
POWER_DRIVERS = ("redfish", "ipmi")
POWER_ACTIONS = ("on", "off", "reset", "cycle", "pxe-once", "status")


def server_bmc_set(client: ApiClient, args: argparse.Namespace) -> Shown:
    body: dict[str, Any] = {k: v for k, v in (("driver", args.driver), ("address", args.address),
                                             ("port", args.port), ("user", args.user))
                            if v is not None}
    options: dict[str, Any] = {}
    if args.scheme:
        options["scheme"] = args.scheme
    if args.insecure:
        options["verify_tls"] = False
    if args.system:
        options["system"] = args.system
    if options:
        body["options"] = options
    if args.password_file:
        try:
            source = str(args.password_file)
            raw = sys.stdin.read() if source == "-" else Path(source).read_text()
        except OSError as exc:
            raise UsageError(f"--password-file: {exc.strerror}: {args.password_file}") \
                from None
        body["password"] = raw.rstrip("\r\n")
    answer = client.call("PUT", "/servers" + _ref_path(args.ref) + "/bmc", body)
    return Shown(answer, render_record(answer.get("bmc") or {}, first=BMC_FIRST,
                                       skip=("schema",)))


def server_bmc_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", "/servers" + _ref_path(args.ref) + "/bmc")
    bmc = answer.get("bmc")
    if not bmc:
        hint = answer.get("inventory_address")
        return Shown(answer, f"{args.ref} has no BMC record"
                     + (f" (its inventory reports a BMC at {hint}; 'lpmos server bmc-set "
                        f"{args.ref} --driver ipmi --user USER --password-file FILE' uses "
                        "it)" if hint else "") + "\n")
    return Shown(answer, render_record(bmc, first=BMC_FIRST, skip=("schema",)))


BMC_FIRST = ("driver", "endpoint", "address", "port", "user", "has_password", "source")
POWER_FIRST = ("id", "action", "state", "describe", "node", "power_state", "error")


def server_power(client: ApiClient, args: argparse.Namespace) -> Shown:
    body: dict[str, Any] = {"action": args.power_action}
    if args.reason:
        body["reason"] = args.reason
    path = "/servers" + _ref_path(args.ref) + "/power"
    req = client.call("POST", path, body).get("request") or {}
    if args.wait:
        deadline = time.monotonic() + args.wait_timeout
        while req.get("state") not in ("done", "failed"):
            if time.monotonic() > deadline:
                raise ClientError(f"{args.ref}: power request {req.get('id')} has no result "
                                  f"within {args.wait_timeout:g} s: {req.get('describe')}")
            time.sleep(0.5)
            req = client.call("GET", f"{path}/{req.get('id')}",
                              query={"fresh": "1"}).get("request") or {}
        if req.get("state") == "failed":
            raise ClientError(f"{args.ref}: {req.get('describe')}")
    return Shown({"request": req}, render_record(req, first=POWER_FIRST, skip=("schema",)))


def node_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", "/idcs")
    rows: list[dict[str, Any]] = []
    for idc in answer.get("items") or []:
        if args.idc and idc.get("name") != args.idc:
            continue
        rows.extend({"idc": idc.get("name"), **node} for node in idc.get("nodes") or [])
    if args.idc and not any(i.get("name") == args.idc for i in answer.get("items") or []):
        raise ApiRefused(404, "not_found", f"no IDC named {args.idc}")
    return Shown(rows, render_table(rows, NODE_COLUMNS))


def parse_when(text: str, now: float) -> float:
    """``--since``/``--until``: ``30m``, ``12h``, ``7d``, ``45s`` ago; a UTC
    date or date-time (``2026-01-31``, ``2026-01-31T12:00:00``); or unix
    seconds.  A usage error else (pure: ``now`` is given)."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhdw])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
        return now - float(m.group(1)) * unit
    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(text.strip().removesuffix("Z"))
    except ValueError:
        raise UsageError(f"{text!r}: a duration ago (30m, 12h, 7d), a date "
                         "(2026-01-31[T12:00:00], UTC) or unix seconds") from None
    if when.tzinfo is not None:
        return when.timestamp()
    return float(calendar.timegm(when.timetuple()))


def audit_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    t = time.time()
    query = {"actor": args.actor, "action": args.audit_action, "target": args.target,
             "since": parse_when(args.since, t) if args.since else None,
             "until": parse_when(args.until, t) if args.until else None,
             "order": "asc" if args.oldest_first else None}
    items, page = collect(client, "/audit", query, args)
    _more(len(items), page, "records")
    return Shown(items, render_table(items, AUDIT_COLUMNS))


def _templates(client: ApiClient) -> list[dict[str, Any]]:
    answer = client.call("GET", "/templates")
    return [t for t in answer.get("items") or [] if isinstance(t, dict)]


def template_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    items = _templates(client)
    return Shown(items, render_table(items, TEMPLATE_COLUMNS))


def template_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    """The API has no per-template read; the list carries every template
    whole, so ``show`` picks one from it."""
    for item in _templates(client):
        if item.get("name") == args.name:
            return Shown(item, render_record(item))
    raise ApiRefused(404, "not_found", f"no template named {args.name}")


WEBHOOK_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("ID", "id"), ("ENABLED", "enabled"), ("EVENTS", "events"), ("URL", "url"),
    ("UPDATED BY", "updated_by"), ("DESCRIPTION", "description"),
]
DELIVERY_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("TIME (UTC)", "at"), ("EVENT", "event"), ("ATTEMPT", "attempt"), ("OUTCOME", "outcome"),
    ("STATUS", "status"), ("SECONDS", "duration"), ("DELIVERY", "delivery"),
    ("ERROR", "error"),
]


def _webhook_path(ident: str) -> str:
    if not re.fullmatch(r"[0-9a-f]{16}", ident):
        raise UsageError(f"{ident!r} is not a webhook id (16 hex digits, from "
                         "'lpmos webhook list')")
    return f"/webhooks/{ident}"


def _webhook_body(args: argparse.Namespace) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if args.receiver is not None:          # not "url": that is the control plane's (--url)
        body["url"] = args.receiver
    for field in ("events", "description", "enabled"):
        if getattr(args, field, None) is not None:
            body[field] = getattr(args, field)
    if args.secret_file:
        try:
            body["secret"] = Path(args.secret_file).read_text().strip()
        except OSError as exc:
            raise UsageError(f"--secret-file: {exc.strerror}: {args.secret_file}") from None
    return body


def webhook_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    items = [w for w in client.call("GET", "/webhooks").get("items") or []
             if isinstance(w, dict)]
    return Shown(items, render_table(items, WEBHOOK_COLUMNS))


def webhook_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("GET", _webhook_path(args.id))
    return Shown(answer, render_record(answer.get("webhook") or {}, first=("id", "url")))


def webhook_create(client: ApiClient, args: argparse.Namespace) -> Shown:
    body = _webhook_body(args)
    body.setdefault("events", list(WEBHOOK_EVENTS))
    answer = client.call("POST", "/webhooks", body)
    hook = answer.get("webhook") or {}
    text = render_record(hook, first=("id", "url"))
    if "secret" not in body:
        text += (f"secret: {answer.get('secret')}\n"
                 "  (shown this once: the receiver checks X-LPMOS-Signature with it)\n")
    return Shown(answer, text)


def webhook_update(client: ApiClient, args: argparse.Namespace) -> Shown:
    body = _webhook_body(args)
    if not body:
        raise UsageError("nothing to change: give --receiver, --event, --description, "
                         "--secret-file, --enable or --disable")
    if args.revision is not None:
        body["revision"] = args.revision
    answer = client.call("PUT", _webhook_path(args.id), body)
    return Shown(answer, render_record(answer.get("webhook") or {}, first=("id", "url")))


def webhook_delete(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("DELETE", _webhook_path(args.id))
    return Shown(answer, f"deleted webhook {args.id}")


def webhook_deliveries(client: ApiClient, args: argparse.Namespace) -> Shown:
    items = [d for d in client.call("GET", _webhook_path(args.id) + "/deliveries")
             .get("items") or [] if isinstance(d, dict)]
    return Shown(items, render_table(items, DELIVERY_COLUMNS))


IMAGE_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("NAME", "name"), ("OS", "os_type"), ("FORMAT", "format"), ("SOURCE", "source"),
    ("STATE", "state"), ("SIZE", lambda r: human_bytes(int(r.get("size") or 0))),
    ("IN USE", "in_use_by"), ("READY", lambda r: image_readiness(r)),
]
COPY_COLUMNS: list[tuple[str, str | Callable[[dict[str, Any]], Any]]] = [
    ("IDC", "idc"), ("NODE", "node"), ("STATE", "state"),
    ("PROGRESS", lambda r: f"{float(r.get('progress') or 0) * 100:.0f} %"),
    ("REASON", "reason"),
]
_ROLE_RE = re.compile(r"(disk_image|kernel|initrd)=(.*)", re.DOTALL)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def image_readiness(row: dict[str, Any]) -> str:
    """``dc1 2/2, dc2 0/1`` — per wanted IDC, nodes ready of nodes alive."""
    parts = []
    for idc in row.get("copies") or []:
        alive = [n for n in idc.get("nodes") or [] if n.get("alive")]
        parts.append(f"{idc.get('idc')} {idc.get('ready', 0)}/{len(alive)}")
    return ", ".join(parts) or "-"


def _image_path(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", name):
        raise UsageError(f"{name!r} is not an image name (1-64 of a-z, 0-9, '.', '_', '-')")
    return f"/images/{name}"


def _by_role(values: Sequence[str], flag: str, default_role: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for value in values:
        m = _ROLE_RE.fullmatch(value)
        role, text = (m.group(1), m.group(2)) if m else (default_role, value)
        if role in out:
            raise UsageError(f"{flag} given twice for {role}")
        out[role] = text
    return out


def _copies(image: dict[str, Any]) -> list[dict[str, Any]]:
    return [{"idc": idc.get("idc"), **node} for idc in image.get("copies") or []
            for node in idc.get("nodes") or []]


def image_list(client: ApiClient, args: argparse.Namespace) -> Shown:
    items = [i for i in client.call("GET", "/images").get("items") or [] if isinstance(i, dict)]
    return Shown(items, render_table(items, IMAGE_COLUMNS))


def _render_image(image: dict[str, Any]) -> str:
    text = render_record({k: v for k, v in image.items() if k != "copies"},
                         first=("name", "os_type", "format", "source", "state", "sha256"))
    copies = _copies(image)
    if copies:
        text += "\ncopies:\n" + "".join(f"  {line}\n" for line in
                                         render_table(copies, COPY_COLUMNS).splitlines())
    else:
        text += "\ncopies: no regional node of a wanted IDC is alive\n"
    return text


def image_show(client: ApiClient, args: argparse.Namespace) -> Shown:
    image = client.call("GET", _image_path(args.name)).get("image") or {}
    return Shown(image, _render_image(image))


def image_add(client: ApiClient, args: argparse.Namespace) -> Shown:
    default_role = "kernel" if args.format == "installer" else "disk_image"
    files = _by_role(args.file, "--file", default_role)
    urls = _by_role(args.from_url, "--from-url", default_role)
    sums = _by_role(args.sha256, "--sha256", default_role)
    if files and urls:
        raise UsageError("give --file (upload) or --from-url (the nodes fetch it), not both")
    if not files and not urls:
        raise UsageError("give --file PATH to upload, or --from-url URL with --sha256 HEX")
    fmt = args.format or _format_of(next(iter({**files, **urls}.values())))
    body: dict[str, Any] = {
        "name": args.name, "os_type": args.os_type, "os_family": args.os_family,
        "version": args.version, "format": fmt, "description": args.description,
        "kernel_args": args.kernel_args, "disk_size": args.disk_size,
        "source": "upload" if files else "url"}
    if args.architectures:
        body["architectures"] = args.architectures
    if args.idcs:
        body["idcs"] = args.idcs
    paths: dict[str, Path] = {}
    if files:
        entries = {}
        for role, name in files.items():
            path = Path(name)
            if not path.is_file():
                raise UsageError(f"--file: no such file: {name}")
            paths[role] = path
            digest = _sha256_of(path, role)
            if role in sums and sums[role].lower() != digest:
                raise UsageError(f"--sha256 of {role} says {sums[role]}, the file has {digest}")
            entries[role] = {"sha256": digest, "size": path.stat().st_size}
        body["files"] = entries
    else:
        missing = [r for r in urls if r not in sums]
        if missing:
            raise UsageError(f"--from-url needs --sha256 for {', '.join(missing)}: the nodes "
                             "verify the bytes against it")
        body["files"] = {r: {"url": u, "sha256": sums[r].lower()} for r, u in urls.items()}
    answer = client.call("POST", "/images", body)
    for role, path in paths.items():
        answer = client.upload(f"{_image_path(args.name)}/files/{role}", path,
                               progress=_progress_printer(f"uploading {role}"))
    image = answer.get("image") or {}
    if args.wait:
        image = _wait_ready(client, args.name, args.wait_timeout)
    return Shown(image, _render_image(image) if "copies" in image else
                 render_record(image, first=("name", "os_type", "format", "source", "state")))


def _format_of(name: str) -> str:
    from lpmos.catalog import infer_disk_format
    return infer_disk_format(name)


def _sha256_of(path: Path, role: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    show = _progress_printer(f"checksumming {role}")
    total = path.stat().st_size
    done = 0
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
            done += len(chunk)
            show(done, total)
    return digest.hexdigest()


def _progress_printer(label: str) -> Callable[[int, int], None]:
    """A progress bar on stderr when it is a terminal (else nothing: logs
    and scripts get the final answer)."""
    tty = sys.stderr.isatty()
    last = [-1]

    def show(done: int, total: int) -> None:
        if not tty or total <= 0:
            return
        pct = int(done * 100 / total)
        if pct == last[0]:
            return
        last[0] = pct
        bar = "#" * (pct // 4)
        end = "\n" if done >= total else ""
        sys.stderr.write(f"\r{label}: [{bar:<25}] {pct:3d} % {human_bytes(done)}{end}")
        sys.stderr.flush()

    return show


def _wait_ready(client: ApiClient, name: str, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    tty = sys.stderr.isatty()
    while True:
        image = client.call("GET", _image_path(name)).get("image") or {}
        copies = [c for c in _copies(image) if c.get("alive")]
        failed = [c for c in copies if c.get("state") == "failed"]
        if failed:
            raise ClientError(f"{name}: " + "; ".join(
                f"{c['idc']}/{c['node']}: {c.get('reason')}" for c in failed))
        if copies and all(c.get("state") == "ready" for c in copies):
            if tty:
                sys.stderr.write("\n")
            return image
        if tty:
            sys.stderr.write("\r" + "; ".join(f"{c['idc']}/{c['node']} {c.get('describe')}"
                                               for c in copies)[:200])
            sys.stderr.flush()
        if time.monotonic() > deadline:
            raise ClientError(f"{name} is not ready on every node within {timeout:g} s: "
                              f"{image_readiness(image)}")
        time.sleep(1.0)


def image_remove(client: ApiClient, args: argparse.Namespace) -> Shown:
    answer = client.call("DELETE", _image_path(args.name))
    return Shown(answer, f"removed image {args.name}; the regional nodes free their copies")


# -- shell completion --------------------------------------------------------------


def completion_words() -> tuple[list[str], dict[str, list[str]], dict[str, list[str]]]:
    """The words bash completes: every command; each client noun's actions;
    the flags of each ``noun`` or ``noun action`` (client commands only: the
    services' flags would need their modules imported)."""
    from lpmos.cli import COMMANDS

    commands = list(COMMANDS)
    actions = {noun: list(acts) for noun, acts in ACTIONS.items()}
    flags: dict[str, list[str]] = {}
    for noun in DESCRIPTIONS:
        parser = argparse.ArgumentParser(prog=f"lpmos {noun}", add_help=True)
        add_arguments(parser)
        flags[noun] = _option_strings(parser)
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    flags[f"{noun} {name}"] = _option_strings(sub)
    return commands, actions, flags


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [o for a in parser._actions for o in a.option_strings if o.startswith("--")]


def render_bash_completion() -> str:
    """A bash completion script for ``lpmos`` (``complete -F``): commands,
    actions, flags, the --output values, task states and profile names (read
    from the profiles file when completing)."""
    commands, actions, flags = completion_words()
    noun_cases = "".join(f"        {noun}) echo {' '.join(acts)} ;;\n"
                         for noun, acts in actions.items())
    flag_cases = "".join(f"        \"{key}\") echo {' '.join(opts)} ;;\n"
                         for key, opts in sorted(flags.items()))
    states = " ".join(s.value for s in TaskStatus)
    return f"""# bash completion for lpmos, printed by 'lpmos completion bash'
# install: lpmos completion bash > /etc/bash_completion.d/lpmos

_lpmos_actions() {{
    case "$1" in
{noun_cases}    esac
}}

_lpmos_flags() {{
    case "$1" in
{flag_cases}        *) echo --help ;;
    esac
}}

_lpmos_profiles() {{
    local file="${{LPMOS_CLIENT_CONFIG:-${{XDG_CONFIG_HOME:-$HOME/.config}}/lpmos/profiles.toml}}"
    [[ -r $file ]] && sed -n 's/^\\[profiles\\."\\(.*\\)"\\]$/\\1/p' "$file"
}}

_lpmos() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" prev="${{COMP_WORDS[COMP_CWORD-1]}}"
    local cmd="" action="" word i
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        if [[ -z $cmd ]]; then
            case " {' '.join(commands)} " in *" $word "*) cmd=$word ;; esac
        elif [[ -z $action ]]; then
            case " $(_lpmos_actions "$cmd") " in *" $word "*) action=$word ;; esac
        fi
    done
    case "$prev" in
        --output|-o) COMPREPLY=($(compgen -W "{' '.join(OUTPUTS)}" -- "$cur")); return ;;
        --profile) COMPREPLY=($(compgen -W "$(_lpmos_profiles)" -- "$cur")); return ;;
        --status) COMPREPLY=($(compgen -W "{states}" -- "$cur")); return ;;
        --config|--params) COMPREPLY=($(compgen -f -- "$cur")); return ;;
    esac
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W "{' '.join(commands)} --help" -- "$cur"))
        return
    fi
    local acts
    acts="$(_lpmos_actions "$cmd")"
    if [[ -n $acts && -z $action && $cur != -* ]]; then
        COMPREPLY=($(compgen -W "$acts" -- "$cur"))
        return
    fi
    local key="$cmd"
    [[ -n $action ]] && key="$cmd $action"
    COMPREPLY=($(compgen -W "$(_lpmos_flags "$key")" -- "$cur"))
}}

complete -F _lpmos lpmos
"""
