"""A TFTP server for tests and benches that drive it from blocking code."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from bootsvc.tftp.server import TftpServer
from bootsvc.threaded_loop import ThreadedLoop


class ThreadedTftpServer:
    """A :class:`TftpServer` on its own event loop in a daemon thread; the
    keyword arguments are :class:`TftpServer`'s::

        with ThreadedTftpServer(root, host="127.0.0.1", port=0) as server:
            fetch(server.port)
    """

    def __init__(self, root: Path, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._root = root
        self._loop: ThreadedLoop | None = None
        self.server: TftpServer | None = None

    def __enter__(self) -> TftpServer:
        self._loop = ThreadedLoop("tftp-server")

        async def start() -> TftpServer:
            server = TftpServer(self._root, **self._kwargs)
            await server.start()
            return server

        self.server = self._loop.call(start(), 10)
        return self.server

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the server's loop and return its result (thread-safe
        access to the server's state)."""
        async def run() -> Any:
            return fn()
        assert self._loop is not None
        return self._loop.call(run(), 10)

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None
        if self.server is not None:
            self._loop.call(self.server.stop(), 10)
        self._loop.close()


__all__ = ["ThreadedTftpServer"]
