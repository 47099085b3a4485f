"""HTTP client of the regional node's agent API (``/work/notes/agent_api.md``).

Standard library only (``urllib``), so the agent installs with psutil and
pyudev alone.  Every request has a deadline (socket timeout); JSON answers
are bounded in size; errors are typed:

* :class:`NodeError` — the node answered 4xx/5xx (``status``, ``error``,
  ``detail`` from the JSON error body);
* :class:`Unreachable` — no answer (refused, reset, DNS, timeout).

:func:`retry` runs a call with random-exponential back-off ("full jitter")
until it succeeds, a non-transient error occurs or its deadline passes.
The per-machine token is sent as ``Authorization: Bearer``.
"""

from __future__ import annotations

import http.client
import json
import logging
import random
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from agent import AGENT_VERSION

log = logging.getLogger(__name__)

T = TypeVar("T")

JSON_MAX = 8 * 1024 * 1024         # largest JSON answer the agent reads
EVENTS_BODY_MAX = 1024 * 1024      # contract: at most 1 MiB per events request
EVENTS_PER_REQUEST = 500           # contract: at most 500 events per request
LONG_POLL_MAX = 30.0               # contract: wait <= 30 s
TRANSIENT_STATUSES = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class ClientError(Exception):
    """Base class of the client's errors."""


class NodeError(ClientError):
    """The node answered with an error status."""

    def __init__(self, status: int, error: str = "", detail: str = "",
                 retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}: {error or 'error'}{': ' + detail if detail else ''}")
        self.status = status
        self.error = error
        self.detail = detail
        self.retry_after = retry_after


class Unreachable(ClientError):
    """No answer from the node (connection refused/reset, timeout, DNS)."""


class DeadlineExceeded(ClientError):
    """:func:`retry` ran out of time; ``last`` is the last error."""

    def __init__(self, what: str, last: BaseException | None) -> None:
        super().__init__(f"{what}: deadline exceeded (last error: {last})")
        self.last = last


def is_transient(exc: BaseException) -> bool:
    """Worth retrying: no answer, or a status the node uses for "later"
    (409 is "a token conflict the operator must fix": retried with back-off)."""
    if isinstance(exc, Unreachable):
        return True
    return isinstance(exc, NodeError) and exc.status in TRANSIENT_STATUSES


@dataclass
class Backoff:
    """Random-exponential back-off with full jitter: the n-th delay is
    uniform in [base/2, min(cap, base * factor**n)]."""

    base: float = 0.5
    cap: float = 30.0
    factor: float = 2.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        top = min(self.cap, self.base * (self.factor ** min(attempt, 32)))
        lo = min(self.base / 2, top)
        return (rng or random).uniform(lo, top)


def retry(fn: Callable[[], T], *, what: str, deadline: float | None,
          backoff: Backoff | None = None, transient: Callable[[BaseException], bool] = is_transient,
          sleep: Callable[[float], None] = time.sleep,
          clock: Callable[[], float] = time.monotonic,
          on_error: Callable[[BaseException, int], None] | None = None) -> T:
    """Call ``fn`` until it returns; re-raise a non-transient error at once.

    ``deadline`` is a ``clock()`` value (None: retry forever).  Raises
    :class:`DeadlineExceeded` when the next attempt would start past it.
    A ``Retry-After`` from the node lengthens the wait (never shortens it).
    """
    backoff = backoff or Backoff()
    attempt = 0
    while True:
        try:
            return fn()
        except ClientError as exc:
            if not transient(exc):
                raise
            if on_error is not None:
                on_error(exc, attempt)
            wait = backoff.delay(attempt)
            if isinstance(exc, NodeError) and exc.retry_after:
                wait = max(wait, min(exc.retry_after, backoff.cap))
            attempt += 1
            if deadline is not None and clock() + wait > deadline:
                raise DeadlineExceeded(what, exc) from exc
            sleep(wait)


def _retry_after(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


class NodeClient:
    """Calls the agent API of one regional node.  Thread-safe: each call
    opens its own connection; ``token`` may be replaced at any time."""

    def __init__(self, base_url: str, *, token: str | None = None, timeout: float = 10.0) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"server URL must be http(s)://HOST[:PORT], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    # -- plumbing
    def url(self, path: str, params: dict[str, Any] | None = None) -> str:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return self.base_url + path + query

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers = {"User-Agent": f"lpmos-agent/{AGENT_VERSION}", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def open(self, method: str, url: str, *, body: bytes | None = None,
             headers: dict[str, str] | None = None,
             timeout: float | None = None) -> http.client.HTTPResponse:
        """Open a request; the caller reads and closes the response.
        Raises :class:`NodeError` for an error status, :class:`Unreachable`
        when there is no answer."""
        if not url.startswith(("http://", "https://")):   # never file:, ftp: ...
            raise NodeError(400, "bad URL", f"not http(s): {url[:100]!r}")
        request = urllib.request.Request(url, data=body, method=method,  # noqa: S310
                                         headers=self._headers(headers))
        try:
            response = self._opener.open(request, timeout=timeout or self.timeout)
        except urllib.error.HTTPError as exc:
            raise self._node_error(exc) from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"{method} {url.split('?')[0]}: {reason}") from None
        return response  # type: ignore[no-any-return]

    @staticmethod
    def _node_error(exc: urllib.error.HTTPError) -> NodeError:
        error, detail = exc.reason if isinstance(exc.reason, str) else "", ""
        try:
            data = json.loads(exc.read(64 * 1024) or b"{}")
            if isinstance(data, dict):
                error = str(data.get("error") or error)[:200]
                detail = str(data.get("detail") or "")[:500]
        except (ValueError, OSError, http.client.HTTPException):
            pass
        finally:
            exc.close()
        return NodeError(exc.code, error, detail, _retry_after(exc.headers.get("Retry-After")))

    def call(self, method: str, path: str, *, body: Any = None,
             params: dict[str, Any] | None = None, timeout: float | None = None) -> dict[str, Any]:
        """One JSON request and its JSON object answer."""
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body, separators=(",", ":")).encode()
            headers["Content-Type"] = "application/json"
        url = self.url(path, params)
        try:
            with self.open(method, url, body=data, headers=headers, timeout=timeout) as response:
                raw = response.read(JSON_MAX + 1)
        except (OSError, http.client.HTTPException) as exc:   # reset while reading
            raise Unreachable(f"{method} {path}: {exc}") from None
        if len(raw) > JSON_MAX:
            raise NodeError(502, "answer too large", f"more than {JSON_MAX} bytes")
        try:
            answer = json.loads(raw or b"{}")
        except ValueError:
            raise NodeError(502, "answer is not JSON", raw[:100].decode(errors="replace")) \
                from None
        if not isinstance(answer, dict):
            raise NodeError(502, "answer is not a JSON object")
        return answer

    # -- the agent API
    def register(self, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("POST", "/agent/v1/register", body=body)

    def heartbeat(self, sn: str, state: str) -> dict[str, Any]:
        return self.call("POST", "/agent/v1/heartbeat", body={"sn": sn, "state": state})

    def task(self, sn: str, *, wait: float = 25.0, revision: int | None = None) -> dict[str, Any]:
        wait = max(0.0, min(wait, LONG_POLL_MAX))
        params: dict[str, Any] = {"sn": sn, "wait": f"{wait:g}"}
        if revision is not None:
            params["revision"] = revision
        return self.call("GET", "/agent/v1/task", params=params, timeout=wait + self.timeout)

    def events(self, sn: str, events: list[dict[str, Any]]) -> dict[str, Any]:
        return self.call("POST", "/agent/v1/events", body={"sn": sn, "events": events})


def batch_events(events: list[dict[str, Any]], *, max_count: int = EVENTS_PER_REQUEST,
                 max_bytes: int = EVENTS_BODY_MAX - 4096) -> list[dict[str, Any]]:
    """The longest prefix of ``events`` that fits one request (at least one)."""
    out: list[dict[str, Any]] = []
    size = 0
    for ev in events[:max_count]:
        n = len(json.dumps(ev, separators=(",", ":"))) + 1
        if out and size + n > max_bytes:
            break
        out.append(ev)
        size += n
    return out

