"""Webhooks: the pure parts (validation, events, signature, back-off) and the
dispatcher's queue and retries over an in-memory store with a recording
sender (the real HTTP receivers are in tests/integration/test_webhooks_live.py)."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lpmos.metrics import Registry
from lpmos.models import Task, ValidationError
from lpmos.store import Put
from lpmos.store.cache import WatchCache
from lpmos.store.keys import Keys
from lpmos.store.memory import MemoryStore
from web.webhooks import (
    Answer,
    WebhookDispatcher,
    WebhookSettings,
    backoff_delay,
    build_node_event,
    build_task_event,
    delivery_id,
    parse_url,
    parse_webhook,
    should_retry,
    sign,
    webhook_view,
)

# -- validation -------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["http://127.0.0.1:9000/hook", "https://hooks.example.com/x?a=1",
                                 "http://[::1]:8080/"])
def test_parse_url_accepts_http_and_https(url: str) -> None:
    assert parse_url(url) == url


@pytest.mark.parametrize(("url", "why"), [
    ("ftp://example.com/", "scheme"), ("file:///etc/passwd", "scheme"),
    ("javascript:alert(1)", "scheme"), ("http://", "host"), ("http:///path", "host"),
    ("http://u:p@example.com/", "user:password"), ("http://example.com/#x", "fragment"),
    ("http://example.com/a b", "spaces"), ("http://example.com/\n", "spaces"),
    ("http://example.com:99999/", "malformed"), ("http://example.com:0/", "port 0"),
    ("http://example.com/" + "a" * 3000, "at most"), ("", "URL"), (42, "URL"),
])
def test_parse_url_refuses_with_a_reason(url: Any, why: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_url(url)
    assert exc.value.field == "url" and why in exc.value.message


def test_parse_webhook_create_defaults_and_refusals() -> None:
    got = parse_webhook({"url": "http://h/x", "events": ["task.state", "task.state"]})
    assert got == {"url": "http://h/x", "events": ["task.state"], "enabled": True,
                   "description": ""}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"url": "http://h/", "events": []}, "events"),
        ({"url": "http://h/", "events": ["task.created"]}, "events"),
        ({"url": "http://h/", "events": "task.state"}, "events"),
        ({"url": "http://h/", "events": ["task.state"], "enabled": "yes"},
         "enabled"),
        ({"url": "http://h/", "events": ["task.state"], "secret": "short"},
         "secret"),
        ({"url": "http://h/", "events": ["task.state"], "colour": "red"},
         "colour"),
        ({"events": ["task.state"]}, "url")]
    for body, field in cases:
        with pytest.raises(ValidationError) as exc:
            parse_webhook(body)
        assert exc.value.field == field, body


def test_parse_webhook_update_changes_only_what_is_given() -> None:
    current = {"url": "http://h/x", "events": ["task.state"], "enabled": True,
               "description": "d", "secret": "s" * 20}
    got = parse_webhook({"enabled": False}, current)
    assert got == dict(current, enabled=False)
    assert current["enabled"] is True


def test_webhook_view_never_shows_the_secret() -> None:
    view = webhook_view("ab" * 8, {"url": "http://h/", "secret": "s" * 20}, 7)
    assert "secret" not in view and view["id"] == "ab" * 8 and view["revision"] == 7


# -- events, signature, back-off --------------------------------------------------------


def test_task_event_only_on_status_change() -> None:
    old = {"idc": "dc1", "sn": "s1", "status": "pending", "logs": ["x"], "params": {"p": 1}}
    new = dict(old, status="approved", approved_by="ann")
    event = build_task_event("dc1", "s1", old, new, 12, 100.0)
    assert event is not None
    assert (event["event"], event["from"], event["to"], event["revision"]) == \
        ("task.state", "pending", "approved", 12)
    assert event["task"]["approved_by"] == "ann"
    assert "logs" not in event["task"] and "params" not in event["task"]   # a small subset
    assert build_task_event("dc1", "s1", old, dict(old, logs=["y"]), 13, 1.0) is None
    assert build_task_event("dc1", "s1", old, None, 14, 1.0) is None
    created = build_task_event("dc1", "s1", None, old, 15, 1.0)
    assert created is not None and created["from"] is None and created["to"] == "pending"


def test_node_event_only_on_appearing_or_disappearing() -> None:
    reg = {"address": "10.0.0.2", "version": "1", "counters": {"x": 1}}
    up = build_node_event("dc1", "n1", None, reg, False, True, 3, 1.0)
    assert up is not None and (up["from"], up["to"]) == ("down", "up")
    assert up["registration"] == {"address": "10.0.0.2", "version": "1"}
    down = build_node_event("dc1", "n1", reg, None, True, False, 4, 1.0)
    assert down is not None and (down["from"], down["to"]) == ("up", "down")
    assert build_node_event("dc1", "n1", reg, reg, True, True, 5, 1.0) is None


def test_signature_is_hmac_sha256_of_the_body() -> None:
    body = b'{"a":1}'
    assert sign("k" * 16, body) == \
        "sha256=" + hmac.new(b"k" * 16, body, hashlib.sha256).hexdigest()


def test_delivery_id_is_stable_and_distinct() -> None:
    assert delivery_id("w", "/os/k", 5) == delivery_id("w", "/os/k", 5)
    assert len({delivery_id("w", "/os/k", 5), delivery_id("w", "/os/k", 6),
                delivery_id("v", "/os/k", 5), delivery_id("w", "/os/j", 5)}) == 4


def test_backoff_is_exponential_jittered_and_capped() -> None:
    low = [backoff_delay(n, 1.0, 10.0, rng=lambda a, b: a) for n in range(1, 7)]
    high = [backoff_delay(n, 1.0, 10.0, rng=lambda a, b: b) for n in range(1, 7)]
    assert high == [1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert low == [h / 2 for h in high]
    assert all(0.5 <= backoff_delay(1, 1.0, 10.0) <= 1.0 for _ in range(50))


@pytest.mark.parametrize(("status", "retry"), [(None, True), (500, True), (503, True),
                                               (429, True), (408, True), (400, False),
                                               (404, False), (301, False), (200, False)])
def test_should_retry(status: int | None, retry: bool) -> None:
    assert should_retry(status) is retry


# -- the dispatcher on an in-memory store -------------------------------------------------


class Sender:
    """Answers with the next of ``answers`` (then the last), recording calls."""

    def __init__(self, answers: list[Answer], hold: threading.Event | None = None) -> None:
        self.answers = answers
        self.calls: list[tuple[str, bytes, dict[str, str], float]] = []
        self.hold = hold
        self.lock = threading.Lock()

    def __call__(self, url: str, body: bytes, headers: dict[str, str],
                 timeout: float) -> Answer:
        with self.lock:
            self.calls.append((url, body, headers, timeout))
            answer = self.answers[min(len(self.calls) - 1, len(self.answers) - 1)]
        if self.hold is not None:
            self.hold.wait(5)
        return answer


@pytest.fixture
def world() -> Iterator[tuple[MemoryStore, Keys, WatchCache]]:
    store = MemoryStore()
    keys = Keys("/wh")
    cache = WatchCache(store, keys.root(), name="test").start(wait=5)
    yield store, keys, cache
    cache.stop()


def _hook(store: MemoryStore, keys: Keys, ident: str, **over: Any) -> None:
    record = {"url": "http://127.0.0.1:1/h", "events": ["task.state"], "enabled": True,
              "secret": "s" * 24}
    record.update(over)
    store.put(keys.webhook(ident), json.dumps(record).encode())


def _task(store: MemoryStore, keys: Keys, sn: str, status: str) -> int:
    task = Task(idc="dc1", sn=sn, mac="02:00:00:00:00:01", os_type="Ubuntu 22.04",
                status=status)
    return store.commit([], [Put(keys.task("dc1", sn), task.to_json())])


def _until(pred: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_dispatcher_retries_until_delivered(world: Any) -> None:
    store, keys, cache = world
    send = Sender([Answer(500, "", 0.01), Answer(None, "refused", 0.0), Answer(204, "", 0.01)])
    settings = WebhookSettings(backoff_base=0.02, backoff_max=0.05, deadline=5.0)
    d = WebhookDispatcher(cache, keys, Registry(), settings, send=send).start()
    try:
        _hook(store, keys, "a" * 16)
        _hook(store, keys, "b" * 16, enabled=False)
        _hook(store, keys, "c" * 16, events=["node.liveness"])
        d.wait_for_revision(store.revision(), 2)
        rev = _task(store, keys, "s1", "pending")
        _until(lambda: len(d.deliveries("a" * 16)) == 3)
        log = d.deliveries("a" * 16)
        assert [e["outcome"] for e in log] == ["delivered", "retrying", "retrying"]
        assert [e["status"] for e in log] == [204, None, 500]
        assert len({e["delivery"] for e in log}) == 1          # one delivery id throughout
        assert d.deliveries("b" * 16) == [] and d.deliveries("c" * 16) == []
        _, body, headers, _ = send.calls[0]
        assert headers["X-LPMOS-Signature"] == sign("s" * 24, body)
        assert headers["X-LPMOS-Event"] == "task.state"
        assert headers["X-LPMOS-Delivery"] == delivery_id("a" * 16, keys.task("dc1", "s1"), rev)
        assert json.loads(body)["to"] == "pending"
    finally:
        d.stop()


def test_dispatcher_gives_up_at_the_deadline(world: Any) -> None:
    store, keys, cache = world
    metrics = Registry()
    send = Sender([Answer(503, "", 0.0)])
    settings = WebhookSettings(backoff_base=0.05, backoff_max=0.1, deadline=0.3)
    d = WebhookDispatcher(cache, keys, metrics, settings, send=send).start()
    try:
        _hook(store, keys, "a" * 16)
        d.wait_for_revision(store.revision(), 2)
        _task(store, keys, "s1", "pending")
        _until(lambda: metrics.get("webhook_dropped_total", reason="deadline") == 1)
        log = d.deliveries("a" * 16)
        assert log[0]["outcome"] == "gave_up" and len(log) >= 2
        assert d.queue_length() == 0
    finally:
        d.stop()


def test_full_queue_drops_the_oldest_and_counts_it(world: Any) -> None:
    store, keys, cache = world
    metrics = Registry()
    hold = threading.Event()
    send = Sender([Answer(200, "", 0.0)], hold=hold)
    settings = WebhookSettings(queue=3, workers=1)
    d = WebhookDispatcher(cache, keys, metrics, settings, send=send).start()
    try:
        _hook(store, keys, "a" * 16)
        d.wait_for_revision(store.revision(), 2)
        _task(store, keys, "s0", "pending")
        _until(lambda: len(send.calls) == 1)      # the worker holds the first
        for i in range(1, 8):                     # 3 wait, 4 are dropped
            _task(store, keys, f"s{i}", "pending")
        _until(lambda: metrics.get("webhook_dropped_total", reason="queue_full") == 4)
        assert d.queue_length() == 3
        hold.set()
        _until(lambda: len(send.calls) == 4)
        delivered = [json.loads(b)["sn"] for _, b, _, _ in send.calls]
        assert delivered == ["s0", "s5", "s6", "s7"]       # the newest were kept
    finally:
        hold.set()
        d.stop()


def test_no_webhooks_no_threads(world: Any) -> None:
    store, keys, cache = world
    d = WebhookDispatcher(cache, keys, Registry(), send=Sender([Answer(200, "", 0)])).start()
    _task(store, keys, "s1", "pending")
    assert cache.wait_for_revision(store.revision(), 2)
    assert d.queue_length() == 0 and not [t for t in threading.enumerate()
                                          if t.name.startswith("webhook-") and t.is_alive()
                                          and t in d._threads]
    d.stop()


def test_settings_come_from_the_settings_table_and_its_flags() -> None:
    """The dispatcher's defaults are the control plane's settings (one home),
    and ``--webhook-*`` flags reach it."""
    from lpmos.config import resolve
    from web.settings import DEFAULTS, SETTINGS

    assert WebhookSettings() == WebhookSettings.from_values({})
    assert WebhookSettings().deadline == DEFAULTS["web.webhook_deadline"] == 600.0
    config = resolve(list(SETTINGS), {"web__webhook_deadline": "30", "web__webhook_queue": "7"},
                     environ={"LPMOS_WEB_WEBHOOK_TIMEOUT": "1.5"}, config_file=None)
    got = WebhookSettings.from_values(dict(config.values))
    assert (got.deadline, got.queue, got.timeout) == (30.0, 7, 1.5)
