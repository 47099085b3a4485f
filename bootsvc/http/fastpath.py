"""The boot scripts without Flask, as WSGI middleware.

In a boot storm most requests are ``GET /boot.ipxe`` and ``GET
/boot/<mac>.ipxe``; Flask's request machinery would be most of their cost.
:class:`BootFastPath` answers them from
:meth:`bootsvc.http.backend.BootBackend.fast_answer`, the same logic the
``boot`` blueprint calls, so the answers are the same whichever serves them.
"""

from __future__ import annotations

from typing import Any

from bootsvc.http.backend import BootBackend
from lpmos.httpwire import phrase


class BootFastPath:
    """WSGI middleware in front of the Flask app: answers the boot script
    GETs itself and hands every other request to the app.  Unlike the
    server's inline path (:class:`bootsvc.http.server.AsyncHttpServer`'s
    ``fast``), it runs on an app thread, so it also answers the scripts that
    need an etcd claim; it is what any WSGI server gets from
    :func:`bootsvc.http.app.create_app`."""

    def __init__(self, boot: BootBackend, app: Any) -> None:
        self.boot = boot
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "GET":
            return self.app(environ, start_response)
        answer = self.boot.fast_answer(environ.get("PATH_INFO", ""),
                                       environ.get("QUERY_STRING", ""),
                                       environ.get("REMOTE_ADDR", ""), inline=False)
        if answer is None:
            return self.app(environ, start_response)
        status, ctype, body = answer
        start_response(f"{status} {phrase(status)}",
                       [("Content-Type", ctype), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [body]
