"""The control plane's Flask application factory.

``create_app(config, store, keys)`` builds everything a process needs —
its single watch cache over etcd, the indexes the lists are served from,
the WebSocket hub, the task service, auth and the image catalog — and
registers one blueprint per concern:

| blueprint     | module               | what                                   |
| ------------- | -------------------- | -------------------------------------- |
| auth          | web.auth             | login, logout, session, roles, CSRF    |
| api_tasks     | web.api_tasks        | tasks: CRUD, transitions, batch        |
| api_logs      | web.api_logs         | a task's full install log (from a node)|
| api_servers   | web.api_servers      | discovered servers, inventory, timeline|
| api_stats     | web.api_stats        | stats, /healthz, /metrics              |
| api_admin     | web.api_admin        | audit, users, tokens, templates, IDCs  |
| api_webhooks  | web.api_webhooks     | outbound webhooks and their deliveries |
| api_power     | web.api_power        | BMC records and power requests         |
| ws            | web.ws               | /ws live updates                       |
| openapi       | web.openapi          | /api/v1/openapi.json                   |
| console       | web.console          | the console pages                      |

Nothing is global: two apps in one process (the tests) share nothing.
"""

from __future__ import annotations

import logging
import secrets
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from lpmos.auth import Auth
from lpmos.catalog import Catalog, CatalogError, default_catalog_path, load_catalog
from lpmos.config import Config, ConfigError
from lpmos.metrics import Registry
from lpmos.models import ValidationError
from lpmos.states import IllegalTransition
from lpmos.store import Conflict, Store, StoreError
from lpmos.store.keys import Keys
from lpmos.store.maintenance import EtcdMaintenance
from lpmos.tasks import TaskNotFound, TaskService
from web.body import BodyTimeout, read_body
from web.context import WebContext
from web.http import ApiError
from web.index import ConsoleCache, ConsoleIndex
from web.ratelimit import RateLimiter
from web.settings import DEFAULTS

log = logging.getLogger(__name__)

_DEFAULT: Any = object()

CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
       "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'")


def load_configured_catalog(config: Config) -> Catalog | None:
    """The catalog of config key ``catalog``, else the source tree's default,
    else ``None`` (no catalog: any OS name is accepted)."""
    path = config.get("catalog") or default_catalog_path()
    if path is None:
        return None
    try:
        return load_catalog(Path(path))
    except CatalogError as exc:
        raise ConfigError(str(exc)) from None


def create_app(config: Config, store: Store, keys: Keys, *, secret_key: bytes | None = None,
               catalog: Catalog | None = _DEFAULT, cache: ConsoleCache | None = None,
               settings: dict[str, Any] | None = None, cache_wait: float | None = None,
               maintenance: EtcdMaintenance | None = None) -> Flask:
    """The control-plane application.

    ``store`` and ``keys`` come from :func:`lpmos.runtime.open_store`.
    ``cache`` may be given already started (else one is started here and
    stopped by ``app.extensions["lpmos"].close()``).  ``settings`` override
    ``web.*`` values of ``config`` (tests).  ``catalog`` defaults to the
    configured one; ``None`` disables the OS check.  ``maintenance``
    (:meth:`lpmos.runtime.StoreHandle.maintenance`) is started here and
    stopped by ``close()``: etcd's alarms then show in /healthz and /metrics.
    """
    values = dict(DEFAULTS)
    values.update({k: v for k, v in config.values.items() if k.startswith("web.")})
    values.update(settings or {})
    app = _flask_app(values, secret_key)
    if catalog is _DEFAULT:
        catalog = load_configured_catalog(config)
    metrics = Registry()
    metrics.describe("web_refused_total", "requests refused, by reason")
    metrics.describe("web_node_calls_total",
                     "calls to a regional node's API (install logs), by result")
    metrics.describe("web_requests_total", "HTTP requests answered, by method and status")
    metrics.describe("web_request_duration_seconds",
                     "time to answer an HTTP request (not WebSocket sessions), by method and "
                     "route", kind="histogram")
    owns_cache = cache is None
    if cache is None:
        cache = ConsoleCache(store, keys)
        # wait for the first load, but not for an etcd that is down: a call
        # fails within etcd.timeout, so two of them and a second bound it; past
        # that the console serves, /healthz says 503 "degraded" and the cache
        # fills in when etcd answers (RELIABILITY: etcd down at start)
        if cache_wait is None:
            cache_wait = min(30.0, 2 * float(config["etcd.timeout"]) + 1)
        cache.start(wait=cache_wait)
    metrics.gauge("web_cache_staleness_seconds", cache.staleness,
                  "seconds since etcd last confirmed the watch cache")
    if maintenance is not None:
        maintenance.describe(metrics)
        maintenance.start()
    index = ConsoleIndex(cache, keys)
    from web.ws import Hub, configure

    hub = Hub(index, cache, metrics, max_clients=int(values["web.ws_max_clients"]),
              queue_size=int(values["web.ws_queue"]))
    configure(app.config, float(values["web.ws_ping_interval"]))
    mutate_rate = float(values["web.mutate_rate"])
    context = WebContext(
        config=config, store=store, keys=keys, cache=cache, index=index,
        tasks=TaskService(store, keys), auth=Auth(store, keys, cache=cache), seed_catalog=catalog,
        metrics=metrics,
        login_limiter=RateLimiter(float(values["web.login_rate"]),
                                  burst=max(3.0, float(values["web.login_rate"]) / 2)),
        mutate_limiter=RateLimiter(mutate_rate, burst=max(10.0, mutate_rate / 4)),
        hub=hub, settings=values, owns_cache=owns_cache, maintenance=maintenance)
    app.extensions["lpmos"] = context
    from web.webhooks import WebhookDispatcher, WebhookSettings

    dispatcher = WebhookDispatcher(cache, keys, metrics, WebhookSettings.from_values(values))
    app.extensions["lpmos_webhooks"] = dispatcher.start()
    context.workers.append(dispatcher)
    _register_blueprints(app)
    _install_hooks(app, context)
    return app


def _flask_app(values: dict[str, Any], secret_key: bytes | None) -> Flask:
    """The Flask object with the session, body and cache settings of
    ``values`` (the merged ``web.*`` settings)."""
    app = Flask(__name__, template_folder="pages", static_folder="static",
                static_url_path="/static")
    app.config.update(
        SECRET_KEY=secret_key or secrets.token_bytes(32),
        MAX_CONTENT_LENGTH=int(values["web.max_body"]),
        MAX_FORM_MEMORY_SIZE=min(int(values["web.max_body"]), 512 * 1024),
        MAX_FORM_PARTS=50,
        SESSION_COOKIE_NAME="lpmos_session",
        SESSION_COOKIE_HTTPONLY=True,
        SESSION_COOKIE_SAMESITE="Lax",
        SESSION_COOKIE_SECURE=bool(values["web.secure_cookies"]),
        PERMANENT_SESSION_LIFETIME=timedelta(hours=float(values["web.session_hours"])),
        JSON_SORT_KEYS=False,
        SEND_FILE_MAX_AGE_DEFAULT=300,
    )
    return app


def _register_blueprints(app: Flask) -> None:
    """One blueprint per concern, in the order of the module docstring's table."""
    from web import (
        api_admin,
        api_images,
        api_logs,
        api_power,
        api_servers,
        api_stats,
        api_tasks,
        api_webhooks,
        auth,
        console,
        openapi,
        ws,
    )

    for module in (auth, api_tasks, api_logs, api_servers, api_stats, api_admin, api_webhooks,
                   api_images, api_power, ws, openapi, console):
        app.register_blueprint(module.bp)


#: the method label of the request metrics; any other method counts as "other"
#: (a client picks the method: the label must stay a small set)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _install_hooks(app: Flask, context: WebContext) -> None:
    limit = int(context.settings["web.max_body"])
    body_timeout = float(context.settings["web.body_timeout"])

    @app.before_request
    def start_clock() -> None:
        """First of the hooks: the request's duration includes reading its body."""
        g.lpmos_started = time.perf_counter()

    @app.before_request
    def read_bodies_within_limits() -> Any:
        """413 from the announced length; then the whole body within
        ``--body-timeout`` (408), read before any view runs.  An image
        upload is the one body streamed by its view instead (after
        authentication, with its own bounds: :mod:`web.api_images`)."""
        from web.api_images import UPLOAD_ENDPOINT

        if request.endpoint == UPLOAD_ENDPOINT:
            return None
        length = request.content_length
        if length is not None and length > limit:
            context.metrics.inc("web_refused_total", reason="body_too_large")
            return ApiError(413, "too_large", f"the body is {length} bytes; at most {limit} "
                                              "are accepted").response()
        try:
            read_body(request.environ, body_timeout, limit)
        except BodyTimeout:
            context.metrics.inc("web_refused_total", reason="body_timeout")
            return ApiError(408, "request_timeout", f"the request body did not arrive in full "
                                                    f"within {body_timeout:g} s").response()
        return None

    @app.after_request
    def count_request(resp: Response) -> Response:
        """``web_requests_total`` and ``web_request_duration_seconds``,
        labelled by the route's pattern (``/api/v1/tasks/<idc>/<sn>``,
        ``unmatched`` for a 404 of no route): bounded, whatever the path."""
        method = request.method if request.method in METHODS else "other"
        context.metrics.inc("web_requests_total", method=method, status=resp.status_code)
        rule = request.url_rule
        started = g.get("lpmos_started")
        if started is not None and (rule is None or rule.rule != "/ws"):
            context.metrics.observe("web_request_duration_seconds",
                                    time.perf_counter() - started, method=method,
                                    route=rule.rule if rule is not None else "unmatched")
        return resp

    @app.after_request
    def security_headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", CSP)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        resp.headers.setdefault("X-Frame-Options", "DENY")
        resp.headers.setdefault("Referrer-Policy", "same-origin")
        if request.path.startswith("/api/") or request.path == "/":
            resp.headers.setdefault("Cache-Control", "no-store")
        return resp

    @app.errorhandler(ApiError)
    def api_error(exc: ApiError) -> Response:
        context.metrics.inc("web_refused_total", reason=exc.reason)
        return exc.response()

    @app.errorhandler(ValidationError)
    def invalid(exc: ValidationError) -> Response:
        context.metrics.inc("web_refused_total", reason="invalid")
        return ApiError(400, "invalid", str(exc), field=exc.field).response()

    @app.errorhandler(TaskNotFound)
    def not_found(exc: TaskNotFound) -> Response:
        return ApiError(404, "not_found", str(exc)).response()

    @app.errorhandler(Conflict)
    def conflict(exc: Conflict) -> Response:
        context.metrics.inc("web_refused_total", reason="conflict")
        return ApiError(409, "conflict", str(exc), revision=exc.revision).response()

    @app.errorhandler(IllegalTransition)
    def illegal(exc: IllegalTransition) -> Response:
        return ApiError(409, "illegal_transition", str(exc),
                        status=exc.current.value).response()

    @app.errorhandler(StoreError)
    def store_error(exc: StoreError) -> Response:
        context.metrics.inc("web_refused_total", reason="store_unavailable")
        return ApiError(503, "unavailable", f"etcd: {exc}").response()

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        name = (exc.name or "error").lower().replace(" ", "_")
        context.metrics.inc("web_refused_total",
                            reason="body_too_large" if code == 413 else name)
        resp = jsonify({"error": name, "detail": exc.description or ""})
        resp.status_code = code
        return resp
