"""RELIABILITY / SECURITY on the real servers (``lpmos regional`` with its asyncio HTTP server,
``lpmos control-plane`` with gunicorn), filling what the integration tests
leave out:

* the boot node's token matrix over *every* token-protected route (no token,
  a wrong one, another machine's), nothing changed and every refusal
  counted; a route-table guard so a new route cannot slip in unprotected
  (the control plane's role matrix is tests/integration/test_web_api.py's
  ``test_mutating_route_refuses_missing_token_and_low_role``);
* a ``Content-Length`` of 100 MB with a few bytes sent: 413 at once on both
  servers, for every JSON route;
* JSON bombs (100,000 nested arrays / objects): 4xx on every JSON route of
  both servers, which keep serving;
* slowloris (headers one byte at a time): cut at the timeout while normal
  requests keep their latency;
* Content-Security-Policy on the console pages, no HTML sinks in its JS;
* ``/ipxe/<file>`` never follows a symlink out of the TFTP root (TFTP's own
  traversal and symlink cases are tests/integration/test_tftp_robustness.py).
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.auth import Auth
from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import IDC, ControlPlane, Regional, auth, eventually, register

REPO = Path(__file__).resolve().parents[2]
MAC_A, MAC_B = "52:54:00:5e:00:0a", "52:54:00:5e:00:0b"


@pytest.fixture
def node(etcd_server: Any, keys: Keys,
         regional_factory: Callable[..., Regional]) -> Iterator[Regional]:
    n = regional_factory(etcd_server.url, keys.prefix, name="node-sec",
                         flags=["--http-timeout", "3", "--services", "http"])
    yield n.start(wait_for=("ok",))
    n.stop()


@pytest.fixture
def cp(etcd_server: Any, keys: Keys,
       control_plane_factory: Callable[..., ControlPlane]) -> Iterator[ControlPlane]:
    yield control_plane_factory(etcd_server.url, keys.prefix, name="cp-sec").start()


# --- the boot node's token matrix --------------------------------------------------------

#: (method, path template, body template); {sn} is the machine, {tok} a token in the path
PROTECTED: list[tuple[str, str, Any]] = [
    ("POST", "/agent/v1/heartbeat", {"sn": "{sn}", "state": "idle"}),
    ("GET", "/agent/v1/task?sn={sn}", None),
    ("POST", "/agent/v1/events", {"sn": "{sn}", "events": [
        {"source": "agent", "seq": 1, "kind": "state", "status": "failed", "message": "x"}]}),
    ("POST", "/callback/{sn}", {"event": "firstboot", "status": "succeeded", "seq": 1}),
    ("GET", "/config/{sn}/user-data", None),
    ("GET", "/config/{sn}/t/{tok}/user-data", None),
]
#: routes of the boot app and how each is guarded (the guard test compares)
ROUTE_GUARDS = {
    "/boot.ipxe": "public", "/boot/<path:name>": "public", "/healthz": "public",
    "/grub/grub.cfg": "public", "/grub/<path:name>": "public",
    "/metrics": "public", "/ipxe/<file>": "public (TFTP root files)",
    "/images/<name>/<file>": "token for disk images",
    "/agent/v1/register": "token when the machine holds one",
    "/agent/v1/heartbeat": "token", "/agent/v1/task": "token", "/agent/v1/events": "token",
    "/callback/<sn>": "token", "/config/<sn>/<name>": "token",
    "/config/<sn>/t/<token>/<name>": "token", "/static/<path:filename>": "flask default",
    "/node/v1/logs/<sn>": "the control plane's signature (tests/integration/test_install_log.py)",
}


def fill(value: Any, sn: str, tok: str) -> Any:
    if isinstance(value, str):
        return value.replace("{sn}", sn).replace("{tok}", tok)
    if isinstance(value, dict):
        return {k: fill(v, sn, tok) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, sn, tok) for v in value]
    return value


def test_every_boot_route_is_in_the_guard_table(tmp_path: Path) -> None:
    from bootsvc.context import MemoryTimeline, NodeContext
    from bootsvc.http.app import create_app
    from bootsvc.http.settings import SETTINGS
    from bootsvc.settings import NODE_SETTINGS
    from bootsvc.state.machines import MachineIndex
    from lpmos.config import COMMON, resolve, settings_by_key
    from lpmos.metrics import Registry
    from lpmos.store.cache import WatchCache
    from lpmos.store.memory import MemoryStore

    store, keys = MemoryStore(), Keys("/g")
    config = resolve(settings_by_key([COMMON, NODE_SETTINGS, SETTINGS]),
                     {"state_dir": str(tmp_path)}, environ={}, config_file=None)
    cache = WatchCache(store, keys.idc(IDC))
    ctx = NodeContext(config=config, idc=IDC, node_name="g", store=store, keys=keys,
                      cache=cache, machines=MachineIndex(cache, keys, IDC), metrics=Registry(),
                      timeline=MemoryTimeline())
    rules = {r.rule for r in create_app(ctx).url_map.iter_rules()}
    assert rules == set(ROUTE_GUARDS), rules ^ set(ROUTE_GUARDS)
    assert {p.split("?")[0] for _, p, _ in PROTECTED} >= {
        "/agent/v1/heartbeat", "/agent/v1/task", "/agent/v1/events", "/callback/{sn}",
        "/config/{sn}/user-data", "/config/{sn}/t/{tok}/user-data"}


@pytest.mark.slow
def test_boot_node_token_matrix_on_every_protected_route(node: Regional, etcd_server: Any,
                                                         keys: Keys) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    try:
        tok_a = register(node.url, "SEC-A", MAC_A, "").json()["token"]
        tok_b = register(node.url, "SEC-B", MAC_B, "").json()["token"]
        tasks = TaskService(store, keys)
        tasks.create(Task(idc=IDC, sn="SEC-A", mac=MAC_A, os_type="Lab OS"), by="alice")
        for status in ("approved", "booting"):
            tasks.transition(IDC, "SEC-A", status, by="bob")
        watched = [keys.task(IDC, "SEC-A"), keys.server(IDC, "SEC-A"),
                   keys.machine_token(IDC, "SEC-A")]

        def revisions() -> list[int]:
            return [kv.mod_revision if (kv := store.get(k)) else 0 for k in watched]

        before = revisions()
        refused_before = node.metric("lpmos_http_token_refused_total")
        refusals = 0
        wrong = "w" * 43
        for method, path, body in PROTECTED:
            for label, token, want in (("none", "", 401), ("wrong", wrong, 401),
                                       ("other machine", tok_b, 403)):
                in_path = "{tok}" in path
                url = node.url + fill(path, "SEC-A", token or "x" * 20)
                headers = auth(token) if token and not in_path else {}
                r = requests.request(method, url, json=fill(body, "SEC-A", ""), headers=headers,
                                     timeout=15)
                if in_path and label == "none":
                    want = 401                       # a token that is no token
                assert r.status_code == want, (method, path, label, r.status_code, r.text)
                assert r.json()["error"].startswith("token_"), r.text
                refusals += 1
        assert revisions() == before                    # nothing changed
        assert node.metric("lpmos_http_token_refused_total") - refused_before >= refusals
        # the right token passes every check (whatever the route then answers)
        for method, path, body in PROTECTED:
            url = node.url + fill(path, "SEC-A", tok_a)
            r = requests.request(method, url, json=fill(body, "SEC-A", ""),
                                 headers={} if "{tok}" in path else auth(tok_a), timeout=15)
            assert r.status_code not in (401, 403), (path, r.text)
        # disk images: any valid machine token, nothing else
        url = f"{node.url}/images/lab-os/disk.img"
        assert requests.get(url, timeout=10).status_code == 401
        assert requests.get(url, headers=auth(wrong), timeout=10).status_code == 401
        assert requests.get(url, headers=auth(tok_b), timeout=10).status_code == 200
        # registering as a machine that holds a token needs that token
        assert register(node.url, "SEC-A", MAC_A, "", token=wrong).status_code == 409
        assert register(node.url, "SEC-A", MAC_A, "", token=tok_b).status_code == 409
        assert register(node.url, "SEC-A", MAC_A, "", token=tok_a).status_code == 200
    finally:
        store.close()


# --- bodies over the limit: 413 before they are buffered ---------------------------------


def status_after_headers(port: int, head: bytes, body: bytes, timeout: float = 10.0
                         ) -> tuple[int, float]:
    """Send ``head`` + a few ``body`` bytes, never the rest; the status line
    and how long it took."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        started = time.monotonic()
        s.sendall(head + body)
        data = b""
        while b"\r\n" not in data:
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
        took = time.monotonic() - started
    return int(data.split(b" ", 2)[1]), took


@pytest.mark.slow
def test_100_megabyte_content_length_refused_at_once_by_both_servers(
        node: Regional, cp: ControlPlane, etcd_server: Any, keys: Keys) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    a = Auth(store, keys)
    a.put_user("op9", "admin", "reliability-pass-1")
    token, _ = a.create_token("op9")
    store.close()
    targets = [(node.ports["http"], p, "") for p in (
        "/agent/v1/register", "/agent/v1/events", "/agent/v1/heartbeat", "/callback/SEC-A")]
    targets += [(cp.port, p, token) for p in (
        "/api/v1/tasks", "/api/v1/tasks/batch", f"/api/v1/tasks/{IDC}/x/approve",
        "/api/v1/users/someone", "/login")]
    for port, path, tok in targets:
        head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                f"Content-Length: {100 * 1024 * 1024}\r\n"
                + (f"Authorization: Bearer {tok}\r\n" if tok else "") + "\r\n").encode()
        status, took = status_after_headers(port, head, b'{"sn": "x", ')
        assert status == 413, (port, path, status)
        assert took < 5, (path, took)          # answered without waiting for the body
    assert requests.get(node.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(cp.url + "/healthz", timeout=10).status_code == 200


# --- nested JSON bombs ----------------------------------------------------------------------

BOMBS = {"arrays": b"[" * 100_000 + b"]" * 100_000,
         "objects": b'{"a":' * 100_000 + b"1" + b"}" * 100_000}


@pytest.mark.slow
def test_nested_json_bombs_refused_by_both_servers(node: Regional, cp: ControlPlane,
                                                   etcd_server: Any, keys: Keys) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    a = Auth(store, keys)
    a.put_user("adm", "admin", "reliability-pass-1")
    token, _ = a.create_token("adm")
    tok_a = register(node.url, "BOMB-A", MAC_A, "").json()["token"]
    store.close()
    for name, bomb in BOMBS.items():
        for path in ("/agent/v1/register", "/agent/v1/events", "/agent/v1/heartbeat",
                     "/callback/BOMB-A"):
            r = requests.post(node.url + path, data=bomb, timeout=30, headers={
                **auth(tok_a), "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text[:200])
            assert r.json()["error"]
        for path in ("/api/v1/tasks", "/api/v1/tasks/batch", f"/api/v1/tasks/{IDC}/x/approve",
                     "/api/v1/users/someone", "/api/v1/tokens"):
            method = "PUT" if "/users/" in path else "POST"
            r = requests.request(method, cp.url + path, data=bomb, timeout=30, headers={
                **auth(token), "Content-Type": "application/json"})
            assert 400 <= r.status_code < 500, (name, path, r.status_code, r.text[:200])
            assert r.json()["error"]
    assert requests.get(node.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(cp.url + "/healthz", timeout=10).status_code == 200
    assert node.metric('lpmos_http_errors_total{error="bad_json"}') >= 8


# --- slow clients ------------------------------------------------------------------------------

SLOW_CLIENTS = 60          # more than the control plane's worker threads (48 in these tests)


def slowloris(port: int, seconds: float) -> dict[int, float]:
    """Open SLOW_CLIENTS connections that send a request's headers one byte
    every 0.5 s for ``seconds``; when the server closed each (seconds)."""
    socks = []
    for _ in range(SLOW_CLIENTS):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        s.setblocking(False)
        socks.append(s)
    started = time.monotonic()
    closed: dict[int, float] = {}
    try:
        while time.monotonic() - started < seconds and len(closed) < len(socks):
            for i, s in enumerate(socks):
                if i in closed:
                    continue
                try:
                    if s.recv(4096) == b"":
                        closed[i] = time.monotonic() - started
                        continue
                except BlockingIOError:
                    pass
                except OSError:
                    closed[i] = time.monotonic() - started
                    continue
                try:
                    s.send(b"a")
                except OSError:
                    closed[i] = time.monotonic() - started
            time.sleep(0.5)
    finally:
        for s in socks:
            s.close()
    return closed


def latencies(url: str, seconds: float, out: list[float]) -> None:
    """Normal requests, one after another, for ``seconds`` (a timeout counts 10 s)."""
    end = time.monotonic() + seconds
    with requests.Session() as session:
        while time.monotonic() < end:
            started = time.monotonic()
            try:
                session.get(url, timeout=10).raise_for_status()
                out.append(time.monotonic() - started)
            except requests.RequestException:
                out.append(10.0)
            time.sleep(0.02)


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, int(len(ordered) * 0.99) - 1)]


def slow_clients_against(port: int, url: str, seconds: float) -> tuple[dict[int, float],
                                                                       list[float]]:
    lat: list[float] = []
    normal = threading.Thread(target=latencies, args=(url, seconds, lat))
    normal.start()
    closed = slowloris(port, seconds)
    normal.join(30)
    return closed, lat


@pytest.mark.slow
def test_slow_clients_cut_at_the_timeout_while_the_boot_node_keeps_its_latency(
        node: Regional) -> None:
    closed, lat = slow_clients_against(node.ports["http"], node.url + "/boot.ipxe", 8.0)
    assert len(closed) == SLOW_CLIENTS, f"only {len(closed)} slow clients were cut"
    assert max(closed.values()) < 3 + 3, closed           # --http-timeout 3, + slack
    assert len(lat) >= 20 and p99(lat) < 1.0, (len(lat), p99(lat))
    assert node.metric('lpmos_http_requests_refused_total{reason="request_timeout"}') >= \
        SLOW_CLIENTS


@pytest.mark.slow
def test_slow_clients_cut_while_the_control_plane_keeps_its_latency(cp: ControlPlane) -> None:
    closed, lat = slow_clients_against(cp.port, cp.url + "/login", 8.0)
    assert len(lat) >= 20 and p99(lat) < 1.0, (len(lat), p99(lat))
    assert len(closed) == SLOW_CLIENTS, f"only {len(closed)} slow clients were cut"


# --- the console: CSP, no HTML sinks -------------------------------------------------------


def test_console_pages_carry_a_content_security_policy(cp: ControlPlane, etcd_server: Any,
                                                       keys: Keys) -> None:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    a = Auth(store, keys)
    a.put_user("vw", "viewer", "reliability-pass-1")
    token, _ = a.create_token("vw")
    store.close()
    pages = [requests.get(cp.url + "/login", timeout=10),
             requests.get(cp.url + "/", headers=auth(token), timeout=10, allow_redirects=False),
             requests.get(cp.url + "/static/app.js", timeout=10)]
    assert pages[1].status_code == 200 and "<html" in pages[1].text.lower()
    for page in pages:
        csp = page.headers.get("Content-Security-Policy", "")
        directives = {d.strip().split(" ", 1)[0]: d.strip() for d in csp.split(";") if d.strip()}
        assert "'unsafe-inline'" not in csp and "'unsafe-eval'" not in csp, csp
        assert directives["script-src"] == "script-src 'self'", csp
        assert directives["object-src"] == "object-src 'none'"
        assert directives["frame-ancestors"] == "frame-ancestors 'none'"
        assert page.headers.get("X-Content-Type-Options") == "nosniff"
    # the pages load no inline script, and the scripts write text, never HTML
    for html in (REPO / "web" / "pages").glob("*.html"):
        text = html.read_text()
        assert "<script>" not in text and " on" + "click=" not in text, html
    for js in (REPO / "web" / "static").glob("*.js"):
        code = "\n".join(line for line in js.read_text().splitlines()
                         if not line.lstrip().startswith(("*", "//", "/*")))
        for sink in (".innerHTML", ".outerHTML", "insertAdjacentHTML", "document.write",
                     "eval(", "new Function"):
            assert sink not in code, (js.name, sink)


# --- /ipxe/<file> and symlinks out of the TFTP root -----------------------------------------


def test_ipxe_route_never_follows_a_symlink_out_of_the_tftp_root(node: Regional) -> None:
    root = node.workdir / "tftp-root"
    root.mkdir(exist_ok=True)
    outside = node.workdir / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "secret.txt").write_text("SECRET-OUTSIDE")
    (root / "inside.efi").write_bytes(b"MZinside")
    (root / "escape.efi").symlink_to(outside / "secret.txt")
    (root / "escapedir").symlink_to(outside)
    (root / "alias.efi").symlink_to("inside.efi")
    node.stop()
    node.flags += ["--tftp-root", str(root)]
    node.start(wait_for=("ok",))
    assert requests.get(node.url + "/ipxe/inside.efi", timeout=10).content == b"MZinside"
    for path in ("/ipxe/escape.efi", "/ipxe/escapedir%2Fsecret.txt", "/ipxe/escapedir/secret.txt",
                 "/ipxe/..%2Foutside%2Fsecret.txt", "/ipxe/%2Fetc%2Fpasswd",
                 "/ipxe/..%5Coutside%5Csecret.txt"):
        r = requests.get(node.url + path, timeout=10)
        assert r.status_code == 404 and b"SECRET" not in r.content, path
    eventually(lambda: node.metric("lpmos_http_requests_refused_total") >= 1)
