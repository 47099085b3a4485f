"""Helpers for tests and benchmarks: serve an app on loopback in a thread.

Production serving is gunicorn (``web.cli``); tests use Werkzeug's threaded
server, which flask-sock also supports, so a test needs no fork.
"""

from __future__ import annotations

import threading
from typing import Any

from flask import Flask
from werkzeug.serving import BaseWSGIServer, make_server


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
