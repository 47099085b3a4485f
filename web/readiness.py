"""systemd notification (``Type=notify``) for the gunicorn control plane.

Who says what, and why:

* ``READY=1`` means the console answers, which is when the worker has
  loaded the app (store opened, watch cache started), not when the master
  has bound the socket (gunicorn's own ``READY=1``, which
  :meth:`lpmos.sdnotify.Notifier.from_environ` silences by unsetting
  ``$NOTIFY_SOCKET`` before gunicorn starts).  The unit keeps
  ``NotifyAccess=main``, so only the master may notify: the worker writes
  one byte into a pipe after it loaded the app (gunicorn's
  ``post_worker_init`` hook) and the master, reading the pipe in its main
  loop, sends ``READY=1``.  A respawned worker announces itself the same way
  (a ``STATUS=`` line).
* ``WATCHDOG=1`` is sent from the master's main loop (at most every half of
  ``$WATCHDOG_USEC``), so a master that stops looping stops the pings; a
  hung worker is gunicorn's to kill (its ``timeout``).
* ``STOPPING=1`` when the master begins to stop its workers.

The master loop is gunicorn's :class:`gunicorn.arbiter.Arbiter`, which runs
``murder_workers`` once per iteration (at least every second); the hook
rides on it.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

from gunicorn.arbiter import Arbiter

from lpmos.sdnotify import Notifier

#: the longest the arbiter's main loop sleeps (``wait_for_signals(timeout=1.0)``):
#: the unit's WatchdogSec= must be well above it (3 s at least)
LOOP_PERIOD = 1.0


class ReadyPipe:
    """The worker → master readiness channel: a non-blocking pipe."""

    def __init__(self) -> None:
        self.read_fd, self.write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def worker_ready(self, worker: Any) -> None:
        """gunicorn ``post_worker_init`` hook (in the worker, app loaded)."""
        with contextlib.suppress(OSError):
            os.write(self.write_fd, b"r")

    def take(self) -> int:
        """How many workers became ready since the last call (master)."""
        try:
            return len(os.read(self.read_fd, 256))
        except (BlockingIOError, InterruptedError):
            return 0

    def close(self) -> None:
        for fd in (self.read_fd, self.write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)


def notifying_arbiter(notifier: Notifier, ready: ReadyPipe, what: str) -> type[Arbiter]:
    """An :class:`Arbiter` that tells systemd through ``notifier``;
    ``what`` names the service in ``STATUS=`` lines."""
    interval = notifier.watchdog_interval

    class NotifyingArbiter(Arbiter):  # type: ignore[misc]
        _lpmos_ready = False
        _lpmos_pinged = 0.0

        def murder_workers(self) -> None:
            super().murder_workers()
            booted = ready.take()
            if booted:
                if not self._lpmos_ready:
                    self._lpmos_ready = True
                    notifier.ready(f"{what}: serving")
                else:
                    notifier.status(f"{what}: serving (a worker was respawned)")
            # the loop wakes at least every LOOP_PERIOD, so a ping is due when the
            # next wake-up could come too late
            now = time.monotonic()
            if interval is not None and now - self._lpmos_pinged + LOOP_PERIOD >= interval:
                self._lpmos_pinged = now
                notifier.watchdog()

        def stop(self, graceful: bool = True) -> None:
            notifier.stopping(f"{what}: stopping")
            super().stop(graceful)

    return NotifyingArbiter


def run_arbiter(app: Any, notifier: Notifier, ready: ReadyPipe, what: str) -> None:
    """``BaseApplication.run`` with the notifying arbiter."""
    try:
        notifying_arbiter(notifier, ready, what)(app).run()
    except RuntimeError as exc:
        sys.stderr.write(f"\nError: {exc}\n\n")
        sys.stderr.flush()
        sys.exit(1)
    finally:
        ready.close()
