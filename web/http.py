"""HTTP plumbing shared by the blueprints: JSON errors and request bodies.

Pure codecs (:func:`parse_json_body`, :func:`json_depth`, cursor encoding)
are separate from the Flask glue so they are tested without a server.

Contract of every API error: status 4xx/5xx and a JSON body
``{"error": <short machine word>, "detail": <one English sentence>}`` plus
optional extra fields (``revision`` on 409, ``errors`` on batch refusals).
"""

from __future__ import annotations

import base64
import json
import math
import re
from typing import Any

from flask import Response, jsonify

MAX_JSON_DEPTH = 32

_STRING_RE = re.compile(rb'"(?:\\.|[^"\\])*"', re.DOTALL)
_BRACKETS_RE = re.compile(rb"[\[\]{}]")


class ApiError(Exception):
    """An error answered as ``{"error", "detail"}`` with ``status``."""

    def __init__(self, http_status: int, error: str, detail: str, *, reason: str = "",
                 **extra: Any) -> None:
        super().__init__(detail)
        self.status = http_status
        self.error = error
        self.detail = detail
        self.reason = reason or error     # the metric label of this refusal
        self.extra = extra

    def response(self) -> Response:
        body = {"error": self.error, "detail": self.detail, **self.extra}
        resp = jsonify(body)
        resp.status_code = self.status
        if "retry_after" in self.extra:
            resp.headers["Retry-After"] = str(max(1, math.ceil(float(self.extra["retry_after"]))))
        return resp


def json_depth(raw: bytes) -> int:
    """Deepest nesting of arrays/objects in ``raw`` (strings ignored).

    Linear time and no recursion, so it is safe to run on hostile input
    before :func:`json.loads` (whose recursion a deep document would
    exhaust)."""
    depth = best = 0
    for m in _BRACKETS_RE.finditer(_STRING_RE.sub(b"", raw)):
        if m.group() in (b"[", b"{"):
            depth += 1
            best = max(best, depth)
        else:
            depth -= 1
    return best


def parse_json_body(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Decode a request body as JSON whatever its Content-Type claims.

    The earlier console's operators send ``curl -d '{...}'``, which labels
    the body ``application/x-www-form-urlencoded``; the bytes are JSON all
    the same.  Raises :class:`ApiError` (400) naming the reason."""
    if not raw.strip():
        raise ApiError(400, "bad_request", "the request body is empty; send a JSON document")
    if json_depth(raw) > max_depth:
        raise ApiError(400, "bad_request", f"JSON nested deeper than {max_depth} levels")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise ApiError(400, "bad_request", "the request body is not UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ApiError(400, "bad_request", f"the request body is not valid JSON: {exc}") \
            from None


def encode_cursor(parts: list[Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(parts, separators=(",", ":")).encode()) \
        .decode().rstrip("=")


def decode_cursor(text: str, arity: int) -> list[Any]:
    """The list encoded by :func:`encode_cursor`; :class:`ApiError` 400 if malformed."""
    try:
        if len(text) > 1024:
            raise ValueError
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
        parts = json.loads(raw)
        if not isinstance(parts, list) or len(parts) != arity:
            raise ValueError
        return parts
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_request", "cursor is malformed; use the next_cursor of the "
                                           "previous page") from None


def parse_limit(raw: str | None, default: int = 50, maximum: int = 500) -> int:
    if raw in (None, ""):
        return default
    try:
        value = int(raw)  # type: ignore[arg-type]
    except ValueError:
        raise ApiError(400, "bad_request", f"limit: an integer from 1 to {maximum}") from None
    if not 1 <= value <= maximum:
        raise ApiError(400, "bad_request", f"limit: an integer from 1 to {maximum}")
    return value
