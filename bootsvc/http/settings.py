"""The settings of the boot HTTP service (``http.*``), merged into the
regional node's by :mod:`bootsvc.cli`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from lpmos.config import (
    Config,
    Setting,
    float_range,
    int_range,
    parse_bool,
    parse_optional_path,
    parse_str,
    parsed_defaults,
)

SETTINGS: tuple[Setting, ...] = (
    Setting("http.port", "--http-port", 8081, int_range(0, 65535),
            "TCP port of the boot HTTP server (0: any free port)", metavar="PORT"),
    Setting("http.discovery", "--discovery", True, parse_bool,
            "on: machines without a task boot the live discovery image; off: they boot "
            "their local disk", metavar="on|off"),
    Setting("http.threads", "--http-threads", 32, int_range(2, 512),
            "threads running the app for requests that wait on etcd or stream files (claims, "
            "agent API, configs, images); boot scripts are answered on the event loop",
            metavar="N"),
    Setting("http.connection_limit", "--http-connection-limit", 2000, int_range(10, 100000),
            "open connections at most; past it a new connection is answered 503 and closed",
            metavar="N"),
    Setting("http.max_body", "--http-max-body", 1024 * 1024, int_range(1024, 64 * 1024 * 1024),
            "largest request body in bytes (larger: 413 before it is buffered)",
            metavar="BYTES"),
    Setting("http.max_header", "--http-max-header", 16384, int_range(1024, 1024 * 1024),
            "largest request header block in bytes (larger: 431)", metavar="BYTES"),
    Setting("http.timeout", "--http-timeout", 30.0, float_range(1.0, 3600.0),
            "seconds a request may take to arrive in full from its first byte (else 408), "
            "and a keep-alive connection may stay idle, before it is closed",
            metavar="SECONDS"),
    Setting("http.live_image", "--live-image", "live", parse_str,
            "catalog entry whose kernel and initrd are the live agent image (discovery and "
            "image-mode installs)", metavar="NAME"),
    Setting("http.live_kernel_args", "--live-kernel-args", "console=tty0 console=ttyS0,115200n8",
            parse_str, "extra kernel arguments of the live image", metavar="ARGS"),
    Setting("http.templates", "--templates", None, parse_optional_path,
            "template directory (default: templates/ of the source tree)", metavar="DIR"),
    Setting("http.event_interval", "--event-interval", 0.5, float_range(0.05, 10.0),
            "seconds between two etcd writes of one task's progress events (coalescing); "
            "state changes are written at once", metavar="SECONDS"),
    Setting("http.heartbeat_interval", "--heartbeat-interval", 10.0, float_range(1.0, 300.0),
            "agent heartbeat interval in seconds told to agents; the liveness lease TTL is "
            "three times it", metavar="SECONDS"),
    Setting("http.retry_delay", "--boot-retry-delay", 10, int_range(1, 600),
            "seconds a machine waits before asking again after a wait-and-retry script",
            metavar="SECONDS"),
    Setting("http.long_polls", "--http-long-polls", 24, int_range(0, 10000),
            "concurrent agent task long-polls at most (each holds a worker thread); past it "
            "the task answer is returned at once", metavar="N"),
)

#: each setting's default, parsed as a value from any source would be
DEFAULTS: dict[str, Any] = parsed_defaults(SETTINGS)


@dataclass(frozen=True)
class HttpSettings:
    """The boot HTTP service's ``http.*`` values; ``HttpSettings()`` is the
    defaults of :data:`SETTINGS`, the one place they are written."""

    port: int = DEFAULTS["http.port"]
    discovery: bool = DEFAULTS["http.discovery"]
    threads: int = DEFAULTS["http.threads"]
    connection_limit: int = DEFAULTS["http.connection_limit"]
    max_body: int = DEFAULTS["http.max_body"]
    max_header: int = DEFAULTS["http.max_header"]
    timeout: float = DEFAULTS["http.timeout"]
    live_image: str = DEFAULTS["http.live_image"]
    live_kernel_args: str = DEFAULTS["http.live_kernel_args"]
    templates: Path | None = DEFAULTS["http.templates"]
    event_interval: float = DEFAULTS["http.event_interval"]
    heartbeat_interval: float = DEFAULTS["http.heartbeat_interval"]
    retry_delay: int = DEFAULTS["http.retry_delay"]
    long_polls: int = DEFAULTS["http.long_polls"]

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> HttpSettings:
        """From values keyed as in :data:`SETTINGS`; a missing key keeps its
        default."""
        names = {f.name for f in fields(cls)}
        return cls(**{key.split(".", 1)[1]: value for key, value in values.items()
                      if key.startswith("http.") and key.split(".", 1)[1] in names})

    @classmethod
    def from_config(cls, config: Config) -> HttpSettings:
        return cls.from_values(config.values)
