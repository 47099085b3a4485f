"""A small JSON client for the control-plane API (stdlib only), used by the
lab's end-to-end tests and ``lpmos demo``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


def http_json(method: str, url: str, body: Any = None, *, token: str | None = None,
              timeout: float = 10.0) -> tuple[int, Any]:
    """``(status, body)`` of one request: the body decoded as JSON (``None``
    when empty); for an HTTP error its status and its body as JSON, or as
    text when it is not JSON.  Connection errors raise (``OSError``)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method)  # noqa: S310
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            raw = resp.read()
            return resp.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")
