"""``GET /api/v1/tasks/{idc}/{sn}/log``: a task's full install log.

The task document keeps the newest 200 lines; the whole log of an attempt
stays with the regional node that served it (``task.attempt_nodes``) and
is fetched from there on demand: the node's registration
(``/os/{idc}/nodes/{node}``, alive while its lease is) gives its
``advertise_url``, and the request to ``/node/v1/logs/{sn}?attempt=N`` is
signed with the node-API key (:mod:`lpmos.nodeapi`), never with a machine
token.

Answers fast or not at all: the whole node call has ``--node-timeout``
(3 s).  A node that is not registered or refuses the connection is 503
``node_unavailable``; one that does not answer in time 504
``node_timeout``; an unknown task, an attempt out of range or a log the
node does not keep 404.  The key is never in an answer or a log line;
reading a log writes no audit record (it changes nothing).
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

from flask import Blueprint, current_app, jsonify, request

from lpmos.auth import Role
from lpmos.models import ValidationError, validate_name, validate_sn
from lpmos.nodeapi import SharedKey, sign
from web.auth import requires
from web.context import WebContext, ctx
from web.http import ApiError

bp = Blueprint("api_logs", __name__, url_prefix="/api/v1")

#: largest node answer read (the node's default bound is 8 MiB per attempt)
NODE_ANSWER_MAX = 64 * 1024 * 1024


def call_node(base_url: str, target: str, headers: dict[str, str], timeout: float, *,
              max_bytes: int = NODE_ANSWER_MAX) -> tuple[int, bytes]:
    """``GET base_url + target`` within ``timeout`` seconds in all (connect,
    request, every read): ``(status, body)``.  :class:`ApiError` 504 when the
    deadline passes, 503 when the node cannot be reached, 502 for an answer
    that is no HTTP or too large."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ApiError(503, "node_unavailable", "the node registered no usable address")
    deadline = time.monotonic() + timeout

    def remaining() -> float:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return left

    kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    conn = kind(parts.hostname, parts.port, timeout=timeout)

    def arm(sock: socket.socket) -> None:
        # the connection lets go of its socket once the answer says "close";
        # the response still reads from it
        left = remaining()
        with contextlib.suppress(OSError):
            sock.settimeout(left)

    try:
        conn.request("GET", parts.path.rstrip("/") + target, headers=headers)
        sock = conn.sock
        assert sock is not None
        arm(sock)
        resp = conn.getresponse()
        body = bytearray()
        while True:
            arm(sock)
            chunk = resp.read(1 << 16)
            if not chunk:
                break
            body += chunk
            if len(body) > max_bytes:
                raise ApiError(502, "bad_node_answer",
                               f"the node's answer is larger than {max_bytes} bytes")
        return resp.status, bytes(body)
    except TimeoutError:
        raise ApiError(504, "node_timeout",
                       f"the node did not answer within {timeout:g} s") from None
    except http.client.HTTPException as exc:
        raise ApiError(502, "bad_node_answer", f"the node's answer is no HTTP: "
                                               f"{type(exc).__name__}") from None
    except OSError as exc:
        raise ApiError(503, "node_unavailable",
                       f"the node cannot be reached ({type(exc).__name__})") from None
    finally:
        conn.close()


def _shared_key(c: WebContext) -> SharedKey:
    key: SharedKey = current_app.extensions.setdefault("lpmos_node_key",
                                                       SharedKey(c.store, c.keys))
    return key


def _attempt(task_attempt: int, raw: str | None, where: str) -> int:
    if raw in (None, ""):
        attempt = task_attempt
    else:
        try:
            attempt = int(raw)  # type: ignore[arg-type]
        except ValueError:
            raise ApiError(400, "bad_request", "attempt: an integer") from None
    if task_attempt < 1:
        raise ApiError(404, "no_attempt", f"{where} has not been approved yet: no attempt")
    if not 1 <= attempt <= task_attempt:
        raise ApiError(404, "no_attempt", f"{where} has attempts 1 to {task_attempt}")
    return attempt


@bp.get("/tasks/<idc>/<sn>/log")
@requires(Role.VIEWER)
def task_log(idc: str, sn: str) -> Any:
    """The full install log of one attempt (``?attempt=N``, default the
    current one), fetched from the regional node that served it within
    ``--node-timeout``: ``{"idc", "sn", "attempt", "attempts", "node",
    "first_line", "truncated", "lines"}``; ``first_line`` lines were dropped
    by the node's size bound before ``lines``.  404 for an unknown task,
    attempt or log; 503 or 504 when the node is down or slow."""
    c = ctx()
    try:
        idc, sn = validate_name(idc, "idc"), validate_sn(sn, "sn")
    except ValidationError as exc:
        raise ApiError(404, "not_found", f"no task for {idc}/{sn}: {exc}") from None
    where = f"{idc}/{sn}"
    entry = c.index.task(idc, sn)
    if entry is None:
        raise ApiError(404, "not_found", f"no task for {where}")
    task = entry.task
    attempt = _attempt(task.attempt, request.args.get("attempt"), where)
    node = task.node_of_attempt(attempt)
    if not node:
        raise ApiError(404, "no_log", f"attempt {attempt} of {where} was not served by a "
                                      "regional node (never claimed), so no node keeps its log")
    record = c.index.node(idc, node)
    url = record.get("advertise_url") if record is not None else None
    if not isinstance(url, str) or not url:
        raise ApiError(503, "node_unavailable",
                       f"node {node} of {idc}, which keeps the log of attempt {attempt}, is "
                       "not registered (down?); ask again once it is back")
    target = f"/node/v1/logs/{sn}?attempt={attempt}"
    shared = _shared_key(c)
    timeout = float(c.setting("web.node_timeout", 3.0))
    started = time.monotonic()
    status, body = 0, b""
    for _try in range(2):
        try:
            auth = sign(shared.get(), "GET", target, time.time())
        except ValueError as exc:           # StoreError: the app's 503 "unavailable"
            raise ApiError(503, "unavailable", str(exc)) from None
        left = timeout - (time.monotonic() - started)
        if left <= 0:
            raise ApiError(504, "node_timeout", f"node {node} did not answer within "
                                                f"{timeout:g} s")
        try:
            status, body = call_node(url, target, {"Authorization": auth}, left)
        except ApiError as exc:
            c.metrics.inc("web_node_calls_total", result=exc.error)
            exc.detail = f"node {node} of {idc}: {exc.detail}"
            raise
        if status != 401 or not shared.refresh():      # 401: the key may have been rotated
            break
    c.metrics.inc("web_node_calls_total", result=str(status))
    return _answer(status, body, node, where, attempt, task.attempt)


def _answer(status: int, body: bytes, node: str, where: str, attempt: int,
            attempts: int) -> Any:
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if status == 404:
        raise ApiError(404, "no_log", f"node {node} keeps no log of attempt {attempt} of {where} "
                                      "(nodes keep the newest attempts only)")
    if status == 401:
        raise ApiError(502, "node_refused", f"node {node} refused the control plane's signature "
                                            "(the node-API key in etcd changed?)")
    lines = data.get("lines") if isinstance(data, dict) else None
    if status != 200 or not isinstance(lines, list) or \
            not all(isinstance(line, str) for line in lines):
        raise ApiError(502, "bad_node_answer", f"node {node} answered {status} without a log")
    first = data.get("first_line") if isinstance(data, dict) else 0
    first = first if isinstance(first, int) and not isinstance(first, bool) else 0
    idc, sn = where.split("/", 1)
    return jsonify({"idc": idc, "sn": sn, "attempt": attempt, "attempts": attempts,
                    "node": node, "first_line": first, "truncated": first > 0,
                    "lines": lines})
