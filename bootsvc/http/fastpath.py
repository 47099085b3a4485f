"""The boot scripts and cached install configs without Flask, as WSGI middleware.

In a boot storm most requests are ``GET /boot.ipxe`` and ``GET
/boot/<mac>.ipxe``; Flask's request machinery would be most of their cost.
:class:`BootFastPath` answers them from
:meth:`bootsvc.http.backend.BootBackend.fast_answer`, the same logic the
``boot`` blueprint calls, so the answers are the same whichever serves them.
It also answers repeated ``GET /config/...`` from the render cache of
:class:`~bootsvc.http.config_cache.ConfigFastPath` (a miss goes to the
``config`` blueprint, which renders and fills the cache).
"""

from __future__ import annotations

from typing import Any

from bootsvc.http.backend import BootBackend
from bootsvc.http.config_cache import ENVIRON_KEY, ConfigFastPath
from bootsvc.http.wsgi import ParsedRequest
from lpmos.httpwire import phrase


class BootFastPath:
    """WSGI middleware in front of the Flask app: answers the boot script
    GETs and cached config GETs itself and hands every other request to the
    app.  Unlike the server's inline path (:class:`bootsvc.http.server.AsyncHttpServer`'s
    ``fast`` and :meth:`answer_inline`), it runs on an app thread, so it also
    answers the scripts that need an etcd claim; it is what any WSGI server
    gets from :func:`bootsvc.http.app.create_app`."""

    def __init__(self, boot: BootBackend, app: Any) -> None:
        self.boot = boot
        self.app = app
        self.configs = ConfigFastPath(boot)

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if environ.get("REQUEST_METHOD") != "GET":
            return self.app(environ, start_response)
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        remote = environ.get("REMOTE_ADDR", "")
        if path.startswith("/config/"):
            answer = self.configs.answer(path, query, environ.get("HTTP_AUTHORIZATION"),
                                         remote)
            if answer is None:
                environ[ENVIRON_KEY] = self.configs     # the route fills the cache
        else:
            answer = self.boot.fast_answer(path, query, remote, inline=False)
        if answer is None:
            return self.app(environ, start_response)
        status, ctype, body = answer
        start_response(f"{status} {phrase(status)}",
                       [("Content-Type", ctype), ("Content-Length", str(len(body))),
                        ("Cache-Control", "no-store")])
        return [body]

    def answer_inline(self, req: ParsedRequest, remote_addr: str
                      ) -> tuple[int, str, bytes] | None:
        """For :class:`~bootsvc.http.server.AsyncHttpServer`, on the event
        loop: a GET of a config whose render is cached and current, with
        the machine's token; ``None`` for anything else (the app answers
        it).  Cheap for other paths (one prefix test)."""
        path = req.path
        if not path.startswith(b"/config/"):
            return None
        authorization: str | None = None
        for name, value in req.headers:
            if name.lower() == b"authorization":
                if authorization is not None:
                    return None                 # two: the app's (joined) view decides
                authorization = value.decode("latin-1")
        return self.configs.answer(path.decode("latin-1"), req.query.decode("latin-1"),
                                   authorization, remote_addr)
