"""What every boot HTTP route uses: the HTTP-facing error, reading a
request (its machine token, its JSON body, the SN it names) and writing an
answer.

An error a route raises is an :class:`HttpError`; the app turns it into
``{"error": ..., "detail": ...}`` with its status, so every refusal has the
same shape whichever route or the fast path gave it.
"""

from __future__ import annotations

import json
import re
from typing import Any

from flask import Response, request

from lpmos.models import ValidationError, validate_sn

#: the content type of every JSON answer
JSON_TYPE = "application/json"

_NOT_LABEL_RE = re.compile(r"[^a-z0-9_-]")


class HttpError(Exception):
    """An HTTP-facing error: ``{"error": error, "detail": detail}`` with ``status``."""

    def __init__(self, status: int, error: str, detail: str = "") -> None:
        super().__init__(f"{status} {error}: {detail}")
        self.status = status
        self.error = error
        self.detail = detail


def error_body(exc: HttpError) -> dict[str, str]:
    """The JSON body of an :class:`HttpError` answer."""
    return {"error": exc.error, "detail": exc.detail}


def sanitize_label(value: str | None, limit: int = 16) -> str:
    """``value`` lowercased with every character outside ``[a-z0-9_-]``
    dropped, at most ``limit`` long: a peer's word that is safe to log,
    render and use as a metric label."""
    return _NOT_LABEL_RE.sub("", (value or "").lower())[:limit]


def request_token() -> str | None:
    """The request's machine token: ``Authorization: Bearer``, else ``?token=``."""
    header = request.headers.get("Authorization", "")
    if header[:7].lower() == "bearer ":
        return header[7:].strip() or None
    return request.args.get("token") or None


def read_json() -> Any:
    """The request's JSON body; 400 when it is missing, too deep or not JSON."""
    raw = request.get_data(cache=False)
    if not raw:
        raise HttpError(400, "bad_json", "a JSON body is required")
    try:
        return json.loads(raw)
    except RecursionError:
        raise HttpError(400, "bad_json", "the JSON body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HttpError(400, "bad_json", f"the body is not valid JSON: {exc}") from None


def json_response(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), status, mimetype=JSON_TYPE)


def text_response(text: str, status: int = 200) -> Response:
    """A plain-text answer no cache keeps (scripts and configs change with the task)."""
    resp = Response(text, status, mimetype="text/plain")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def checked_sn(sn: Any) -> str:
    """``sn`` as a valid serial number, else 400 ``bad_sn``."""
    if not isinstance(sn, str):
        raise HttpError(400, "bad_sn", "sn: a serial number is required")
    try:
        return validate_sn(sn)
    except ValidationError as exc:
        raise HttpError(400, "bad_sn", str(exc)) from None


def is_sn(value: str) -> bool:
    """Whether ``value`` is a valid serial number."""
    try:
        validate_sn(value)
    except ValidationError:
        return False
    return True
