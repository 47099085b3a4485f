"""A deadline for request bodies on the control plane.

:mod:`web.worker` hands a connection to a thread only with its complete
header block; the body is then read by that thread with blocking reads, and
a client sending it one byte now and then would hold the thread for as long
as it likes.  :func:`read_body` reads the whole body before the view runs,
bounded by a deadline for all of it (not per read, which a dribbling client
defeats): a watchdog shuts the socket's read side at the deadline, the
blocked read returns, and the client gets 408 and a closed connection.
The body is then served to the app from memory, so nothing else changes
for it.  Bodies are small here (``--max-body``, 1 MiB by default).
"""

from __future__ import annotations

import io
import socket
import threading
from typing import Any


class BodyTimeout(Exception):
    """The body did not arrive in full within the deadline."""


def read_body(environ: dict[str, Any], timeout: float, limit: int) -> bool:
    """Read the request body of ``environ`` within ``timeout`` seconds and
    put it back as an in-memory ``wsgi.input``.  Only under gunicorn (the
    socket is ``environ["gunicorn.socket"]``); elsewhere nothing is done.

    Reads at most ``limit + 1`` bytes (the app answers 413 past ``limit``).
    Returns True when a body was read.  Raises :class:`BodyTimeout` past the
    deadline (the socket's read side is then shut: the connection must
    close)."""
    sock = environ.get("gunicorn.socket")
    length = environ.get("CONTENT_LENGTH") or ""
    chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
    if sock is None or not (chunked or (length.isdigit() and int(length) > 0)):
        return False
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        try:
            sock.shutdown(socket.SHUT_RD)       # the blocked read returns at once
        except OSError:
            pass

    watchdog = threading.Timer(timeout, expire)
    watchdog.daemon = True
    watchdog.start()
    chunks: list[bytes] = []
    size = 0
    stream = environ["wsgi.input"]
    try:
        while size <= limit:
            chunk = stream.read(min(65536, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except Exception:
        if expired.is_set():
            raise BodyTimeout() from None
        raise
    finally:
        watchdog.cancel()
    if expired.is_set():
        raise BodyTimeout()
    body = b"".join(chunks)
    environ["wsgi.input"] = io.BytesIO(body)
    environ["CONTENT_LENGTH"] = str(len(body))
    environ.pop("HTTP_TRANSFER_ENCODING", None)
    return True


__all__ = ["BodyTimeout", "read_body"]
