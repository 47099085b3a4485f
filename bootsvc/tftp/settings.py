"""The TFTP settings: the table the CLI and config file read, and the typed
record the server takes.

Every TFTP default is written once, in :data:`SETTINGS`; :class:`TftpSettings`
takes its defaults from that table, and the node's service, the standalone
server and the tests all build one (:meth:`TftpSettings.from_config`,
:meth:`TftpSettings.from_values`, or the defaults with some fields replaced).
The negotiation limits' defaults are the codec's own (:class:`bootsvc.wire.tftp.Limits`),
since the codec cannot import upwards.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from bootsvc.wire import tftp
from lpmos.config import (
    Config,
    Setting,
    float_range,
    int_range,
    parse_optional_path,
    parsed_defaults,
)

#: the event loop's busy-poll of the transfer sockets lasts at most this many spins
SPIN_LOOP_SPAN = 4

_MIB = 1024 * 1024
_LIMITS = tftp.Limits()

SETTINGS: tuple[Setting, ...] = (
    Setting("tftp.port", "--tftp-port", 69, int_range(0, 65535),
            "UDP port of the TFTP server (69 is privileged; tests use a high port)",
            metavar="PORT"),
    Setting("tftp.root", "--tftp-root", None, parse_optional_path,
            "read-only directory served over TFTP (default: STATE_DIR/tftp, filled with "
            "Debian's iPXE builds from /usr/lib/ipxe at start)", metavar="DIR"),
    Setting("tftp.max_blksize", "--tftp-max-blksize", _LIMITS.max_blksize,
            int_range(512, tftp.MAX_BLKSIZE),
            "largest block size (RFC 2348) granted; a client asking more gets this "
            f"({_LIMITS.max_blksize} fills a 1500-byte Ethernet frame)", metavar="BYTES"),
    Setting("tftp.max_windowsize", "--tftp-max-windowsize", _LIMITS.max_windowsize,
            int_range(1, 65535),
            "largest window (RFC 7440 windowsize, blocks sent before an ACK) granted",
            metavar="BLOCKS"),
    Setting("tftp.max_sessions", "--tftp-max-sessions", 1000, int_range(1, 100000),
            "most concurrent transfers; past it, stalled sessions are evicted, else the "
            "request gets ERROR 0 'server busy'", metavar="N"),
    Setting("tftp.max_sessions_per_client", "--tftp-max-sessions-per-client", 8,
            int_range(1, 10000),
            "most concurrent transfers per client IP address", metavar="N"),
    Setting("tftp.timeout", "--tftp-timeout", _LIMITS.default_timeout, float_range(0.01, 255.0),
            "seconds before a block is retransmitted when the client does not ask for a "
            "timeout (RFC 2349) itself", metavar="SECONDS"),
    Setting("tftp.retries", "--tftp-retries", 5, int_range(1, 50),
            "timeouts without progress before a transfer is abandoned and its session freed "
            "(the wait doubles after each, up to 5 s; a stalled session is evicted sooner "
            "when its slot is needed)",
            metavar="N"),
    Setting("tftp.cache_mb", "--tftp-cache-mb", 256, int_range(0, 65536),
            "megabytes of hot files kept in memory", metavar="MB"),
    Setting("tftp.spin_us", "--tftp-spin", 50, int_range(0, 1000),
            "microseconds the server keeps polling for the next ACK, yielding the CPU "
            "between polls, before it sleeps: saves the kernel's wake-up on a block's "
            f"round trip (lock-step about 2x faster on loopback); at most {SPIN_LOOP_SPAN}x "
            "that before the node's other work gets its turn; 0: never poll",
            metavar="USEC"),
)

#: each setting's default, parsed as a value from any source would be
DEFAULTS: dict[str, Any] = parsed_defaults(SETTINGS)


@dataclass(frozen=True)
class TftpSettings:
    """What the transfer engine is tuned by, in its own units (bytes,
    seconds).  ``TftpSettings()`` is the defaults of :data:`SETTINGS`."""

    port: int = DEFAULTS["tftp.port"]
    max_blksize: int = DEFAULTS["tftp.max_blksize"]
    max_windowsize: int = DEFAULTS["tftp.max_windowsize"]
    max_sessions: int = DEFAULTS["tftp.max_sessions"]
    max_sessions_per_client: int = DEFAULTS["tftp.max_sessions_per_client"]
    #: retransmission timeout when the client asks for none (RFC 2349)
    timeout: float = DEFAULTS["tftp.timeout"]
    retries: int = DEFAULTS["tftp.retries"]
    cache_bytes: int = DEFAULTS["tftp.cache_mb"] * _MIB
    #: seconds the loop polls for the next ACK before it may sleep (0: never)
    spin: float = DEFAULTS["tftp.spin_us"] / 1e6

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> TftpSettings:
        """From values keyed and in the units of :data:`SETTINGS`
        (``tftp.cache_mb``, ``tftp.spin_us``); a missing key keeps its default."""
        v = {**DEFAULTS, **{k: values[k] for k in DEFAULTS if k in values}}
        return cls(port=int(v["tftp.port"]), max_blksize=int(v["tftp.max_blksize"]),
                   max_windowsize=int(v["tftp.max_windowsize"]),
                   max_sessions=int(v["tftp.max_sessions"]),
                   max_sessions_per_client=int(v["tftp.max_sessions_per_client"]),
                   timeout=float(v["tftp.timeout"]), retries=int(v["tftp.retries"]),
                   cache_bytes=int(v["tftp.cache_mb"]) * _MIB,
                   spin=int(v["tftp.spin_us"]) / 1e6)

    @classmethod
    def from_config(cls, config: Config) -> TftpSettings:
        return cls.from_values(config.values)

    @property
    def limits(self) -> tftp.Limits:
        """The server's side of option negotiation."""
        return tftp.Limits(max_blksize=self.max_blksize, max_windowsize=self.max_windowsize,
                           default_timeout=self.timeout)


__all__ = ["DEFAULTS", "SETTINGS", "SPIN_LOOP_SPAN", "TftpSettings"]
