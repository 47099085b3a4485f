"""Small pieces of HTTP/1.1 wire format shared by our two servers (the
control plane's gunicorn worker and the regional node's boot HTTP server).
Stdlib only, pure functions."""

from __future__ import annotations

import json
from http import HTTPStatus


def phrase(status: int) -> str:
    """The reason phrase of ``status`` (``"Error"`` for codes not in the stdlib)."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Error"


def build_refusal(status: int, reason: str, detail: str) -> bytes:
    """A complete ``Connection: close`` HTTP/1.1 answer with a JSON body
    shaped like the apps' errors (``{"error", "detail"}``)."""
    body = (json.dumps({"error": reason, "detail": detail}) + "\n").encode()
    head = (f"HTTP/1.1 {status} {phrase(status)}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head + body


__all__ = ["build_refusal", "phrase"]
