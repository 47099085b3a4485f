"""Settings of the node's power worker (``lpmos regional``, issue #21)."""

from __future__ import annotations

from lpmos.config import Setting, float_range, int_range

SETTINGS: tuple[Setting, ...] = (
    Setting("power.workers", "--power-workers", 4, int_range(1, 64),
            "power requests this node carries out at once (each holds a thread while its "
            "BMC answers)", metavar="N"),
    Setting("power.call_timeout", "--power-call-timeout", 10.0, float_range(1.0, 60.0),
            "seconds one BMC call (connect and answer) may take; a request retries within "
            "its own deadline (5-110 s, default 60)", metavar="SECONDS"),
    Setting("power.claim_ttl", "--power-claim-ttl", 120.0, float_range(10.0, 3600.0),
            "seconds after which another node of the IDC takes over a power request whose "
            "node went away; a power cycle it had begun is failed, never repeated",
            metavar="SECONDS"),
    Setting("power.queue_ttl", "--power-queue-ttl", 600.0, float_range(30.0, 86400.0),
            "a power request no node took within this long is failed, never carried out "
            "late", metavar="SECONDS"),
)
