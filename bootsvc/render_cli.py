"""``lpmos render``: preview a boot script or install config for a task.

Reads the task and server record from etcd (read-only: no claim, no token
is issued — a placeholder token is rendered), picks the template the boot
HTTP API would use and prints the result.  A render error (missing
variable, refused value) is printed with the template and the variable,
exit code 1.
"""

from __future__ import annotations

import argparse
import sys
import time

from bootsvc.http.catalog import open_catalog
from bootsvc.http.settings import SETTINGS as HTTP_SETTINGS
from bootsvc.http.settings import HttpSettings
from bootsvc.policy.machine import MachineView
from bootsvc.policy.script import CONFIG_TEMPLATES, decide_script, install_kind
from bootsvc.render import Renderer, RenderError, build_context
from bootsvc.settings import NODE_SETTINGS
from lpmos.config import Config, Setting
from lpmos.models import Server, Task, ValidationError, validate_name, validate_sn
from lpmos.runtime import open_store

HELP = "preview a rendered boot script or install config"
DESCRIPTION = (
    "Render a template for an existing task, as the boot HTTP API would, without changing "
    "anything: --template is a template path under templates/ (e.g. kickstart/rhel9.ks.j2), "
    "a config name as fetched from /config/<sn>/<name> (ks.cfg, user-data, meta-data, "
    "network-config, preseed.cfg), or 'boot' for the per-machine iPXE script the task's "
    "current state gets. The token is a placeholder. 'lpmos render --list' lists templates.")
_WANTED = {"http.templates", "http.live_image", "http.live_kernel_args", "http.retry_delay",
           "http.port", "http.discovery"}
SETTINGS: tuple[Setting, ...] = tuple(
    [s for s in HTTP_SETTINGS if s.key in _WANTED]
    + [s for s in NODE_SETTINGS if s.key in ("regional.advertise_url", "regional.node_name")])

PREVIEW_PLACEHOLDER = "PREVIEW-TOKEN-NOT-VALID"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", metavar="IDC/SN", help="the task to render for")
    parser.add_argument("--template", metavar="NAME", default="boot",
                        help="template path, config name, or 'boot' (default)")
    parser.add_argument("--token", default=PREVIEW_PLACEHOLDER,
                        help="token text to render (default: a placeholder)")
    parser.add_argument("--list", action="store_true", help="list the templates and exit")


def run(config: Config, args: argparse.Namespace) -> int:
    renderer = Renderer(config.get("http.templates"))
    if args.list:
        for name in renderer.names():
            print(name)
        return 0
    if not args.task or "/" not in args.task:
        sys.stderr.write("lpmos render: --task IDC/SN is required\n")
        return 2
    idc, sn = args.task.split("/", 1)
    try:
        validate_name(idc, "idc")
        validate_sn(sn)
    except ValidationError as exc:
        sys.stderr.write(f"lpmos render: {exc}\n")
        return 2
    with open_store(config) as handle:
        store, keys = handle.store, handle.keys
        task_kv = store.get(keys.task(idc, sn))  # type: ignore[attr-defined]
        server_kv = store.get(keys.server(idc, sn))  # type: ignore[attr-defined]
    if task_kv is None:
        sys.stderr.write(f"lpmos render: no task for {idc}/{sn}\n")
        return 1
    task = Task.from_json(task_kv.value)
    server = Server.from_json(server_kv.value) if server_kv is not None else None
    catalog = open_catalog(config.get("catalog"))
    image = catalog.find(task.os_type, task.os_version, task.image)
    http = HttpSettings.from_config(config)
    live = catalog.images.get(http.live_image)
    node_url = config.get("regional.advertise_url") or f"http://NODE-ADDRESS:{http.port}"
    template = args.template
    decision, reason = "preview", "preview"
    if template == "boot":
        view = MachineView(sn, task, task_kv.mod_revision, server)
        d = decide_script(view, discovery=http.discovery, image=image,
                        live_available=live is not None, now=time.time())
        template, decision, reason = d.template, d.action, d.reason
    elif "/" not in template:
        if image is None:
            sys.stderr.write(f"lpmos render: the task's image {task.image or task.os_type} is "
                             "not in the catalog\n")
            return 1
        names = CONFIG_TEMPLATES.get(install_kind(image), {})
        if template not in names:
            sys.stderr.write(f"lpmos render: {template!r} is not a template path (those "
                             "have a '/': 'lpmos render --list'), 'boot', or a config name "
                             f"of {install_kind(image)} installs "
                             f"({', '.join(sorted(names)) or 'none'})\n")
            return 1
        template = names[template]
        if not template:
            return 0
    context = build_context(
        node_url=node_url, idc=idc, node_name=str(config.get("regional.node_name", "node")),
        decision=decision, reason=reason, sn=sn, mac=task.mac, arch="x86_64", platform="pcbios",
        task=task, server=server, image=image, live=live,
        live_kernel_args=http.live_kernel_args, token=args.token,
        retry_delay=http.retry_delay)
    try:
        sys.stdout.write(renderer.render(template, context))
    except RenderError as exc:
        sys.stderr.write(f"lpmos render: {exc}\n")
        return 1
    return 0
