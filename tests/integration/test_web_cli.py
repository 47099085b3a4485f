"""``lpmos control-plane`` as operators run it: gunicorn (gthread, one
worker) in front of the app, against a real etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket

from lpmos.auth import Auth
from lpmos.store.embedded import free_port
from lpmos.store.keys import Keys

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_control_plane_serves_api_and_websocket_under_gunicorn(
        etcd_server: Any, etcd_store: Any, tmp_path: Path) -> None:
    prefix = "/cli-" + uuid.uuid4().hex[:8]
    auth = Auth(etcd_store, Keys(prefix))
    auth.put_user("ops", "operator", "password-123")
    token, _ = auth.create_token("ops")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen(
        [sys.executable, "-m", "lpmos", "control-plane", "--listen", f"127.0.0.1:{port}",
         "--etcd-endpoints", etcd_server.url, "--etcd-prefix", prefix,
         "--state-dir", str(tmp_path / "state"), "--threads", "32", "--ws-max-clients", "8"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if requests.get(f"{base}/healthz", timeout=2).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "control plane did not become healthy"
            time.sleep(0.2)
        secret = tmp_path / "state" / "web-secret.key"
        assert secret.stat().st_mode & 0o777 == 0o600
        ws = websocket.create_connection(f"ws://127.0.0.1:{port}/ws", timeout=30,
                                         header=[f"Authorization: Bearer {token}"])
        assert json.loads(ws.recv())["t"] == "hello"
        # the earlier console's call: curl -d without a Content-Type header
        r = requests.post(f"{base}/api/v1/tasks", timeout=10,
                          data='{"idc": "dc1", "sn": "sn-001", "mac": "00:1a:2b:3c:4d:5e", '
                               '"os_type": "Ubuntu 22.04", "os_version": "22.04"}',
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": "application/x-www-form-urlencoded"})
        assert r.status_code == 201, r.text
        msg = json.loads(ws.recv())
        while msg["t"] != "task":
            msg = json.loads(ws.recv())
        assert msg["sn"] == "sn-001" and msg["task"]["status"] == "pending"
        ws.close()
        page = requests.get(f"{base}/login", timeout=10)
        assert "Content-Security-Policy" in page.headers
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
