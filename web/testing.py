"""Test support for the control plane: :class:`WebEnv`, an app on a store
with a user and an API token of every role, and :class:`LiveServer`, which
serves an app on loopback in a thread.

Production serving is gunicorn (``web.cli``); tests use Werkzeug's threaded
server, which flask-sock also supports, so a test needs no fork.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server

from lpmos.auth import Auth
from lpmos.catalog import Catalog
from lpmos.config import COMMON, resolve
from lpmos.store import Store
from lpmos.store.keys import Keys
from web.app import create_app
from web.cli import SETTINGS


class LiveServer:
    """``with LiveServer(app) as url:`` — the app on 127.0.0.1 at a free port."""

    def __init__(self, app: Flask, host: str = "127.0.0.1") -> None:
        self.app = app
        self.server: BaseWSGIServer = make_server(host, 0, app, threaded=True)
        self.server.daemon_threads = True  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.server.serve_forever, name="live-server",
                                       daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def __enter__(self) -> str:
        self.thread.start()
        return self.url

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)


# -- a ready-made control plane for tests ------------------------------------------

ROLE_USERS = {"viewer": "viewer1", "operator": "operator1", "approver": "approver1",
              "admin": "admin1"}
TEST_PASSWORD = "correct-horse-battery"  # noqa: S105 (test fixture)


class WebEnv:
    """A control plane on a store: users of every role with API tokens and
    the password :data:`TEST_PASSWORD`; ``close()`` stops its watch."""

    def __init__(self, store: Store, keys: Keys, *, settings: dict[str, Any] | None = None,
                 catalog: Catalog | None = None) -> None:
        self.store = store
        self.keys = keys
        self.auth = Auth(store, keys)
        self.tokens: dict[str, str] = {}
        for role, user in ROLE_USERS.items():
            self.auth.put_user(user, role, TEST_PASSWORD)
            self.tokens[role], _ = self.auth.create_token(user, label="test")
        self.auth.put_user("approver2", "approver", TEST_PASSWORD)
        self.tokens["approver2"], _ = self.auth.create_token("approver2")
        config = resolve(list(COMMON) + list(SETTINGS), {}, {})
        base = {"web.login_rate": 1000.0, "web.mutate_rate": 100000.0}
        base.update(settings or {})
        self.app = create_app(config, store, keys, catalog=catalog, settings=base,
                              cache_wait=20.0)
        self.context = self.app.extensions["lpmos"]

    def headers(self, role: str | None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}

    def close(self) -> None:
        self.context.close()
