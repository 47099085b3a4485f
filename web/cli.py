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

from lpmos.config import Config, ConfigError
from lpmos.runtime import open_store, setup_logging
from lpmos.sdnotify import Notifier
from web.settings import DEFAULTS, SETTINGS

__all__ = ["SETTINGS", "add_arguments", "run"]

HELP = ("run the web console and REST API (default "
        f"{DEFAULTS['web.listen'][0]}:{DEFAULTS['web.listen'][1]})")
DESCRIPTION = (
    "Serve the LPMOS console and the REST API under /api/v1 (OpenAPI at "
    "/api/v1/openapi.json) with live updates over a WebSocket at /ws. Production serving is "
    "gunicorn (one gthread worker that reads request headers in its event loop, with a "
    "deadline: one etcd watch per process); --debug uses Flask's "
    "development server instead. Users and API tokens come from 'lpmos token'.")

log = logging.getLogger("lpmos.web")


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
    """Refuse settings that cannot work together, before anything starts
    (exit code 2 with one line): the thread budget, and the ``web.ldap_*``
    settings (which also reads the LDAP bind password file)."""
    if int(config["web.threads"]) - int(config["web.ws_max_clients"]) < 8:
        raise ConfigError("web.threads must exceed web.ws_max_clients by at least 8 "
                          "(each live console holds one thread)")
    from web.ldap import LdapSettings

    LdapSettings.from_values(config.values)


def run(config: Config, args: argparse.Namespace) -> int:
    """Serve until interrupted; exit code 0 on a clean stop."""
    check_settings(config)
    # before the embedded etcd and gunicorn start: neither may speak for us
    notifier = Notifier.from_environ()
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
    return _serve_gunicorn(config, host, port, secret, notifier)


def _serve_gunicorn(config: Config, host: str, port: int, secret: bytes,
                    notifier: Notifier) -> int:
    from gunicorn.app.base import BaseApplication

    from web.readiness import ReadyPipe, run_arbiter

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
    ready = ReadyPipe()      # the worker tells the master it loaded the app (systemd READY=1)

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
                "post_worker_init": ready.worker_ready,
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

        def run(self) -> None:
            run_arbiter(self, notifier, ready, f"control plane on {bind}")

    try:
        _Gunicorn().run()
    finally:
        if local is not None:
            local.release()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit("run it as: lpmos control-plane")
