"""systemd's service notification protocol (``sd_notify(3)``), stdlib only.

A service started by systemd with ``Type=notify`` finds a datagram socket in
``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract socket) and sends it
newline-separated ``KEY=VALUE`` lines: ``READY=1`` once it serves,
``STATUS=...`` for ``systemctl status``, ``WATCHDOG=1`` at least every
``$WATCHDOG_USEC`` microseconds (else systemd kills and restarts it) and
``STOPPING=1`` when it begins to shut down.

Why our own: the PyPI ``sdnotify`` package has not been maintained since
2017, and ``systemd-python`` needs a compiler and libsystemd's headers; the
protocol is one ``sendto`` of a few bytes.

Contract of :class:`Notifier`:

* without ``$NOTIFY_SOCKET`` (a shell, a test, another init) every call is a
  no-op that returns ``False``;
* a send never raises into the service and never blocks it: the datagram is
  sent with ``MSG_DONTWAIT``, and a full queue, a vanished socket or a bad
  address only make the call return ``False`` (logged once, at debug);
* :meth:`Notifier.from_environ` removes ``NOTIFY_SOCKET`` and the watchdog
  variables from the environment by default (as ``sd_notify``'s
  ``unset_environment`` does), so that children (the embedded etcd, which
  speaks the protocol itself, and gunicorn, which would announce READY=1 as
  soon as it binds) cannot speak for the service.  The notifier keeps the
  address, so a forked worker inherits it as data.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import Callable, MutableMapping

log = logging.getLogger(__name__)

#: the longest STATUS= text sent; longer text is cut (systemctl shows one line)
MAX_STATUS = 400
#: the environment variables the protocol reads
ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def parse_address(raw: str | None) -> str | None:
    """The ``socket.sendto`` address of a ``$NOTIFY_SOCKET`` value, or ``None``
    for none or one we do not speak (``vsock:`` and other schemes): an
    absolute path, or ``@name`` → the abstract name ``\\0name``."""
    if not raw:
        return None
    if raw.startswith("/"):
        return raw
    if raw.startswith("@") and len(raw) > 1:
        return "\0" + raw[1:]
    return None


def parse_watchdog_usec(usec: str | None, pid: str | None, own_pid: int) -> float | None:
    """The watchdog timeout in seconds that applies to process ``own_pid``,
    or ``None``: unset, not a positive integer, or meant for another
    process (``$WATCHDOG_PID``)."""
    if not usec:
        return None
    if pid:
        try:
            if int(pid) != own_pid:
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def clean_status(text: str) -> str:
    """One line of at most :data:`MAX_STATUS` characters: a newline in a
    STATUS= value would start another assignment."""
    return " ".join(str(text).split())[:MAX_STATUS]


class Notifier:
    """Sends notifications to one socket; see the module docstring."""

    def __init__(self, address: str | None, watchdog_timeout: float | None = None) -> None:
        """``address`` as :func:`parse_address` returns it; ``watchdog_timeout``
        in seconds (``None``: no watchdog asked for)."""
        self.address = address
        self.watchdog_timeout = watchdog_timeout if address else None
        self._failed = False

    @classmethod
    def from_environ(cls, environ: MutableMapping[str, str] | None = None, *,
                     unset: bool = True) -> Notifier:
        """The notifier of ``environ`` (default ``os.environ``); with
        ``unset``, the protocol's variables are removed from it."""
        env = os.environ if environ is None else environ
        raw = env.get("NOTIFY_SOCKET")
        address = parse_address(raw)
        if raw and address is None:
            log.warning("NOTIFY_SOCKET=%r is not a path or @name; systemd is not told "
                        "when this service is ready", raw)
        timeout = parse_watchdog_usec(env.get("WATCHDOG_USEC"), env.get("WATCHDOG_PID"),
                                      os.getpid())
        if unset:
            for name in ENV_VARS:
                env.pop(name, None)
        return cls(address, timeout)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between two ``WATCHDOG=1`` (half the timeout, as
        ``sd_watchdog_enabled(3)`` advises), or ``None`` without a watchdog."""
        return self.watchdog_timeout / 2 if self.watchdog_timeout else None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; ``True`` when it was sent."""
        if self.address is None or not assignments:
            return False
        data = "\n".join(assignments).encode("utf-8", "replace")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(data, socket.MSG_DONTWAIT, self.address)
        except OSError as exc:
            if not self._failed:
                self._failed = True
                log.debug("sd_notify to %r failed: %s (not reported again)",
                          self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: the service serves (and ``STATUS=`` when given)."""
        return self.send("READY=1", *self._status(status))

    def status(self, text: str) -> bool:
        return self.send(*self._status(text))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``, when a watchdog was asked for."""
        return self.send("WATCHDOG=1") if self.watchdog_timeout else False

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: shutdown has begun."""
        return self.send("STOPPING=1", *self._status(status))

    @staticmethod
    def _status(text: str | None) -> tuple[str, ...]:
        return () if text is None else (f"STATUS={clean_status(text)}",)


async def run_watchdog(notifier: Notifier, status: Callable[[], str] | None = None) -> None:
    """Ping the watchdog from the running asyncio loop every
    :attr:`Notifier.watchdog_interval` until cancelled, and send ``STATUS=``
    whenever ``status()`` changes.  Because the ping is a task on the
    service's own loop, a loop that is wedged (a blocking call, a busy
    callback) stops the pings and systemd restarts the service.  No jitter:
    the peer is the local service manager, not a shared server.  Returns at
    once when no watchdog was asked for and no status is to be kept."""
    interval = notifier.watchdog_interval
    if not notifier.enabled or (interval is None and status is None):
        return
    shown = ""
    while True:
        if status is not None:
            with contextlib.suppress(Exception):  # a status is never worth a restart
                text = clean_status(status())
                if text != shown:
                    shown = text
                    notifier.status(text)
        notifier.watchdog()
        await asyncio.sleep(interval if interval is not None else 5.0)


__all__ = ["Notifier", "clean_status", "parse_address", "parse_watchdog_usec", "run_watchdog"]
