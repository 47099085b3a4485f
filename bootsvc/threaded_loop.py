"""An asyncio loop in a daemon thread, for running one of the node's
asyncio servers (TFTP, boot HTTP) outside the node's own loop: tests,
benches and tools that drive it from blocking code."""

from __future__ import annotations

import asyncio
import threading
from typing import Any


class ThreadedLoop:
    """``call(coro)`` runs a coroutine on the loop and returns its result;
    ``close()`` stops the loop and its thread."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def call(self, coro: Any, timeout: float = 15.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self, timeout: float = 10.0) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)
        if not self.loop.is_running():
            self.loop.close()


__all__ = ["ThreadedLoop"]
