"""The WSGI side of :mod:`bootsvc.http.server`, pure: a parsed request as
a WSGI environ (PEP 3333), and the status and headers an app gave as an
HTTP/1.1 response head.

The head decides whether the connection stays open: only when the client
asked for keep-alive and the body's end is known (a ``Content-Length``, or
a status that has no body).  A streamed body of unknown length ends with
the connection, so its head says ``Connection: close``.  The app's own
``Connection``, ``Transfer-Encoding`` and ``Keep-Alive`` headers are
dropped: framing is the server's.
"""

from __future__ import annotations

import io
import sys
from typing import Any
from urllib.parse import unquote_to_bytes

_HOP_BY_HOP = ("connection", "transfer-encoding", "keep-alive")


class ParsedRequest:
    """One request as the parser delivered it (bytes, as sent)."""

    __slots__ = ("body", "headers", "keep_alive", "method", "path", "query", "url", "version")

    def __init__(self) -> None:
        self.method = b""
        self.url = b""
        self.path = b""             # percent-encoded, as sent
        self.query = b""
        self.version = "1.1"
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.keep_alive = True


def build_environ(req: ParsedRequest, *, peer: tuple[str, int], server_name: str,
                  server_port: int) -> dict[str, Any]:
    """The WSGI environ of ``req``: a repeated header is joined with
    commas, ``PATH_INFO`` is percent-decoded, the body is in memory."""
    body = b"".join(req.body)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": req.method.decode("latin-1"),
        "SCRIPT_NAME": "",
        "PATH_INFO": unquote_to_bytes(req.path).decode("latin-1"),
        "QUERY_STRING": req.query.decode("latin-1"),
        "SERVER_NAME": server_name,
        "SERVER_PORT": str(server_port),
        "SERVER_PROTOCOL": f"HTTP/{req.version}",
        "REMOTE_ADDR": peer[0],
        "REMOTE_PORT": str(peer[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(body),
        "wsgi.input_terminated": True,
        "wsgi.errors": sys.stderr,
        "wsgi.multithread": True,
        "wsgi.multiprocess": False,
        "wsgi.run_once": False,
    }
    for name, value in req.headers:
        key = name.decode("latin-1").upper().replace("-", "_")
        text = value.decode("latin-1")
        if key == "CONTENT_TYPE" or key == "CONTENT_LENGTH":
            environ[key] = text
            continue
        key = "HTTP_" + key
        environ[key] = f"{environ[key]},{text}" if key in environ else text
    if "CONTENT_LENGTH" not in environ and body:
        environ["CONTENT_LENGTH"] = str(len(body))
    return environ


def build_head(status: str | None, headers: list[tuple[str, str]] | None, *,
               length: int | None, keep_alive: bool) -> tuple[bytes, bool]:
    """The status line and headers, and whether the connection stays open.
    ``status`` and ``headers`` are what the app gave ``start_response``
    (none: 500); ``length`` is the body's size when the whole body is known
    (else it is streamed); ``keep_alive``: the client and the server both
    want the connection kept."""
    status = str(status or "500 Internal Server Error")
    has_length = False
    lines = [f"HTTP/1.1 {status}\r\n"]
    for name, value in list(headers or []):
        lname = name.lower()
        if lname in _HOP_BY_HOP:
            continue
        if lname == "content-length":
            has_length = True
        lines.append(f"{name}: {value}\r\n")
    code = status[:3]
    bodiless = code in ("204", "304") or code.startswith("1")
    if not has_length and not bodiless and length is not None:
        lines.append(f"Content-Length: {length}\r\n")
        has_length = True
    keep = keep_alive and (has_length or bodiless)
    if not keep:
        lines.append("Connection: close\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1"), keep
