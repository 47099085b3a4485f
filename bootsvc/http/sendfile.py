"""Sending a span of a file on an asyncio transport with ``sendfile(2)``.

The kernel moves the bytes from the page cache to the socket; the process
never reads them.  :func:`send_span` makes non-blocking ``os.sendfile``
calls of up to :data:`STEP` bytes on a small thread pool (the call
releases the GIL, so the event loop keeps answering while the kernel
works) and, when the socket's buffer is full, waits on the loop for it to
be writable: backpressure is the socket's (a slow client's window and our
send buffer), and the pool's queue gives every client its turn.  Each call
reports progress, so the server can tell a slow client from one that
stopped reading: a client that accepts no byte for the server's timeout is
dropped, the way nginx's ``send_timeout`` bounds the time between two
writes.  Without a socket (or a file that
``sendfile`` refuses) it falls back to :meth:`asyncio.loop.sendfile` in
chunks paced by the client.

Memory per transfer is constant (a few objects, one open file and
two duplicate descriptors), whatever the file's size and the number of clients.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import os
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import BinaryIO

CHUNK_MIN = 256 * 1024
CHUNK_FIRST = 1 << 20
CHUNK_MAX = 16 << 20
#: bytes per os.sendfile call on the direct path (on a pool thread): the
#: larger, the less CPU per byte (on loopback one call keeps moving bytes
#: while the receiver drains); 4 MiB and 16 MiB measured alike, 1 MiB and
#: less cost up to 2x the CPU per byte (bench/README.md, image delivery)
STEP = 16 << 20
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
                    progress: Callable[[int], None],
                    executor: Executor | None = None) -> int:
    """Send ``length`` bytes of ``file`` from ``start`` on ``transport``
    (whose buffered writes go out first); ``progress(sent_so_far)`` as it
    goes.  Returns the bytes sent; raises :class:`ConnectionError` when the
    client went away (a short file counts as that too: the
    ``Content-Length`` promised can no longer be kept).

    With an ``executor`` and a socket transport: :func:`_send_direct`
    (``os.sendfile`` calls on the executor's threads); otherwise, or when
    the file cannot be sent that way, asyncio's own :meth:`loop.sendfile`
    in chunks (:func:`_send_chunked`)."""
    sock = transport.get_extra_info("socket")
    if executor is not None and sock is not None and hasattr(os, "sendfile"):
        sent = await _send_direct(loop, executor, transport, sock.fileno(), file, start,
                                  length, progress)
        if sent == length:
            return sent
        start, length = start + sent, length - sent
    return await _send_chunked(loop, transport, file, start, length, progress)


class _NotSendable(Exception):
    """os.sendfile refused the file before sending a byte (not a regular file)."""


def _try_sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int | None:
    """One non-blocking ``sendfile``: the bytes sent, ``None`` when the
    socket's buffer is full.  Runs on an executor thread (it releases the
    GIL, and on loopback the call also does the receiver's share)."""
    try:
        return os.sendfile(out_fd, in_fd, offset, count)
    except (BlockingIOError, InterruptedError):
        return None


async def _writable(loop: asyncio.AbstractEventLoop, fd: int) -> None:
    ready: asyncio.Future[None] = loop.create_future()

    def on_writable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_writer(fd, on_writable)
    try:
        await ready
    finally:
        loop.remove_writer(fd)


async def _send_direct(loop: asyncio.AbstractEventLoop, executor: Executor,
                       transport: asyncio.WriteTransport, sock_fd: int, file: BinaryIO,
                       start: int, length: int, progress: Callable[[int], None]) -> int:
    """The body by ``os.sendfile`` calls of up to :data:`STEP` bytes on
    ``executor``'s threads, on duplicates of the socket's and the file's
    descriptors: the transport keeps its own (reading paused meanwhile, its
    write buffer empty), and a call still running when the transfer is
    cancelled keeps its duplicates until it returns (they are closed then,
    so no descriptor number is reused under it).  When the socket's buffer
    is full the loop waits for it to be writable.

    Why threads: the kernel's work per byte (on loopback, the receiver's
    TCP too) is most of the cost, and the event loop, which also answers
    DHCP, TFTP and boot scripts, would otherwise wait for every call; on
    threads the calls run beside it, on every core, like nginx's workers.
    Returns the bytes sent: ``length``, or 0 when the file cannot be sent
    this way (the caller falls back)."""
    while transport.get_write_buffer_size():        # the head, earlier answers
        if transport.is_closing():
            raise ConnectionError("client went away")
        await asyncio.sleep(0.005)
    if transport.is_closing():
        raise ConnectionError("client went away")
    reading = isinstance(transport, asyncio.ReadTransport) and transport.is_reading()
    if reading:
        assert isinstance(transport, asyncio.ReadTransport)
        transport.pause_reading()
    fds = (os.dup(sock_fd), os.dup(file.fileno()))
    pending: concurrent.futures.Future[int | None] | None = None
    sent = 0
    try:
        while sent < length:
            pending = executor.submit(_try_sendfile, fds[0], fds[1], start + sent,
                                      min(STEP, length - sent))
            try:
                n = await asyncio.wrap_future(pending)
            except OSError as exc:
                if sent == 0 and not isinstance(exc, ConnectionError) and \
                        exc.errno in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                    return 0
                raise ConnectionError(f"sendfile: {exc}") from None
            pending = None
            if n is None:
                await _writable(loop, fds[0])
                continue
            if n == 0:
                raise ConnectionError(f"file ended {length - sent} bytes short")
            sent += n
            progress(sent)
    finally:
        if pending is not None and not pending.done():
            pending.add_done_callback(lambda _f: _close(fds))
        else:
            _close(fds)
        if reading and not transport.is_closing():
            assert isinstance(transport, asyncio.ReadTransport)
            transport.resume_reading()
    return sent


def _close(fds: tuple[int, ...]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


async def _send_chunked(loop: asyncio.AbstractEventLoop, transport: asyncio.WriteTransport,
                        file: BinaryIO, start: int, length: int,
                        progress: Callable[[int], None]) -> int:
    """:meth:`loop.sendfile` in chunks paced by the client (doubled while
    fast, halved while slow), progress after each."""
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
