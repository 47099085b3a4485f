"""Sending a span of a file on an asyncio transport with ``sendfile(2)``.

The kernel moves the bytes from the page cache to the socket; the process
never reads them.  :func:`send_span` calls :meth:`asyncio.loop.sendfile`
(``os.sendfile`` on the selector loop, each call taking what the socket's
buffer has room for) in *chunks* whose size follows the client's pace:
doubled up to :data:`CHUNK_MAX` while a chunk goes out in well under a
second, halved down to :data:`CHUNK_MIN` when it takes longer.  Between
chunks it reports progress, so the server can tell a slow client from one
that stopped reading: a client that takes the server's timeout for one
chunk (at least 256 KiB) is dropped, the way nginx's ``send_timeout``
bounds the time between two writes.  Backpressure is the socket's: a
chunk waits while the client's window and our send buffer are full.

Memory per transfer is constant (a few objects, one open file), whatever
the file's size and the number of clients.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import BinaryIO

CHUNK_MIN = 256 * 1024
CHUNK_FIRST = 1 << 20
CHUNK_MAX = 16 << 20
FAST = 0.25         # a chunk sent within this many seconds: the next one doubles
SLOW = 1.0          # one that took longer: the next one halves

#: ``done(sent_bytes, outcome)``, outcome ``complete``, ``disconnect``,
#: ``timeout`` or ``shutdown``
DoneCallback = Callable[[int, str], None]


@dataclass
class FileAnswer:
    """An answer whose body is a span of an open file.

    ``headers`` carry everything but the status line and ``Connection``
    (``Content-Length`` included).  ``file`` is ``None`` for an answer
    without a body (304, 416); otherwise the server sends ``length`` bytes
    from ``start`` (none for HEAD) and closes it, whatever happens.
    ``done`` is called once when the answer ends."""

    status: int
    headers: list[tuple[str, str]]
    file: BinaryIO | None = None
    start: int = 0
    length: int = 0
    done: DoneCallback | None = field(default=None, repr=False)

    def finish(self, sent: int, outcome: str) -> None:
        """Close the file and report the outcome (once)."""
        if self.file is not None:
            self.file.close()
            self.file = None
        done, self.done = self.done, None
        if done is not None:
            done(sent, outcome)


async def send_span(loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport,
                    file: BinaryIO, start: int, length: int,
                    progress: Callable[[int], None]) -> int:
    """Send ``length`` bytes of ``file`` from ``start`` on ``transport``
    (whose buffered writes go out first); ``progress(sent_so_far)`` after
    each chunk.  Returns the bytes sent; raises :class:`ConnectionError`
    when the client went away (a short file counts as that too: the
    ``Content-Length`` promised can no longer be kept)."""
    sent = 0
    chunk = CHUNK_FIRST
    clock = time.monotonic
    native_failed = False
    while sent < length:
        if transport.is_closing():
            raise ConnectionError("client went away")
        n = min(chunk, length - sent)
        began = clock()
        try:
            got = await loop.sendfile(transport, file, start + sent, n, fallback=native_failed)
        except asyncio.SendfileNotAvailableError:
            # os.sendfile failed before sending a byte: the client is gone
            # (EPIPE, ECONNRESET) or, on the very first chunk, the file or
            # the loop cannot do it; then asyncio's fallback (read and
            # write in 256 KiB blocks) does the rest
            if sent or native_failed:
                raise ConnectionError("sendfile failed: the client went away") from None
            native_failed = True
            continue
        except RuntimeError as exc:     # "Transport is closing" and the like
            raise ConnectionError(str(exc)) from exc
        if got <= 0:
            raise ConnectionError(f"file ended {length - sent} bytes short")
        sent += got
        progress(sent)
        took = clock() - began
        if took < FAST:
            chunk = min(chunk * 2, CHUNK_MAX)
        elif took > SLOW:
            chunk = max(chunk // 2, CHUNK_MIN)
    return sent


__all__ = ["CHUNK_MAX", "CHUNK_MIN", "FileAnswer", "send_span"]
