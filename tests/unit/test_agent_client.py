"""Client plumbing: back-off with jitter, retry with deadline, event batching, clock policy."""

from __future__ import annotations

import random

import pytest

from agent.client import (
    Backoff,
    DeadlineExceeded,
    NodeClient,
    NodeError,
    Unreachable,
    batch_events,
    is_transient,
    retry,
)
from agent.clock import decide_clock_step, decide_should_set


def test_backoff_grows_is_jittered_and_capped() -> None:
    b = Backoff(base=1.0, cap=8.0)
    rng = random.Random(7)
    delays = [[b.delay(n, rng) for _ in range(200)] for n in range(6)]
    assert all(0.5 <= d <= 1.0 for d in delays[0])
    assert all(0.5 <= d <= 8.0 for d in delays[5])
    assert max(delays[5]) > 4.0 and len({round(d, 6) for d in delays[3]}) > 150   # jitter


def test_retry_until_success_then_returns() -> None:
    calls = []
    slept = []

    def fn() -> str:
        calls.append(1)
        if len(calls) < 4:
            raise Unreachable("refused")
        return "ok"
    assert retry(fn, what="x", deadline=None, sleep=slept.append) == "ok"
    assert len(calls) == 4 and len(slept) == 3


def test_retry_stops_at_non_transient() -> None:
    def fn() -> None:
        raise NodeError(400, "bad")
    with pytest.raises(NodeError):
        retry(fn, what="x", deadline=None, sleep=lambda s: None)


def test_retry_deadline() -> None:
    now = [0.0]

    def sleep(s: float) -> None:
        now[0] += s

    def fn() -> None:
        raise NodeError(503, "busy")
    with pytest.raises(DeadlineExceeded) as info:
        retry(fn, what="register", deadline=10.0, sleep=sleep, clock=lambda: now[0],
              backoff=Backoff(1.0, 4.0))
    assert now[0] <= 10.0 and isinstance(info.value.last, NodeError)


def test_retry_after_lengthens_wait() -> None:
    slept: list[float] = []
    seq = iter([NodeError(429, "slow down", retry_after=7.0)])

    def fn() -> str:
        for exc in seq:
            raise exc
        return "ok"
    retry(fn, what="x", deadline=None, sleep=slept.append, backoff=Backoff(0.1, 30.0))
    assert slept == [7.0]


@pytest.mark.parametrize(("exc", "transient"), [
    (Unreachable("x"), True), (NodeError(503), True), (NodeError(409), True),
    (NodeError(429), True), (NodeError(400), False), (NodeError(401), False),
    (NodeError(404), False)])
def test_is_transient(exc: Exception, transient: bool) -> None:
    assert is_transient(exc) is transient


def test_batch_events_bounds() -> None:
    events = [{"source": "agent", "seq": i, "message": "m" * 900} for i in range(800)]
    batch = batch_events(events)
    assert len(batch) == 500
    batch = batch_events(events, max_bytes=10_000)
    assert 1 <= len(batch) < 12
    assert batch_events([{"message": "x" * 50_000}], max_bytes=100) == [{"message": "x" * 50_000}]


def test_client_refuses_non_http_urls() -> None:
    with pytest.raises(ValueError):
        NodeClient("file:///etc")
    client = NodeClient("http://127.0.0.1:9")
    with pytest.raises(NodeError):
        client.open("GET", "file:///etc/passwd")


def test_unreachable_node_is_unreachable() -> None:
    from lpmos.store.embedded import free_port
    client = NodeClient(f"http://127.0.0.1:{free_port()}", timeout=2.0)
    with pytest.raises(Unreachable):
        client.heartbeat("SN", "idle")


@pytest.mark.parametrize(("local", "server", "step"), [
    (1000.0, 1010.0, None), (0.0, 1_700_000_000.0, 1_700_000_000.5),
    (2_200_000_000.0, 1_700_000_000.0, 1_700_000_000.5), (5.0, -1.0, None)])
def test_decide_clock_step(local: float, server: float, step: float | None) -> None:
    assert decide_clock_step(local, server, rtt=1.0) == step


def test_clock_policy() -> None:
    assert decide_should_set("auto", True) and not decide_should_set("auto", False)
    assert decide_should_set("yes", False) and not decide_should_set("no", True)
