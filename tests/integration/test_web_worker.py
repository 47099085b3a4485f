"""web.worker.BufferedThreadWorker: request headers are read in the worker's
event loop with a deadline, so slow clients hold no thread.

One ``lpmos control-plane`` (gunicorn, 48 threads, ``--header-timeout 4``)
against the session's real etcd serves every test of the module; the pure
codecs (:func:`web.worker.scan_head`, :func:`web.worker.build_refusal`) are
tested as tables first.
"""

from __future__ import annotations

import json
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import websocket

from lpmos.auth import Auth
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from tests.reliability.support import ControlPlane
from web.worker import MAX_HEAD, MAX_WAITING, Head, build_refusal, scan_head

HEADER_TIMEOUT = 4.0
BODY_TIMEOUT = 3.0
GET = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"


# --- the pure codecs -------------------------------------------------------------------


@pytest.mark.parametrize(("buf", "limit", "state", "resume"), [
    (b"", 100, Head.PARTIAL, 0),
    (b"GET / HTTP/1.1\r\nHost: x\r\n", 100, Head.PARTIAL, 25),
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", 100, Head.COMPLETE, 27),
    (b"GET / HTTP/1.1\r\n\r\nbody-or-next", 100, Head.COMPLETE, 18),
    (b"\r\n\r\n", 100, Head.PARTIAL, 4),                     # empty lines only
    (b"\r\nGET / HTTP/1.1\r\n\r\n", 100, Head.COMPLETE, 20),
    (b"GET / HTTP/1.1\r\n\r\n", 18, Head.COMPLETE, 18),       # exactly the limit
    (b"GET / HTTP/1.1\r\n\r\n", 17, Head.TOO_LARGE, 18),
    (b"x" * 101, 100, Head.TOO_LARGE, 101),
    (b"x" * 100, 100, Head.PARTIAL, 100),
])
def test_scan_head_decides_on_the_blank_line_and_the_limit(
        buf: bytes, limit: int, state: Head, resume: int) -> None:
    assert scan_head(buf, limit) == (state, resume)


def test_scan_head_resumes_across_a_split_terminator() -> None:
    whole = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    for cut in range(1, len(whole)):
        state, resume = scan_head(whole[:cut], 100)
        assert state is Head.PARTIAL
        assert scan_head(whole, 100, resume) == (Head.COMPLETE, len(whole)), cut


def test_build_refusal_is_a_complete_closing_answer() -> None:
    raw = build_refusal(431, "header_too_large", 'over "64" bytes')
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 431 Request Header Fields Too Large"
    assert "Connection: close" in lines and f"Content-Length: {len(body)}" in lines
    assert json.loads(body) == {"error": "header_too_large", "detail": 'over "64" bytes'}


# --- against the real control plane ------------------------------------------------------


@pytest.fixture(scope="module")
def cp(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    prefix = "/worker-" + uuid.uuid4().hex[:8]
    plane = ControlPlane(etcd_server.url, prefix, tmp_path_factory.mktemp("worker"),
                         name="cp-worker", flags=["--header-timeout", str(HEADER_TIMEOUT),
                                                  "--body-timeout", str(BODY_TIMEOUT)])
    try:
        yield plane.start()
    finally:
        plane.kill()


def metric(cp: ControlPlane, reason: str) -> float:
    text = requests.get(cp.url + "/metrics", timeout=10).text
    line = f'lpmos_web_refused_total{{reason="{reason}"}} '
    return sum(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith(line))


def read_response(s: socket.socket, buf: bytes = b"") -> tuple[int, bytes, bytes]:
    """One response (status, body) read off ``s``, and the bytes after it."""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        assert chunk, f"closed before a response: {buf!r}"
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        chunk = s.recv(65536)
        assert chunk, "closed mid-body"
        rest += chunk
    return int(head.split(b" ", 2)[1]), rest[:length], rest[length:]


def closed_by_peer(s: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``s`` (EOF or reset) within ``timeout``,
    ignoring any answer it sends first."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def open_slow(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        socks.append(s)
    return socks


def still_open(s: socket.socket) -> bool:
    s.setblocking(False)
    try:
        return s.recv(1) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        s.setblocking(True)


@pytest.mark.slow
def test_hundred_slow_clients_hold_no_thread(cp: ControlPlane) -> None:
    """100 clients (more than the 48 threads) dribble their headers; normal
    requests are all answered while every slow client is still connected —
    with headers read on threads they could only be answered after the slow
    ones were cut — and the slow ones are then cut at the deadline."""
    before = metric(cp, "header_timeout")
    started = time.monotonic()
    slow = open_slow(cp.port, 100)
    lat: list[float] = []
    try:
        with requests.Session() as session:
            for i in range(30):
                for s in slow[i::30]:
                    s.send(b"a")
                t0 = time.monotonic()
                assert session.get(cp.url + "/healthz", timeout=10).status_code == 200
                lat.append(time.monotonic() - t0)
        served_at = time.monotonic() - started
        assert all(still_open(s) for s in slow), "slow clients were cut before the deadline"
        assert served_at < HEADER_TIMEOUT, f"normal requests took {served_at:.1f}s in all"
        assert all(closed_by_peer(s, HEADER_TIMEOUT + 10) for s in slow)
        cut_at = time.monotonic() - started
    finally:
        for s in slow:
            s.close()
    lat.sort()
    print(f"100 slow clients: 30 normal requests, max {lat[-1] * 1000:.1f} ms, "
          f"median {lat[15] * 1000:.1f} ms; slow ones all cut by {cut_at:.1f}s")
    assert cut_at >= HEADER_TIMEOUT - 0.5
    assert metric(cp, "header_timeout") - before >= 100


def test_unfinished_headers_get_408_at_the_deadline_fresh_and_kept_alive(
        cp: ControlPlane) -> None:
    before = metric(cp, "header_timeout")
    fresh = socket.create_connection(("127.0.0.1", cp.port), timeout=HEADER_TIMEOUT + 10)
    kept = socket.create_connection(("127.0.0.1", cp.port), timeout=HEADER_TIMEOUT + 10)
    try:
        kept.sendall(GET)
        assert read_response(kept)[0] == 200
        started = time.monotonic()
        fresh.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")     # the next request, unfinished
        for s in (fresh, kept):
            status, body, _ = read_response(s)
            assert status == 408 and json.loads(body)["error"] == "header_timeout"
            assert closed_by_peer(s, 10)
        took = time.monotonic() - started
    finally:
        fresh.close()
        kept.close()
    assert HEADER_TIMEOUT - 0.5 <= took < HEADER_TIMEOUT + 5, took
    assert metric(cp, "header_timeout") - before >= 2


def test_header_block_over_the_limit_is_refused_with_431(cp: ControlPlane) -> None:
    before = metric(cp, "header_too_large")
    # under the limit (10 fields of 6 KiB, within gunicorn's own field limits): served
    fields = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 6000) for i in range(10))
    with socket.create_connection(("127.0.0.1", cp.port), timeout=15) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + fields + b"\r\n")
        assert read_response(s)[0] == 200
    # over it, sent whole, and sent without ever ending the block
    over = b"".join(b"X-F%d: %s\r\n" % (i, b"v" * 6000) for i in range(MAX_HEAD // 6000 + 1))
    for tail in (b"\r\n", b""):
        with socket.create_connection(("127.0.0.1", cp.port), timeout=15) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + over + tail)
            status, body, _ = read_response(s)
            assert status == 431 and json.loads(body)["error"] == "header_too_large"
            assert closed_by_peer(s, 10)
    assert metric(cp, "header_too_large") - before == 2
    assert requests.get(cp.url + "/healthz", timeout=10).status_code == 200


def test_keep_alive_serves_split_and_pipelined_requests(cp: ControlPlane) -> None:
    with socket.create_connection(("127.0.0.1", cp.port), timeout=15) as s:
        s.sendall(GET)
        status, _, rest = read_response(s)
        assert status == 200 and rest == b""
        # the next request in two pieces
        s.sendall(GET[:20])
        time.sleep(0.3)
        s.sendall(GET[20:])
        status, _, rest = read_response(s)
        assert status == 200 and rest == b""
        # a request, a whole second one and the start of a third in one segment:
        # the parser's read-ahead goes back through the header buffering
        s.sendall(GET + GET + GET[:10])
        status, _, rest = read_response(s)
        assert status == 200
        status, _, rest = read_response(s, rest)
        assert status == 200
        time.sleep(0.3)
        s.sendall(GET[10:])
        status, body, rest = read_response(s, rest)
        assert status == 200 and json.loads(body)["status"] == "ok" and rest == b""
    # a POST body still reaches the app (read by the thread, after the replayed head)
    r = requests.post(cp.url + "/login", data={"username": "nobody", "password": "x" * 20},
                      timeout=10, allow_redirects=False)
    assert r.status_code in (200, 302, 400, 401, 403), r.status_code


def test_websocket_upgrade_still_works(cp: ControlPlane, etcd_server: Any) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    try:
        auth = Auth(store, Keys(cp.prefix))
        auth.put_user("wsv", "viewer", "password-123")
        token, _ = auth.create_token("wsv")
    finally:
        store.close()
    ws = websocket.create_connection(f"ws://127.0.0.1:{cp.port}/ws", timeout=30,
                                     header=[f"Authorization: Bearer {token}"])
    try:
        assert json.loads(ws.recv())["t"] == "hello"
        ws.send(json.dumps({"t": "ping"}))
        msg = json.loads(ws.recv())
        while msg["t"] != "pong":
            msg = json.loads(ws.recv())
    finally:
        ws.close()


@pytest.mark.slow
def test_waiting_connections_are_bounded_oldest_evicted(cp: ControlPlane) -> None:
    before = metric(cp, "header_backlog")
    extra = 10
    slow = open_slow(cp.port, MAX_WAITING + extra)
    try:
        assert requests.get(cp.url + "/healthz", timeout=10).status_code == 200
        # the oldest ones were evicted with a 503, the newest still wait
        for s in slow[:extra]:
            status, body, _ = read_response(s)
            assert status == 503 and json.loads(body)["error"] == "busy"
        assert all(still_open(s) for s in slow[-extra:])
    finally:
        for s in slow:
            s.close()
    assert metric(cp, "header_backlog") - before >= extra


@pytest.mark.parametrize("framing", ["length", "chunked"])
def test_a_body_must_arrive_within_the_body_timeout(cp: ControlPlane, framing: str) -> None:
    """Headers complete, then a body dribbled: 408 at ``--body-timeout`` for
    the whole body (a byte now and then does not extend it), the connection
    closed; a body sent in pieces within the deadline is served as usual."""
    form = b"username=nobody&password=" + b"x" * 40
    if framing == "length":
        head = (b"POST /login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Content-Length: %d\r\n\r\n" % len(form))
        body = form
    else:
        head = (b"POST /login HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/x-www-form-urlencoded\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n")
        body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(form), form)
    before = metric(cp, "body_timeout")
    with socket.create_connection(("127.0.0.1", cp.port), timeout=15) as s:
        s.sendall(head + body[:5])
        started = time.monotonic()
        answer = b""
        try:
            for _ in range(int(BODY_TIMEOUT * 4) + 8):  # one byte every 0.25 s: never silent
                time.sleep(0.25)
                s.sendall(body[5:6])
                if time.monotonic() - started > BODY_TIMEOUT + 1.5:
                    break
        except OSError:
            pass
        status, payload, _ = read_response(s, answer)
        took = time.monotonic() - started
        assert status == 408 and json.loads(payload)["error"] == "request_timeout"
        assert BODY_TIMEOUT - 0.5 < took < BODY_TIMEOUT + 2.5, took
        assert closed_by_peer(s, 5.0)
    assert metric(cp, "body_timeout") >= before + 1
    # in two pieces within the deadline: the app gets the whole body
    with socket.create_connection(("127.0.0.1", cp.port), timeout=15) as s:
        s.sendall(head + body[:7])
        time.sleep(0.5)
        s.sendall(body[7:])
        status, _, _ = read_response(s)
    assert status in (200, 302, 400, 401, 403), status
