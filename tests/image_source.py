"""A small HTTP image source for the managed image tests: the origin a
regional node fetches from (an operator's web server, or the control
plane's file route with its node signature), on loopback."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lpmos.nodeapi import verify


class ImageSource:
    """A small HTTP file server: ``files`` by path, one ``Range`` honoured,
    ``rate`` bytes/s per path, ``hang`` paths that never answer; every
    request's path and Range header is kept in ``seen``."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.rate: dict[str, int] = {}
        self.hang: set[str] = set()
        #: paths answered 200 with the whole file whatever the Range
        self.ignore_range: set[str] = set()
        #: path -> where it redirects (302)
        self.redirect: dict[str, str] = {}
        #: path -> statuses answered first, one per request (e.g. [503, 503])
        self.errors: dict[str, list[int]] = {}
        #: path -> bytes after which the next answer is cut off (once)
        self.cut: dict[str, int] = {}
        #: path -> the node API key its requests must be signed with
        self.signed: dict[str, bytes] = {}
        self.refused: list[str] = []
        self.seen: list[tuple[str, str]] = []
        self.stopping = threading.Event()
        source = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                rng = self.headers.get("Range", "")
                source.seen.append((self.path, rng))
                if self.path in source.hang:
                    source.stopping.wait(120)
                    return
                key = source.signed.get(self.path.split("?", 1)[0])
                if key is not None:
                    why = verify(key, "GET", self.path, self.headers.get("Authorization"),
                                 time.time())
                    if why:
                        source.refused.append(why)
                        self.send_error(401, "Unauthorized")
                        return
                pending = source.errors.get(self.path)
                if pending:
                    self.send_error(pending.pop(0))
                    return
                target = source.redirect.get(self.path)
                if target is not None:
                    self.send_response(302)
                    self.send_header("Location", target)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = source.files.get(self.path.split("?", 1)[0])
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                start = 0
                if rng.startswith("bytes=") and rng.endswith("-") and \
                        self.path not in source.ignore_range:
                    start = int(rng[6:-1])
                if start >= len(data) > 0:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.end_headers()
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.send_header("Content-Length", str(len(data) - start))
                self.end_headers()
                rate = source.rate.get(self.path, 0)
                cut = source.cut.pop(self.path, None)
                end = len(data) if cut is None else min(len(data), start + cut)
                block = 256 * 1024
                try:
                    for offset in range(start, end, block):
                        if source.stopping.is_set():
                            return
                        self.wfile.write(data[offset:min(offset + block, end)])
                        if rate:
                            time.sleep(block / rate)
                except (BrokenPipeError, ConnectionResetError):
                    return
                if cut is not None:
                    self.close_connection = True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self) -> None:
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
