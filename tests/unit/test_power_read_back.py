"""The power worker's read-back: a BMC applies a power change a few seconds
after it accepts it, so the state is polled until it is the one the steps
lead to (bounded), and the request records what the BMC finally says."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from bootsvc.power.errors import BmcError
from bootsvc.power.worker import read_back, settled_state
from lpmos.power import new_request


class LaggingBmc:
    """Reports ``before`` for the first ``lag`` reads, then ``after``."""

    def __init__(self, before: str, after: str, lag: int, override: str = "Pxe") -> None:
        self.states = [before] * lag + [after]
        self.reads = 0
        self.override = override

    def power_state(self) -> str:
        self.reads += 1
        return self.states[min(self.reads - 1, len(self.states) - 1)]

    def boot_override(self) -> str:
        return self.override


def _call(fn: Any) -> Any:
    return fn()


@pytest.mark.parametrize(("action", "want"), [
    ("on", "on"), ("off", "off"), ("cycle", "on"), ("reset", "on"), ("provision", "on"),
    ("status", None), ("pxe-once", None),
])
def test_the_state_each_action_leads_to(action: str, want: str | None) -> None:
    assert settled_state(new_request("dc1", "SN1", action, by="op", now=1.0)) == want


def test_a_cycle_read_as_off_is_read_again_until_on() -> None:
    req = new_request("dc1", "SN1", "cycle", by="op", now=1.0)
    bmc = LaggingBmc("off", "on", lag=2)
    t0 = time.monotonic()
    read_back(req, bmc, _call, until=t0 + 10, stop=threading.Event())  # type: ignore[arg-type]
    assert (req.power_state, bmc.reads) == ("on", 3)
    assert 1.5 <= time.monotonic() - t0 < 5


def test_a_state_that_never_settles_is_recorded_as_read_at_the_bound() -> None:
    req = new_request("dc1", "SN1", "off", by="op", now=1.0)
    bmc = LaggingBmc("on", "off", lag=100)
    t0 = time.monotonic()
    read_back(req, bmc, _call, until=t0 + 1.5, stop=threading.Event())  # type: ignore[arg-type]
    assert req.power_state == "on"
    assert 1.4 <= time.monotonic() - t0 < 3 and 2 <= bmc.reads <= 3


def test_status_reads_once_and_a_stopping_node_stops_polling() -> None:
    req = new_request("dc1", "SN1", "status", by="op", now=1.0)
    bmc = LaggingBmc("off", "on", lag=5)
    read_back(req, bmc, _call, until=time.monotonic() + 10, stop=threading.Event())  # type: ignore[arg-type]
    assert (req.power_state, bmc.reads) == ("off", 1)

    req = new_request("dc1", "SN1", "on", by="op", now=1.0)
    stop = threading.Event()
    stop.set()
    t0 = time.monotonic()
    read_back(req, LaggingBmc("off", "on", lag=5), _call, until=t0 + 10, stop=stop)  # type: ignore[arg-type]
    assert req.power_state == "off" and time.monotonic() - t0 < 0.5


def test_a_failed_read_back_leaves_the_request_done_with_state_unknown() -> None:
    req = new_request("dc1", "SN1", "on", by="op", now=1.0)

    def failing(_fn: Any) -> Any:
        raise BmcError("timeout", "BMC at x did not answer")

    bmc = LaggingBmc("off", "on", lag=0)
    read_back(req, bmc, failing, until=time.monotonic() + 5, stop=threading.Event())  # type: ignore[arg-type]
    assert req.power_state == "unknown"
