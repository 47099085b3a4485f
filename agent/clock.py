"""Set the wall clock from the node's ``server_time`` when it is far off.

Live images often boot with a wrong clock (no RTC battery, 1970, 2038), and
TLS certificates and logs then look wrong.  The agent only ever *orders*
events by its sequence numbers, never by time, so this is comfort, not
correctness.  It runs only in the live image (the kernel command line names
an LPMOS server) or when asked (``--set-clock yes``); never on a normal host.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger(__name__)

STEP_THRESHOLD = 120.0   # seconds; smaller offsets are left to NTP


def decide_clock_step(local: float, server: float, *, rtt: float = 0.0,
                      threshold: float = STEP_THRESHOLD) -> float | None:
    """The time to set (``server`` + half the round trip) when the local
    clock is more than ``threshold`` seconds off, else None."""
    if not isinstance(server, int | float) or server <= 0:
        return None
    target = server + max(rtt, 0.0) / 2
    return target if abs(target - local) > threshold else None


def decide_should_set(policy: str, live: bool) -> bool:
    """``policy`` is ``auto`` (only in the live image), ``yes`` or ``no``."""
    return policy == "yes" or (policy == "auto" and live)


def set_clock(value: float) -> bool:
    """Step CLOCK_REALTIME; False (logged) without CAP_SYS_TIME."""
    try:
        time.clock_settime(time.CLOCK_REALTIME, value)
    except (OSError, AttributeError) as exc:
        log.warning("cannot set the clock: %s", exc)
        return False
    log.info("clock set from the node's server_time")
    return True
