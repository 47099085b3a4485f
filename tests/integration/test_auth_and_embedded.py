from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lpmos.auth import Auth, Role, hash_password, verify_password
from lpmos.procs import pid_alive as _pid_alive
from lpmos.store.embedded import ensure_local_etcd, healthy

REPO = Path(__file__).resolve().parents[2]


def test_password_hash_roundtrip() -> None:
    stored = hash_password("correct horse")
    assert verify_password("correct horse", stored)
    assert not verify_password("wrong", stored)
    assert "correct" not in stored


def test_tokens_stored_hashed_and_revocable(etcd_store, keys) -> None:
    auth = Auth(etcd_store, keys)
    auth.put_user("alice", "operator", "pw-alice-1")
    token, record = auth.create_token("alice", label="ci")
    assert auth.verify_token(token).name == "alice"
    stored = [kv for kv in etcd_store.range(keys.api_tokens()).items]
    assert len(stored) == 1 and token.encode() not in stored[0].value
    assert token not in stored[0].key
    assert auth.verify_token(token + "x") is None
    assert auth.verify_token("garbage") is None
    # the role is read from the user at every check
    auth.put_user("alice", "approver")
    assert auth.verify_token(token).level is Role.APPROVER
    assert auth.revoke_token(record.id) == 1
    assert auth.verify_token(token) is None
    assert auth.check_password("alice", "pw-alice-1") is not None
    assert auth.check_password("alice", "nope") is None
    assert auth.check_password("nobody", "x") is None


def test_embedded_etcd_started_once_reused_and_stopped(tmp_path: Path) -> None:
    first = ensure_local_etcd(tmp_path)
    assert first.started_here and healthy(first.client_url)
    # a second service on the same state dir (another process) reuses it
    code = (
        "import json,sys; from pathlib import Path;"
        "from lpmos.store.embedded import ensure_local_etcd;"
        f"l=ensure_local_etcd(Path({str(tmp_path)!r}));"
        "print(json.dumps({'url': l.client_url, 'pid': l.pid, 'here': l.started_here}));"
        "l.release()"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=REPO, timeout=60, check=True)
    other = json.loads(out.stdout)
    assert other == {"url": first.client_url, "pid": first.pid, "here": False}
    # the other user released it, but we are still registered: still running
    assert healthy(first.client_url)
    first.release()
    assert not _pid_alive(first.pid)


def test_cli_token_create_and_list_on_embedded_etcd(tmp_path: Path) -> None:
    lpmos = [sys.executable, "-m", "lpmos"]
    env = dict(os.environ, LPMOS_STATE_DIR=str(tmp_path))
    out = subprocess.run(lpmos + ["token", "create", "--user", "bob", "--role", "approver"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert out.returncode == 0, out.stderr
    token = out.stdout.strip()
    assert token.startswith("lpm_")
    listed = subprocess.run(lpmos + ["token", "list", "--json"], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=60)
    rows = json.loads(listed.stdout)
    assert rows[0]["user"] == "bob" and rows[0]["role"] == "approver"
    bad = subprocess.run(lpmos + ["token", "create", "--user", "Bad User", "--role", "viewer"],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "user:" in bad.stderr
    # the private etcd was stopped when the last command exited
    info = tmp_path / "etcd" / "endpoint.json"
    assert not info.exists()
