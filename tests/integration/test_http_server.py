"""bootsvc.http.server on loopback: framing, limits and streaming, with raw
sockets (so every byte on the wire is checked), curl and requests."""

from __future__ import annotations

import hashlib
import json
import re
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootsvc.http.server import AsyncHttpServer
from bootsvc.threaded_loop import ThreadedLoop

BIG = bytes(range(256)) * (3 * 4096 + 7)      # ~3 MiB: streamed, not buffered


class App:
    """A WSGI app with one route per behaviour under test."""

    def __init__(self) -> None:
        self.closed = threading.Event()
        self.threads: set[str] = set()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        self.threads.add(threading.current_thread().name)
        path = environ["PATH_INFO"]
        if path == "/echo":
            body = environ["wsgi.input"].read()
            out = json.dumps({"method": environ["REQUEST_METHOD"], "len": len(body),
                              "sha": hashlib.sha256(body).hexdigest(),
                              "query": environ["QUERY_STRING"],
                              "x": environ.get("HTTP_X_TEST", ""),
                              "remote": environ["REMOTE_ADDR"]}).encode()
            start_response("200 OK", [("Content-Type", "application/json"),
                                      ("Content-Length", str(len(out)))])
            return [out]
        if path == "/big":
            start_response("200 OK", [("Content-Length", str(len(BIG)))])
            return self._chunks(BIG)
        if path == "/big-unsized":
            start_response("200 OK", [])
            return self._chunks(BIG)
        if path == "/endless":
            start_response("200 OK", [])
            return self._endless()
        if path == "/small-unsized":
            start_response("200 OK", [("Content-Type", "text/plain")])
            return [b"hello ", b"world"]
        if path == "/boom":
            raise RuntimeError("boom")
        start_response("404 Not Found", [("Content-Length", "0")])
        return [b""]

    def _chunks(self, data: bytes) -> Iterator[bytes]:
        for i in range(0, len(data), 65536):
            yield data[i:i + 65536]

    def _endless(self) -> Iterator[bytes]:
        try:
            for _ in range(100_000):          # bounded: ~6 GiB at most
                yield b"x" * 65536
        finally:
            self.closed.set()


def fast(path: str, query: str, remote: str) -> tuple[int, str, bytes] | None:
    if path == "/fast":
        return 200, "text/plain", f"fast {query} {remote}".encode()
    return None


@pytest.fixture
def server() -> Iterator[tuple[AsyncHttpServer, App]]:
    yield from _serve()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[tuple[AsyncHttpServer, App]]:
    yield from _serve()


def _serve() -> Iterator[tuple[AsyncHttpServer, App]]:
    app = App()
    refused: list[str] = []
    srv = AsyncHttpServer(app, host="127.0.0.1", port=0, threads=4, connection_limit=20,
                          timeout=1.5, max_body=100_000, max_header=4096, fast=fast,
                          on_refused=refused.append)
    srv.refused = refused  # type: ignore[attr-defined]
    loop = ThreadedLoop("http-loop-test")
    loop.call(srv.start())
    try:
        yield srv, app
    finally:
        loop.call(srv.stop())
        loop.close()


def exchange(port: int, data: bytes, *, timeout: float = 10.0) -> bytes:
    """Send ``data``, read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        out = b""
        while chunk := sock.recv(65536):
            out += chunk
    return out


def responses(raw: bytes) -> list[tuple[str, dict[str, str], bytes]]:
    """Split a byte stream of Content-Length-framed answers."""
    out = []
    while raw:
        head, _, rest = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
        n = int(headers.get("content-length", len(rest)))
        out.append((lines[0], headers, rest[:n]))
        raw = rest[n:]
    return out


def test_keep_alive_and_pipelining_answer_in_order(server: Any) -> None:
    srv, app = server
    req = (b"GET /fast?a=1 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"POST /echo?q=2 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nX-Test: t\r\n\r\nhello"
           b"GET /fast?a=3 HTTP/1.1\r\nHost: x\r\n\r\n"
           b"GET /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    got = responses(exchange(srv.port, req))
    assert [g[0] for g in got] == ["HTTP/1.1 200 OK"] * 4
    assert got[0][2] == b"fast a=1 127.0.0.1"
    echo = json.loads(got[1][2])
    assert echo == {"method": "POST", "len": 5, "sha": hashlib.sha256(b"hello").hexdigest(),
                    "query": "q=2", "x": "t", "remote": "127.0.0.1"}
    assert got[2][2] == b"fast a=3 127.0.0.1"
    assert got[3][1]["connection"] == "close"
    # the fast handler gets the path percent-decoded, as WSGI's PATH_INFO is
    raw = exchange(srv.port, b"GET /f%61st?b=%3A HTTP/1.0\r\n\r\n")
    assert raw.endswith(b"fast b=%3A 127.0.0.1")
    # the fast handler answered on the loop; the app ran on the pool
    assert all(t.startswith("http-worker") for t in app.threads), app.threads


def test_a_refusal_waits_for_the_answers_before_it(server: Any) -> None:
    """Pipelined: a request for the app, then one the parser refuses (a
    target llhttp takes but the URL parser does not): 200 first, then the
    400, then the close; nothing after the bad request is read."""
    srv, _ = server
    raw = exchange(srv.port, b"GET /echo?slow HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET http:// HTTP/1.1\r\nHost: x\r\n\r\n"
                             b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
    got = responses(raw)
    assert [g[0] for g in got] == ["HTTP/1.1 200 OK", "HTTP/1.1 400 Bad Request"], raw[:400]
    assert json.loads(got[0][2])["query"] == "slow"
    assert json.loads(got[1][2])["error"] == "bad_request"
    assert got[1][1]["connection"] == "close"


def test_http10_closes_and_head_has_no_body(server: Any) -> None:
    srv, _ = server
    raw = exchange(srv.port, b"GET /fast HTTP/1.0\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 200 OK") and b"Connection: close" in raw
    raw = exchange(srv.port, b"HEAD /big HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(BIG)}".encode() in head and body == b""


def test_large_bodies_stream_intact(server: Any) -> None:
    srv, _ = server
    url = f"http://127.0.0.1:{srv.port}"
    with requests.Session() as s:
        for _ in range(2):                          # and the connection is reused
            r = s.get(f"{url}/big", timeout=10)
            assert r.status_code == 200 and r.content == BIG
        r = s.get(f"{url}/small-unsized", timeout=10)
        assert r.content == b"hello world" and r.headers["Content-Length"] == "11"
    raw = exchange(srv.port, b"GET /big-unsized HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    assert b"Connection: close" in head and body == BIG    # unsized: ends with the close
    curl = subprocess.run(["curl", "-sS", "-o", "-", f"{url}/big"], capture_output=True,
                          timeout=30, check=True)
    assert curl.stdout == BIG


def test_client_leaving_mid_stream_frees_the_app(server: Any) -> None:
    srv, app = server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"GET /endless HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 OK")
    assert app.closed.wait(15), "the app's iterable was not closed"


def test_chunked_request_body_and_expect_continue(server: Any) -> None:
    srv, _ = server
    raw = exchange(srv.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             b"Connection: close\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
    assert json.loads(responses(raw)[0][2])["len"] == 5
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                     b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(b"abcd")
        rest = b""
        while chunk := sock.recv(4096):
            rest += chunk
    assert json.loads(responses(rest)[0][2])["len"] == 4


def test_limits_refuse_with_a_reason_and_count(server: Any) -> None:
    srv, _ = server
    # body over the limit: 413 from the header alone, before any body byte
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n")
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in answer
    # a chunked body that grows past the limit
    chunk = b"%x\r\n" % 60_000 + b"a" * 60_000 + b"\r\n"
    raw = exchange(srv.port, b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked"
                             b"\r\n\r\n" + chunk * 2)
    assert raw.startswith(b"HTTP/1.1 413 ")
    # header block over the limit
    raw = exchange(srv.port, b"GET /fast HTTP/1.1\r\nX-Big: " + b"a" * 6000 + b"\r\n\r\n")
    assert raw.startswith(b"HTTP/1.1 431 ") and b'"header_too_large"' in raw
    # a head that never ends
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        try:
            sock.sendall(b"GET /fast HTTP/1.1\r\nX-Long: ")
            for _ in range(100):                  # one header line that never ends
                sock.sendall(b"b" * 1000)
        except OSError:
            pass
        answer = sock.recv(4096)
    assert answer.startswith(b"HTTP/1.1 431 ")
    # garbage and upgrades
    assert exchange(srv.port, b"\x16\x03\x01\x02\x00garbage\r\n\r\n").startswith(
        b"HTTP/1.1 400 ")
    assert exchange(srv.port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\n"
                              b"Upgrade: websocket\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    # an app that raises: 500-less close is not acceptable; the client sees the close
    raw = exchange(srv.port, b"GET /boom HTTP/1.1\r\nHost: x\r\n\r\n")
    assert raw == b"" or raw.startswith(b"HTTP/1.1 500")
    for reason in ("too_large", "header_too_large", "bad_request", "upgrade"):
        assert reason in srv.refused, srv.refused
    # and the server still answers
    assert exchange(srv.port, b"GET /fast HTTP/1.0\r\n\r\n").startswith(b"HTTP/1.1 200")


def test_slow_and_idle_clients_are_cut_and_the_limit_holds(server: Any) -> None:
    srv, _ = server
    slow = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    idle = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    started = time.monotonic()
    slow.sendall(b"GET /fast HTTP/1.1\r\n")
    try:
        for _ in range(30):                       # one byte every 0.1 s: never silent
            slow.sendall(b"X")
            time.sleep(0.1)
    except OSError:
        pass
    data = slow.recv(4096)
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert idle.recv(10) == b""                   # idle past the timeout: closed silently
    assert time.monotonic() - started < 6
    assert "request_timeout" in srv.refused
    slow.close()
    idle.close()
    # connection limit (20): the 21st is refused with 503, the others still served
    held = [socket.create_connection(("127.0.0.1", srv.port), timeout=5) for _ in range(20)]
    try:
        time.sleep(0.2)
        raw = exchange(srv.port, b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 503 ") and b"connection_limit" in raw
        held[0].sendall(b"GET /fast HTTP/1.1\r\nHost: x\r\n\r\n")
        assert held[0].recv(4096).startswith(b"HTTP/1.1 200 OK")
    finally:
        for s in held:
            s.close()


# --- any bytes: a well-formed answer or a close, and the server keeps serving ----------

_TOKENS = st.sampled_from([b"GET", b"POST", b"HEAD", b"PUT", b"OPTIONS", b"BREW", b"get", b""])
_PATHS = st.sampled_from([b"/fast", b"/fast?x=%41", b"/echo", b"/small-unsized", b"/nope",
                          b"/f%61st", b"*", b"", b"/%zz", b"/" + b"a" * 5000,
                          b"http://h/fast"]) | st.binary(max_size=40)
_VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.", b"HTTP/1.1 x",
                             b""])
_NAMES = st.sampled_from([b"Host", b"Content-Length", b"Transfer-Encoding", b"Expect",
                          b"Connection", b"Upgrade", b"X", b""]) | st.binary(max_size=20)
_VALUES = st.sampled_from([b"0", b"5", b"-1", b"chunked", b"close", b"keep-alive",
                           b"100-continue", b"websocket", b"99999999999999999999",
                           b"gzip, chunked"]) | st.binary(max_size=30)
_REQUEST = st.builds(
    lambda method, path, version, headers, body, eol: (
        method + b" " + path + b" " + version + eol
        + b"".join(n + b": " + v + eol for n, v in headers) + eol + body),
    _TOKENS, _PATHS, _VERSIONS, st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    st.binary(max_size=200), st.sampled_from([b"\r\n", b"\n", b"\r"]))
_STATUS_OK = {200, 400, 404, 408, 413, 431, 503}


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture,
                                 HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.lists(_REQUEST | st.binary(max_size=300), min_size=1, max_size=3))
def test_any_bytes_get_an_answer_or_a_close(shared_server: Any, data: list[bytes]) -> None:
    srv, _ = shared_server
    with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as sock:
        try:
            sock.sendall(b"".join(data))
            sock.shutdown(socket.SHUT_WR)       # the server sees the end of our input
        except OSError:
            pass                                # refused and closed already
        raw = b""
        try:
            while chunk := sock.recv(65536):
                raw += chunk
        except ConnectionResetError:
            pass
    # every answer on the wire starts with a well-formed status line
    for m in re.finditer(rb"(?:^|\n)(HTTP/[^ \r\n]*) (\d{3}) ", raw):
        assert m.group(1) == b"HTTP/1.1" and int(m.group(2)) in _STATUS_OK | {100}, raw[:300]
    assert raw == b"" or raw.startswith(b"HTTP/1.1 "), raw[:300]
    # and a normal client is still served
    ok = exchange(srv.port, b"GET /fast HTTP/1.0\r\n\r\n")
    assert ok.startswith(b"HTTP/1.1 200 OK"), ok


def test_fuzzed_server_holds_no_connection_afterwards(shared_server: Any) -> None:
    """Runs after the fuzz test on the same server: every connection it made
    is gone (no session leaks on odd input)."""
    srv, _ = shared_server
    deadline = time.monotonic() + 5
    while srv.conns and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not srv.conns and srv.in_app == 0
