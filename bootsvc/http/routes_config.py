"""The ``config`` blueprint: the install configs an installer fetches
(kickstart, autoinstall user-data, preseed, cloud-init seed), rendered
for the machine's task.

| route                                   | auth          |
| --------------------------------------- | ------------- |
| GET /config/<sn>/<name>                 | token         |
| GET /config/<sn>/t/<token>/<name>       | token in path |

The second form is for cloud-init's ``seedfrom``, which can send no
header.  A config is served only while the machine's task installs
(``booting`` or ``installing``): 409 otherwise.

A successful render is remembered in the app's
:class:`~bootsvc.http.config_cache.ConfigFastPath` (handed over in the
WSGI environ by :class:`~bootsvc.http.fastpath.BootFastPath`), which
answers repeats of it from memory, on the event loop, until the task,
the server record, the catalog, the renderer or the token change; every
refusal stays this route's.
"""

from __future__ import annotations

import logging
import re

from flask import Blueprint, Response, request

from bootsvc.http.backend import current_boot
from bootsvc.http.common import HttpError, checked_sn, text_response
from bootsvc.http.config_cache import ENVIRON_KEY, ConfigFastPath
from bootsvc.policy.script import CONFIG_TEMPLATES, install_kind
from bootsvc.render import RenderError
from lpmos.states import TaskStatus

log = logging.getLogger(__name__)

_CONFIG_NAME_RE = re.compile(r"[a-z][a-z0-9._-]{0,31}")

config_bp = Blueprint("config", __name__)


@config_bp.get("/config/<sn>/<name>")
def config_file(sn: str, name: str) -> Response:
    return _config(sn, name, None)


@config_bp.get("/config/<sn>/t/<token>/<name>")
def config_file_tokened(sn: str, token: str, name: str) -> Response:
    return _config(sn, name, token)


def _config(sn: str, name: str, path_token: str | None) -> Response:
    boot = current_boot()
    token = boot.authenticate(sn, path_token)
    sn = checked_sn(sn)
    if not _CONFIG_NAME_RE.fullmatch(name):
        raise HttpError(404, "not_found", "no such config")
    view = boot.ctx.machines.view(sn)
    task = view.task
    if task is None or task.state not in (TaskStatus.BOOTING, TaskStatus.INSTALLING):
        boot.metrics.inc("http_requests_refused_total", reason="config_no_install")
        raise HttpError(409, "no_install", f"{sn} has no install in progress")
    image = boot.image_for(view)
    if image is None:
        raise HttpError(409, "no_image", f"image {task.image or task.os_type} not in catalog")
    templates = CONFIG_TEMPLATES.get(install_kind(image), {})
    if name not in templates:
        raise HttpError(404, "not_found",
                        f"{install_kind(image)} installs have: {', '.join(sorted(templates))}")
    template = templates[name]
    # what the render reads besides the view, read before it (see ConfigFastPath.remember)
    live, renderer = boot.live, boot.renderer
    node_url = boot.node_url(request.remote_addr)
    text = ""
    if template:
        try:
            text = renderer.render(template, boot.context(
                decision="config", sn=sn, mac=task.mac, task=task, server=view.server,
                image=image, token=token, remote_addr=request.remote_addr))
        except RenderError as exc:
            log.error("config %s of %s: %s", name, sn, exc)
            boot.metrics.inc("http_render_errors_total", template=template)
            raise HttpError(500, "render_error", str(exc)) from None
    configs = request.environ.get(ENVIRON_KEY)
    if isinstance(configs, ConfigFastPath):
        configs.remember(sn=sn, name=name, task_revision=view.task_revision, task=task,
                         server=view.server, image=image, live=live, renderer=renderer,
                         node_url=node_url, token=token, text=text)
    boot.ctx.timeline.record(f"sn:{sn}", "config fetched",
                             {"name": name, "ip": request.remote_addr or ""})
    boot.metrics.inc("http_configs_total", config=name)
    return text_response(text)
