"""The pure WSGI side of the boot HTTP server: the environ of a parsed
request, and the response head with its keep-alive decision."""

from __future__ import annotations

import pytest

from bootsvc.http.wsgi import ParsedRequest, build_environ, build_head


def _request(headers: list[tuple[bytes, bytes]], body: bytes = b"") -> ParsedRequest:
    req = ParsedRequest()
    req.method, req.path, req.query = b"POST", b"/boot/a%3Ab.ipxe", b"x=1"
    req.headers, req.body = headers, [body] if body else []
    return req


@pytest.mark.parametrize(("headers", "body", "expected"), [
    ([], b"", {}),
    ([(b"Content-Type", b"application/json")], b"", {"CONTENT_TYPE": "application/json"}),
    ([(b"Content-Length", b"3")], b"abc", {"CONTENT_LENGTH": "3"}),
    ([], b"abc", {"CONTENT_LENGTH": "3"}),
    ([(b"X-A", b"1"), (b"x-a", b"2")], b"", {"HTTP_X_A": "1,2"}),
    ([(b"Authorization", b"Bearer t")], b"", {"HTTP_AUTHORIZATION": "Bearer t"}),
])
def test_build_environ_headers_and_body(headers: list[tuple[bytes, bytes]], body: bytes,
                                        expected: dict[str, str]) -> None:
    environ = build_environ(_request(headers, body), peer=("10.0.0.9", 4242),
                            server_name="0.0.0.0", server_port=8081)
    assert {k: environ[k] for k in expected} == expected
    assert "CONTENT_LENGTH" in environ or not body
    assert (environ["REQUEST_METHOD"], environ["PATH_INFO"], environ["QUERY_STRING"],
            environ["REMOTE_ADDR"], environ["REMOTE_PORT"], environ["SERVER_PORT"]) == \
        ("POST", "/boot/a:b.ipxe", "x=1", "10.0.0.9", "4242", "8081")
    assert environ["wsgi.input"].read() == body


@pytest.mark.parametrize(("status", "headers", "length", "keep_alive", "lines", "keep"), [
    ("200 OK", [("Content-Length", "2")], 2, True, ["Content-Length: 2"], True),
    ("200 OK", [], 5, True, ["Content-Length: 5"], True),
    ("200 OK", [], None, True, ["Connection: close"], False),
    ("200 OK", [("Content-Length", "2")], 2, False, ["Content-Length: 2", "Connection: close"],
     False),
    ("304 Not Modified", [], None, True, [], True),
    ("204 No Content", [], 0, True, [], True),
    ("200 OK", [("Connection", "upgrade"), ("Transfer-Encoding", "chunked"),
                ("Keep-Alive", "5"), ("X-A", "1")], 0, True,
     ["X-A: 1", "Content-Length: 0"], True),
    (None, None, 0, True, ["Content-Length: 0"], True),
])
def test_build_head_frames_the_answer(status: str | None, headers: list[tuple[str, str]] | None,
                                      length: int | None, keep_alive: bool, lines: list[str],
                                      keep: bool) -> None:
    head, kept = build_head(status, headers, length=length, keep_alive=keep_alive)
    text = head.decode("latin-1")
    assert text.startswith(f"HTTP/1.1 {status or '500 Internal Server Error'}\r\n")
    assert text.endswith("\r\n\r\n")
    assert text.split("\r\n")[1:-2] == lines
    assert kept is keep
