"""``lpmos control-plane``: the web console and REST API.

Production serving is gunicorn with the ``gthread`` worker, run in-process
(:class:`gunicorn.app.base.BaseApplication`) with exactly one worker
process, so there is exactly one etcd watch per process (DESIGN: "each
control-plane replica is fed by its own watch").  Scale out by running more
replicas behind a load balancer, not more workers.

gRPC channels do not survive ``fork``: the master only makes sure an etcd
is there (starting the private embedded one when no endpoints are given) and
the worker opens the store, the watch cache and the app after the fork
(gunicorn calls :meth:`_Gunicorn.load` in the worker because
``preload_app`` is off).

Request headers are read in the worker's event loop, not on a pool thread
(:mod:`web.worker`): a client dribbling its headers ("slowloris") holds no
thread and is closed ``web.header_timeout`` seconds after connecting.

Every live console holds one worker thread for as long as it is open
(flask-sock on gthread), so ``web.threads`` must exceed ``web.ws_max_clients``
by the number of concurrent REST calls wanted; the CLI refuses settings that
leave fewer than 8 threads for REST.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from lpmos.config import (
    Config,
    ConfigError,
    Setting,
    float_range,
    int_range,
    parse_bool,
    parse_hostport,
    parse_optional_path,
    str_list,
)
from lpmos.runtime import open_store, setup_logging

HELP = "run the web console and REST API (default 127.0.0.1:8080)"
DESCRIPTION = (
    "Serve the LPMOS console and the REST API under /api/v1 (OpenAPI at "
    "/api/v1/openapi.json) with live updates over a WebSocket at /ws. Production serving is "
    "gunicorn (one gthread worker that reads request headers in its event loop, with a "
    "deadline: one etcd watch per process); --debug uses Flask's "
    "development server instead. Users and API tokens come from 'lpmos token'.")

log = logging.getLogger("lpmos.web")

SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen", "--listen", "127.0.0.1:8080", parse_hostport,
            "HOST:PORT the console and API listen on", metavar="HOST:PORT"),
    Setting("web.threads", "--threads", 128, int_range(8, 2048),
            "worker threads; each open live console (WebSocket) holds one", metavar="N"),
    Setting("web.secret_key_file", "--secret-key-file", None, parse_optional_path,
            "file holding the session-signing key (created with mode 0600 when missing; "
            "default: STATE_DIR/web-secret.key). Replicas behind one load balancer must share it",
            metavar="FILE"),
    Setting("web.four_eyes", "--four-eyes", False, parse_bool,
            "four-eyes rule: the creator of a task may not approve it", metavar="BOOL"),
    Setting("web.debug", "--debug", False, parse_bool,
            "serve with Flask's development server and debug logging (never in production)",
            metavar="BOOL"),
    Setting("web.allowed_origins", "--allowed-origins", [], str_list,
            "extra Origins (scheme://host[:port]) allowed to open the WebSocket and send "
            "session requests; the console's own origin is always allowed", metavar="LIST"),
    Setting("web.max_body", "--max-body", 1024 * 1024, int_range(1024, 64 * 1024 * 1024),
            "largest request body in bytes (refused with 413 before it is read)",
            metavar="BYTES"),
    Setting("web.batch_max", "--batch-max", 100, int_range(1, 120),
            "most tasks in one batch import (one etcd transaction; etcd's default "
            "--max-txn-ops is 128)", metavar="N"),
    Setting("web.login_rate", "--login-rate", 10.0, float_range(0.1, 10000),
            "login attempts allowed per minute per client address and per user name",
            metavar="PER_MIN"),
    Setting("web.mutate_rate", "--mutate-rate", 300.0, float_range(1, 100000),
            "mutating API calls allowed per minute per user (burst of a quarter of it)",
            metavar="PER_MIN"),
    Setting("web.ws_max_clients", "--ws-max-clients", 100, int_range(1, 2000),
            "most WebSocket clients at once; more are refused with 503", metavar="N"),
    Setting("web.ws_queue", "--ws-queue", 512, int_range(8, 100000),
            "messages queued per WebSocket client; a client that falls further behind is "
            "dropped (it reconnects and resyncs)", metavar="N"),
    Setting("web.ws_ping_interval", "--ws-ping-interval", 20.0, float_range(1, 600),
            "seconds between WebSocket pings; no pong by the next ping closes the socket",
            metavar="SECONDS"),
    Setting("web.session_hours", "--session-hours", 12.0, float_range(0.05, 24 * 30),
            "console session lifetime in hours", metavar="HOURS"),
    Setting("web.secure_cookies", "--secure-cookies", False, parse_bool,
            "mark the session cookie Secure (set when serving behind HTTPS)", metavar="BOOL"),
    Setting("web.header_timeout", "--header-timeout", 5.0, float_range(0.5, 300),
            "seconds a client has to send a request's complete headers, from connecting (or "
            "from the first byte of a kept-alive connection's next request); slower clients "
            "get 408 and are closed, counted as web_refused_total{reason=\"header_timeout\"}",
            metavar="SECONDS"),
    Setting("web.body_timeout", "--body-timeout", 30.0, float_range(0.5, 3600),
            "seconds a client has to send a request's whole body once its headers are in; "
            "slower clients get 408 and are closed, counted as "
            "web_refused_total{reason=\"body_timeout\"}", metavar="SECONDS"),
    Setting("web.node_timeout", "--node-timeout", 3.0, float_range(0.2, 60),
            "seconds the control plane waits for a regional node's answer (a task's full "
            "install log) before it answers 504", metavar="SECONDS"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """No positional arguments; every option is a setting flag."""


def load_secret_key(path: Path) -> bytes:
    """The session key in ``path``; created (0600) with 32 random bytes when absent."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        data = path.read_bytes().strip()
        if len(data) < 16:
            raise ConfigError(f"web.secret_key_file: {path} holds fewer than 16 bytes") \
                from None
        return data
    with os.fdopen(fd, "wb") as fh:
        key = secrets.token_hex(32).encode()
        fh.write(key)
    return key


def secret_key_path(config: Config) -> Path:
    return Path(config.get("web.secret_key_file") or Path(config["state_dir"]) / "web-secret.key")


def check_settings(config: Config) -> None:
    if int(config["web.threads"]) - int(config["web.ws_max_clients"]) < 8:
        raise ConfigError("web.threads must exceed web.ws_max_clients by at least 8 "
                          "(each live console holds one thread)")


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until interrupted; exit code 0 on a clean stop."""
    check_settings(config)
    debug = bool(config["web.debug"])
    setup_logging("debug" if debug else config["log_level"], name="lpmos-web")
    secret = load_secret_key(secret_key_path(config))
    host, port = config["web.listen"]
    if debug:
        from web.app import create_app

        with open_store(config) as handle:
            app = create_app(config, handle.store, handle.keys,
                             secret_key=secret, maintenance=handle.maintenance())
            log.warning("serving with Flask's development server on %s:%d (debug)", host, port)
            try:
                app.run(host=host, port=port, threaded=True, debug=False, use_reloader=False)
            finally:
                app.extensions["lpmos"].close()
        return 0
    return _serve_gunicorn(config, host, port, secret)


def _serve_gunicorn(config: Config, host: str, port: int, secret: bytes) -> int:
    from gunicorn.app.base import BaseApplication

    local = None
    if not config["etcd.endpoints"]:
        # start (or reuse) the private etcd in the master; the worker connects to it
        from lpmos.runtime import embedded_options
        from lpmos.store.embedded import ensure_local_etcd

        state_dir = Path(config["state_dir"])
        state_dir.mkdir(parents=True, exist_ok=True)
        local = ensure_local_etcd(state_dir, embedded_options(config))
        log.info("no --etcd-endpoints given: using the private etcd at %s", local.client_url)
        worker_config = config.with_values(etcd__endpoints=[local.client_url])
    else:
        worker_config = config
    bind = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    from web.worker import buffered_worker

    worker_class = buffered_worker(header_timeout=float(config["web.header_timeout"]))

    class _Gunicorn(BaseApplication):  # type: ignore[misc]
        def __init__(self) -> None:
            self._stack = contextlib.ExitStack()
            super().__init__()

        def load_config(self) -> None:
            options: dict[str, Any] = {
                "bind": [bind],
                "workers": 1,
                # gthread with the header phase in the event loop (slowloris)
                "worker_class": worker_class,
                "threads": int(config["web.threads"]),
                "preload_app": False,
                "timeout": 60,
                "graceful_timeout": 10,
                "keepalive": 5,
                "limit_request_line": 8190,
                "limit_request_fields": 100,
                "limit_request_field_size": 8190,
                "accesslog": None,
                "errorlog": "-",
                "loglevel": config["log_level"],
                "proc_name": "lpmos-control-plane",
                # gunicorn >= 25 opens a control socket in $HOME by default; we
                # manage the process ourselves and write nothing outside the
                # state directory
                "control_socket_disable": True,
                "worker_exit": lambda _arbiter, _worker: self._stack.close(),
            }
            for key, value in options.items():
                if key in self.cfg.settings:   # control_socket_disable: gunicorn >= 25
                    self.cfg.set(key, value)

        def load(self) -> Any:
            # runs in the worker, after fork: gRPC channels and the watch start here
            from web.app import create_app

            handle = self._stack.enter_context(open_store(worker_config,
                                                          embedded=local is not None))
            app = create_app(worker_config, handle.store, handle.keys,
                             secret_key=secret, maintenance=handle.maintenance())
            self._stack.callback(app.extensions["lpmos"].close)
            return app

    try:
        _Gunicorn().run()
    finally:
        if local is not None:
            local.release()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: lpmos control-plane")
