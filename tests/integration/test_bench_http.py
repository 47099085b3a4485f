"""The boot HTTP benchmark and its load generator run and print their
table on a tiny input (no speed is asserted anywhere)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from bench.http_loadgen import ProtocolError, build_requests, canned_answer, parse_head, run

REPO = Path(__file__).resolve().parent.parent.parent


def test_parse_head_reads_status_length_and_close() -> None:
    assert parse_head(b"http/1.1 200 ok\r\ncontent-length: 553") == (200, 553, False)
    assert parse_head(b"http/1.1 404 not found\r\nconnection: close\r\ncontent-length: 0") \
        == (404, 0, True)
    assert parse_head(b"http/1.0 200 ok\r\ncontent-length: 5") == (200, 5, True)
    assert parse_head(b"http/1.1 200 ok\r\nserver: x") == (200, -1, True)   # until EOF


@pytest.mark.parametrize("head", [b"garbage", b"http/1.1 200 ok\r\ntransfer-encoding: chunked",
                                  b"http/1.1 200 ok\r\ncontent-length: -4",
                                  b"http/1.1 200 ok\r\ncontent-length: x"])
def test_parse_head_refuses_what_it_cannot_measure(head: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_head(head)


class OneShotServer:
    """Answers each request with a canned body; after every ``close_every``
    answers it says ``Connection: close`` and closes (as gunicorn's sync
    workers do), to exercise reconnects."""

    def __init__(self, body: bytes, close_every: int = 0) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.answer = canned_answer(body)
        self.last = self.answer.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n", 1)
        self.close_every = close_every
        self.served = 0
        self.lock = threading.Lock()
        self._acceptor = threading.Thread(target=self._accept, daemon=True)
        self._acceptor.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        n = 0
        with conn:
            buf = b""
            while True:
                try:
                    data = conn.recv(4096)
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    buf = buf.split(b"\r\n\r\n", 1)[1]
                    n += 1
                    closing = bool(self.close_every) and n % self.close_every == 0
                    with self.lock:
                        self.served += 1          # before the answer: the client may be done
                    conn.sendall(self.last if closing else self.answer)
                    if closing:
                        return

    def close(self) -> None:
        # close() alone does not wake a thread blocked in accept(): the socket
        # would go on listening (and answering) after the test; shutdown() does
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._acceptor.join(5)
        self.sock.close()


@pytest.mark.parametrize("close_every", [0, 3])
def test_load_generator_counts_every_answer(close_every: int) -> None:
    server = OneShotServer(b"x" * 553, close_every)
    port = server.port
    try:
        res = run(build_requests(f"http://127.0.0.1:{server.port}/boot.ipxe", []),
                  connections=4, duration=30.0, max_requests=200)   # ends at 200
    finally:
        server.close()
    assert res.ok == 200 and not res.errors
    assert res.body_bytes == 200 * 553
    assert res.statuses[200] == 200
    assert server.served == 200
    with pytest.raises(ConnectionRefusedError):     # the test's server is gone
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    if close_every:
        assert res.connects >= 200 // close_every      # reconnected after every close
    else:
        assert res.connects == 4


def test_load_generator_counts_a_dead_server_as_errors() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]                  # nothing listens here
    res = run(build_requests(f"http://127.0.0.1:{port}/", []), connections=2, duration=0.5,
              max_requests=20)
    assert res.ok == 0 and sum(res.errors.values()) > 0


@pytest.mark.slow
def test_http_bench_quick_prints_its_table(tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.http_bench", "--quick", "--tasks", "40", "--installs", "2",
         "--seconds", "0.3", "--connections", "4", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    text = proc.stdout
    for needle in ("Boot HTTP benchmark", "first script", "machine script", "kickstart",
                   "requests/s", "p99 ms", "gunicorn", "etcd requests/script",
                   "load generator ceiling", "target (per-machine scripts"):
        assert needle in text, needle
    data = json.loads(out.read_text())
    for target in ("ours", "reference"):
        for scenario in ("first script", "machine script", "kickstart"):
            summary = data["median"][target][scenario]
            assert summary["requests"] > 0 and summary["errors"] == 0, (target, scenario)
    # non-destructive answers never reach etcd (the node's own counter)
    assert data["median"]["ours"]["machine script"]["etcd_requests_per_script"] == 0
    assert data["median"]["ours"]["first script"]["etcd_requests_per_script"] == 0
    assert data["body_sizes"]["machine"] > 0
