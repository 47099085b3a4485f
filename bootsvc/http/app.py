"""The boot HTTP app of a regional node: everything a machine fetches
after iPXE is loaded, and what the control plane asks the node.

| route                                   | auth           | blueprint (module)          |
| --------------------------------------- | -------------- | --------------------------- |
| GET  /boot.ipxe                         | —              | boot: constant chain script |
| GET  /boot/<mac>.ipxe                   | —              | boot: per-machine script    |
| GET  /grub/grub.cfg                     | —              | boot: GRUB's constant config|
| GET  /grub/<mac>.cfg                    | —              | boot: per-machine GRUB cfg  |
| GET  /config/<sn>/<name>                | token          | config: rendered configs    |
| GET  /config/<sn>/t/<token>/<name>      | token in path  | (for cloud-init seedfrom)   |
| POST /callback/<sn>                     | token          | callback: installer hooks   |
| POST /agent/v1/register                 | token optional | agent                       |
| POST /agent/v1/heartbeat                | token          | agent                       |
| GET  /agent/v1/task                     | token          | agent (long poll)           |
| POST /agent/v1/events                   | token          | agent                       |
| GET  /images/<name>/<file>              | token for disk | files: Range, ETag          |
|                                         | images         |                             |
| GET  /ipxe/<file>                       | —              | files: boot loaders (iPXE,  |
|                                         |                | shim, GRUB) for HTTP boot   |
| GET  /healthz, /metrics                 | —              | ops                         |
| GET  /node/v1/logs/<sn>                 | control plane  | node_api                    |
|                                         | signature      |                             |

Each blueprint is ``bootsvc.http.routes_<name>`` (``node_api`` is
:mod:`bootsvc.http.node_api`); what they share is one
:class:`~bootsvc.http.backend.BootBackend` per app, in
``app.extensions["lpmos_boot"]``.  Every error is JSON
``{"error", "detail"}``; a 401 carries ``WWW-Authenticate: Bearer``.
:class:`~bootsvc.http.service.HttpService` serves the app on the node.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from flask import Flask, Response, request

from bootsvc.context import NodeContext
from bootsvc.http import node_api
from bootsvc.http.backend import BootBackend
from bootsvc.http.common import HttpError, error_body, json_response
from bootsvc.http.fastpath import BootFastPath
from bootsvc.http.routes_agent import agent_bp
from bootsvc.http.routes_boot import boot_bp
from bootsvc.http.routes_callback import callback_bp
from bootsvc.http.routes_config import config_bp
from bootsvc.http.routes_files import files_bp
from bootsvc.http.routes_ops import ops_bp
from bootsvc.http.settings import HttpSettings
from lpmos.catalog import Catalog

log = logging.getLogger(__name__)


def create_app(ctx: NodeContext, *, catalog: Catalog | None = None,
               templates_dir: Path | None = None) -> Flask:
    """The boot HTTP WSGI app for ``ctx`` (dependencies injected, one
    blueprint per concern).  Call ``app.extensions["lpmos_boot"].start()``
    (or use :class:`~bootsvc.http.service.HttpService`) to run its background
    workers."""
    app = Flask("bootsvc")
    app.config["MAX_CONTENT_LENGTH"] = HttpSettings.from_config(ctx.config).max_body
    app.json.sort_keys = False  # type: ignore[attr-defined]
    boot = BootBackend(ctx, catalog=catalog, templates_dir=templates_dir)
    app.extensions["lpmos_boot"] = boot
    for bp in (boot_bp, config_bp, callback_bp, agent_bp, files_bp, ops_bp):
        app.register_blueprint(bp)
    node_api.register(app)
    app.wsgi_app = BootFastPath(boot, app.wsgi_app)  # type: ignore[method-assign]

    @app.after_request
    def count(resp: Response) -> Response:
        ctx.metrics.inc("http_requests_total")
        return resp

    @app.errorhandler(HttpError)
    def on_http_error(exc: HttpError) -> Response:
        ctx.metrics.inc("http_errors_total", error=exc.error)
        resp = json_response(error_body(exc), exc.status)
        if exc.status == 401:
            resp.headers["WWW-Authenticate"] = 'Bearer realm="lpmos"'
        return resp

    @app.errorhandler(404)
    @app.errorhandler(405)
    @app.errorhandler(413)
    def on_werkzeug(exc: Any) -> Response:
        code = int(getattr(exc, "code", 500))
        name = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(code, "error")
        ctx.metrics.inc("http_requests_refused_total", reason=name)
        return json_response({"error": name, "detail": getattr(exc, "description", "")}, code)

    @app.errorhandler(Exception)
    def on_unexpected(exc: Exception) -> Response:
        if hasattr(exc, "code") and isinstance(getattr(exc, "code", None), int):
            code = int(exc.code)  # type: ignore[attr-defined]
            return json_response({"error": "http_error", "detail": str(exc)}, code)
        log.exception("unexpected error on %s %s", request.method, request.path)
        ctx.metrics.inc("http_errors_total", error="internal")
        return json_response({"error": "internal", "detail": type(exc).__name__}, 500)

    return app
