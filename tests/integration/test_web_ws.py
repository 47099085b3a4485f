"""The live console feed (/ws) against a real etcd: fan-out, auth before the
handshake, resync from a revision, slow and abusive clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import websocket

from lpmos.models import ProgressEvent, Task
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from web.testing import LiveServer, WebEnv

DEADLINE = 30.0


@pytest.fixture
def env(etcd_store: Any, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys, settings={"web.ws_max_clients": 150, "web.ws_queue": 64})
    yield e
    e.close()


def ws_url(url: str, since: int | None = None) -> str:
    return url.replace("http://", "ws://") + "/ws" + (f"?since={since}" if since else "")


def connect(env: WebEnv, url: str, role: str = "viewer", since: int | None = None,
            **kwargs: Any) -> websocket.WebSocket:
    return websocket.create_connection(ws_url(url, since), timeout=DEADLINE,
                                       header=[f"Authorization: Bearer {env.tokens[role]}"],
                                       **kwargs)


def recv_json(ws: websocket.WebSocket) -> dict[str, Any]:
    return dict(json.loads(ws.recv()))


def wait_for(ws: websocket.WebSocket, pred: Any) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        msg = recv_json(ws)
        if pred(msg):
            return msg
    raise AssertionError("message not received in time")


def make_task(sn: str, i: int = 1) -> Task:
    return Task(idc="dc1", sn=sn, mac=f"02:00:00:00:00:{i:02x}", os_type="Ubuntu 22.04")


def test_hundred_clients_all_receive_a_change(env: WebEnv) -> None:
    with LiveServer(env.app) as url:
        clients = []
        try:
            for _ in range(100):
                ws = connect(env, url)
                assert recv_json(ws)["t"] == "hello"
                clients.append(ws)
            assert env.context.hub.client_count() == 100
            svc = TaskService(env.store, env.keys)
            svc.create(make_task("fan-1"), by="test")
            svc.apply_events("dc1", "fan-1", [ProgressEvent("agent", 1, percent=42.0)])
            for ws in clients:
                created = wait_for(ws, lambda m: m["t"] == "task" and m["sn"] == "fan-1")
                assert created["op"] == "put" and created["task"]["status"] == "pending"
                moved = wait_for(ws, lambda m: m["t"] == "task" and m["sn"] == "fan-1")
                # a small delta: only what changed, plus identity
                assert moved["task"]["progress"]["percent"] == 42.0
                assert "mac" not in moved["task"] and moved["task"]["sn"] == "fan-1"
                assert len(json.dumps(moved)) < 1000
        finally:
            for ws in clients:
                ws.close()
    # one watch feeds them all: the hub published each change once
    assert env.context.metrics.get("web_ws_messages_total", kind="task") == 2


def test_handshake_needs_auth_and_our_origin(env: WebEnv) -> None:
    with LiveServer(env.app) as url:
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            websocket.create_connection(ws_url(url), timeout=10)
        assert exc.value.status_code == 401
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            connect(env, url, origin="http://evil.example")
        assert exc.value.status_code == 403
        with pytest.raises(websocket.WebSocketBadStatusException) as exc:
            websocket.create_connection(ws_url(url), timeout=10,
                                        header=["Authorization: Bearer lpm_forged"])
        assert exc.value.status_code == 401
        assert env.context.hub.client_count() == 0
        ws = connect(env, url)
        assert recv_json(ws)["t"] == "hello"
        ws.close()


def test_reconnect_resyncs_from_the_last_revision(env: WebEnv) -> None:
    svc = TaskService(env.store, env.keys)
    with LiveServer(env.app) as url:
        ws = connect(env, url)
        hello = recv_json(ws)
        assert hello["resync"] is True        # first contact: load lists over REST
        svc.create(make_task("rs-1", 1), by="t")
        last = wait_for(ws, lambda m: m["t"] == "task")["rev"]
        ws.close()
        # changes while disconnected
        svc.create(make_task("rs-2", 2), by="t")
        stored = svc.transition("dc1", "rs-1", "approved", by="t")
        env.context.cache.wait_for_revision(stored.revision, 5)
        ws = connect(env, url, since=last)
        hello = recv_json(ws)
        assert hello["resync"] is False and hello["replayed"] == 2
        replayed = [recv_json(ws), recv_json(ws)]
        assert [(m["sn"], m["task"].get("status")) for m in replayed] == [
            ("rs-2", "pending"), ("rs-1", "approved")]
        assert hello["rev"] == replayed[-1]["rev"]
        ws.close()
        ws = connect(env, url, since=1)       # older than the hub remembers
        assert recv_json(ws)["resync"] is True
        ws.close()


def test_slow_client_is_dropped_not_buffered(env: WebEnv) -> None:
    hub = env.context.hub
    got = hub.register(None)
    assert got is not None
    client, _hello, _replay = got
    svc = TaskService(env.store, env.keys)
    svc.create(make_task("slow-1"), by="t")
    for seq in range(1, 80):     # more changes than the client's queue holds (64)
        stored, _ = svc.apply_events("dc1", "slow-1", [ProgressEvent("agent", seq,
                                                                     percent=float(seq))])
    env.context.cache.wait_for_revision(stored.revision, 10)
    assert client.dropped.wait(10)
    assert client.queue.qsize() <= 64
    assert hub.client_count() == 0
    assert env.context.metrics.get("web_ws_dropped_total", reason="slow") == 1


def test_ping_pong_size_cap_and_flood(env: WebEnv) -> None:
    with LiveServer(env.app) as url:
        ws = connect(env, url)
        recv_json(ws)
        ws.send(json.dumps({"t": "ping"}))
        assert wait_for(ws, lambda m: m["t"] == "pong")["t"] == "pong"
        ws.send("x" * 10000)                  # over the 4 KiB cap
        opcode, frame = ws.recv_data_frame(control_frame=True)
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(frame.data[:2], "big") == 1009
        ws.close()
        ws = connect(env, url)
        recv_json(ws)
        for _ in range(60):
            ws.send("{}")
        deadline = time.monotonic() + DEADLINE
        code = None
        while time.monotonic() < deadline and code is None:
            opcode, frame = ws.recv_data_frame(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(frame.data[:2], "big")
        assert code == 1008
        ws.close()
        assert env.context.metrics.get("web_ws_dropped_total", reason="flood") == 1


def test_clients_over_the_limit_get_503(etcd_store: Any, keys: Keys) -> None:
    env = WebEnv(etcd_store, keys, settings={"web.ws_max_clients": 2})
    try:
        with LiveServer(env.app) as url:
            a, b = connect(env, url), connect(env, url)
            with pytest.raises(websocket.WebSocketBadStatusException) as exc:
                connect(env, url)
            assert exc.value.status_code == 503
            a.close()
            b.close()
    finally:
        env.close()
