"""The console in headless Chromium (Debian's /usr/bin/chromium driven by
Python Playwright; never ``playwright install``)."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lpmos.catalog import parse_catalog
from lpmos.models import ProgressEvent, Server
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from web.testing import TEST_PASSWORD, LiveServer, WebEnv

pytestmark = pytest.mark.browser

sync_api = pytest.importorskip("playwright.sync_api")

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-background-networking", "--disable-component-update",
        "--disable-gpu"]
SCREENSHOTS = Path(os.environ.get("LPMOS_SCREENSHOTS", "/tmp/lpmos-screenshots"))
CATALOG = parse_catalog({"image": [
    {"name": "ubuntu-22.04", "os_type": "Ubuntu 22.04", "os_family": "ubuntu",
     "version": "22.04", "disk_image": "ubuntu.img"},
    {"name": "debian-12", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "disk_image": "debian.img"}]})
EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture
def console(etcd_store: Any, keys: Keys) -> Iterator[tuple[WebEnv, str]]:
    env = WebEnv(etcd_store, keys, catalog=CATALOG)
    rev = env.store.put(keys.node("dc1", "node-a"), json.dumps(
        {"address": "10.0.0.1", "version": "0.1.0"}).encode())
    env.context.cache.wait_for_revision(rev, 5)
    server = LiveServer(env.app)
    try:
        with server as url:
            yield env, url
    finally:
        env.close()


@pytest.fixture
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed")
    with sync_api.sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def login(browser: Any, url: str, user: str, locale: str = "en-US") -> Any:
    context = browser.new_context(locale=locale, viewport={"width": 1440, "height": 900})
    page = context.new_page()
    page.set_default_timeout(20000)
    page.goto(f"{url}/login")
    page.fill("#login-user", user)
    page.fill("#login-password", TEST_PASSWORD)
    page.click("#login-submit")
    page.wait_for_selector("#tasks-table")
    page.wait_for_selector("#live-status.on")
    return page


def test_operator_creates_approver_approves_progress_moves(console: tuple[WebEnv, str],
                                                           browser: Any) -> None:
    env, url = console
    errors: list[str] = []
    operator = login(browser, url, "operator1")
    operator.on("pageerror", lambda exc: errors.append(str(exc)))
    operator.click("#btn-new-task")
    operator.select_option("#new-idc", "dc1")
    operator.fill("#new-sn", "SN-BROWSER-1")
    operator.fill("#new-mac", "00:1A:2B:3C:4D:70")
    operator.select_option("#new-os", "Ubuntu 22.04")
    operator.fill("#new-notes", "rack 7")
    operator.click("#create-submit")
    row = '#tasks-body tr[data-key="dc1/SN-BROWSER-1"]'
    operator.wait_for_selector(f'{row}[data-status="pending"]')
    # an operator is not offered approval
    assert operator.locator(f'{row} [data-action="approve"]').count() == 0

    approver = login(browser, url, "approver1")
    approver.on("pageerror", lambda exc: errors.append(str(exc)))
    approver.wait_for_selector(f'{row}[data-status="pending"]')
    approver.click(f'{row} [data-action="approve"]')
    approver.fill("#modal-notes", "ticket 4711")
    approver.click("#modal-confirm")
    approver.wait_for_selector(f'{row}[data-status="approved"]')
    operator.wait_for_selector(f'{row}[data-status="approved"]')     # live, no reload

    svc = TaskService(env.store, env.keys)
    svc.transition("dc1", "SN-BROWSER-1", "booting", by="node-a")
    svc.apply_events("dc1", "SN-BROWSER-1", [
        ProgressEvent("agent", 1, kind="state", status="installing"),
        ProgressEvent("agent", 2, step="writing image", percent=12.0,
                      message="12% of 2.0 GiB")])
    bar = f'{row} [role="progressbar"]'
    approver.wait_for_selector(f'{bar}[aria-valuenow="12"]')
    svc.apply_events("dc1", "SN-BROWSER-1", [
        ProgressEvent("agent", 3, step="writing image", percent=57.0, message="57%")])
    approver.wait_for_selector(f'{bar}[aria-valuenow="57"]')
    operator.wait_for_selector(f'{bar}[aria-valuenow="57"]')
    assert approver.get_attribute(f"{row}", "data-status") == "installing"
    width = approver.eval_on_selector(f"{bar} .bar", "el => el.style.width")
    assert width == "57%"
    assert approver.text_content(f"{row} .logtail") == "[agent] writing image: 57%"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    approver.screenshot(path=str(SCREENSHOTS / "tasks.png"), full_page=True)
    approver.click(row)
    approver.wait_for_selector("#task-log")
    assert "ticket 4711" in approver.text_content("#drawer-body")
    approver.screenshot(path=str(SCREENSHOTS / "task-detail.png"))
    approver.click("#drawer-close")
    approver.click('.tab[data-view="stats"]')
    approver.wait_for_selector("#chart-hours")
    approver.screenshot(path=str(SCREENSHOTS / "stats.png"), full_page=True)
    audit = env.app.test_client().get("/api/v1/audit", query_string={"target": "SN-BROWSER-1"},
                                      headers=env.headers("viewer")).get_json()["items"]
    assert [(a["action"], a["actor"]) for a in audit] == [("task.approve", "approver1"),
                                                          ("task.create", "operator1")]
    assert errors == []


def test_machine_and_user_text_is_shown_as_text(console: tuple[WebEnv, str],
                                                browser: Any) -> None:
    env, url = console
    inventory = {"schema": 1, "collected_at": time.time(),
                 "system": {"vendor": EVIL, "product": "R650 " + EVIL, "serial": "X1"},
                 "firmware": {"mode": "uefi", "secure_boot": False},
                 "cpu": {"model": EVIL, "sockets": 2, "cores": 32, "threads": 64},
                 "memory": {"total_bytes": 512 << 30, "dimms": []},
                 "disks": [{"name": "sda", "model": EVIL, "serial": "S1", "size_bytes": 1 << 40,
                            "rotational": False, "removable": False, "by_path": ""}],
                 "nics": [{"name": "eno1", "mac": "00:1a:2b:3c:4d:71", "driver": EVIL,
                           "speed_mbps": 25000, "link": True, "booted": True}]}
    server = Server(idc="dc1", sn="srv-xss", macs=["00:1a:2b:3c:4d:71"],
                    boot_mac="00:1a:2b:3c:4d:71", inventory=inventory, last_seen=time.time())
    env.store.put(env.keys.server("dc1", "srv-xss"), server.to_json())
    rev = env.store.put(env.keys.timeline("dc1", "srv-xss"), json.dumps(
        [{"at": time.time(), "stage": EVIL, "detail": {"x": EVIL}}]).encode())
    env.context.cache.wait_for_revision(rev, 5)
    dialogs: list[str] = []
    page = login(browser, url, "operator1")
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    # a task whose notes carry HTML, created through the API
    r = env.app.test_client().post("/api/v1/tasks", json={
        "idc": "dc1", "sn": "srv-xss", "mac": "00:1a:2b:3c:4d:71", "os_type": "Debian 12",
        "notes": EVIL}, headers=env.headers("operator"))
    assert r.status_code == 201
    # an SN carrying HTML is refused by the API with a 400, not stored
    r = env.app.test_client().post("/api/v1/tasks", json={
        "idc": "dc1", "sn": EVIL, "mac": "00:1a:2b:3c:4d:72", "os_type": "Debian 12"},
        headers=env.headers("operator"))
    assert r.status_code == 400
    page.wait_for_selector('#tasks-body tr[data-key="dc1/srv-xss"]')
    page.click('.tab[data-view="servers"]')
    page.wait_for_selector('#servers-body tr[data-key="dc1/srv-xss"]')
    assert EVIL in page.text_content('#servers-body tr[data-key="dc1/srv-xss"]')
    page.click('#servers-body tr[data-key="dc1/srv-xss"]')
    page.wait_for_selector("#boot-timeline")
    body = page.text_content("#drawer-body")
    page.screenshot(path=str(SCREENSHOTS / "server-detail.png"))
    assert body.count(EVIL) >= 5, body
    page.screenshot(path=str(SCREENSHOTS / "server-detail.png"))
    page.click("#drawer-close")
    page.click('.tab[data-view="tasks"]')
    page.click('#tasks-body tr[data-key="dc1/srv-xss"]')
    page.wait_for_selector("#task-log")
    assert EVIL in page.text_content("#drawer-body")
    page.wait_for_timeout(300)
    assert page.locator("img").count() == 0
    assert dialogs == []


def test_console_speaks_chinese_and_switches(console: tuple[WebEnv, str],
                                             browser: Any) -> None:
    _env, url = console
    page = login(browser, url, "viewer1", locale="zh-CN")
    assert page.text_content('.tab[data-view="tasks"]') == "装机任务"
    assert page.locator("#btn-new-task").count() == 0      # viewers cannot create
    page.click('[data-set-lang="en"]')
    page.wait_for_load_state()
    page.wait_for_selector("#tasks-table")
    assert page.text_content('.tab[data-view="tasks"]') == "Tasks"


def test_approver_clears_a_conflict_from_the_server_drawer(console: tuple[WebEnv, str],
                                                           browser: Any) -> None:
    env, url = console
    key = env.keys.server("dc1", "clone-a")
    rev = env.store.put(key, Server(
        idc="dc1", sn="clone-a", macs=["00:1a:2b:3c:4d:81"], last_seen=time.time(),
        conflict="mac 00:1a:2b:3c:4d:81 also registered by clone-b").to_json())
    env.context.cache.wait_for_revision(rev, 5)
    # an operator sees the flag but has no button to clear it
    operator = login(browser, url, "operator1")
    operator.click('.tab[data-view="servers"]')
    operator.click('#servers-body tr[data-key="dc1/clone-a"]')
    operator.wait_for_selector("#boot-timeline, #drawer-body p.muted")
    assert "also registered by clone-b" in operator.text_content("#drawer-body")
    assert operator.locator("#clear-conflict").count() == 0
    approver = login(browser, url, "approver1")
    approver.click('.tab[data-view="servers"]')
    approver.click('#servers-body tr[data-key="dc1/clone-a"]')
    approver.click("#clear-conflict")
    approver.fill("#modal-notes", "checked: clone-b was a leftover test VM")
    approver.click("#modal-confirm")
    deadline = time.monotonic() + 15
    while Server.from_json(env.store.get(key).value).conflict:
        assert time.monotonic() < deadline, "the conflict flag was not cleared"
        time.sleep(0.1)
    approver.wait_for_selector("#drawer-body")
    approver.wait_for_function(
        "() => !document.querySelector('#clear-conflict')", timeout=15000)


def test_a_task_created_while_the_list_loads_stays_in_the_list(console: tuple[WebEnv, str],
                                                               browser: Any) -> None:
    """The task list is a snapshot; a task created while that request is in
    flight reaches the page over /ws first, and the older snapshot must not
    wipe it when it lands (the console kept only the snapshot)."""
    env, url = console
    page = login(browser, url, "operator1")
    client = env.app.test_client()

    def create(sn: str, mac: str) -> None:
        r = client.post("/api/v1/tasks", json={"idc": "dc1", "sn": sn, "mac": mac,
                                               "os_type": "Debian 12"},
                        headers=env.headers("operator"))
        assert r.status_code == 201, r.get_json()

    create("SN-SNAP-A", "00:1a:2b:3c:4d:91")
    page.wait_for_selector('#tasks-body tr[data-key="dc1/SN-SNAP-A"]')
    held: list[tuple[Any, Any]] = []

    def hold(route: Any) -> None:
        if held:
            route.continue_()
        else:
            held.append((route, route.fetch()))   # the snapshot is taken now, answered later

    def is_list(u: str) -> bool:
        return "/api/v1/tasks?" in u

    page.route(is_list, hold)
    page.click('.tab[data-view="servers"]')
    page.click('.tab[data-view="tasks"]')       # a new first page of the task list
    deadline = time.monotonic() + 20
    while not held and time.monotonic() < deadline:
        page.wait_for_timeout(50)
    assert held, "the console did not ask for the task list"
    create("SN-SNAP-B", "00:1a:2b:3c:4d:92")
    page.wait_for_selector('#tasks-body tr[data-key="dc1/SN-SNAP-B"]')   # live, over /ws
    route, snapshot = held[0]
    assert "SN-SNAP-B" not in snapshot.text()
    route.fulfill(response=snapshot)
    # the count is written after the snapshot is applied: "1 tasks" is the
    # snapshot's total (the page said 0 since its login-time load)
    page.wait_for_function(
        "() => document.querySelector('#tasks-count') && "
        "document.querySelector('#tasks-count').textContent.includes('1 tasks')")
    assert page.locator('#tasks-body tr[data-key="dc1/SN-SNAP-A"]').count() == 1
    assert page.locator('#tasks-body tr[data-key="dc1/SN-SNAP-B"]').count() == 1


def test_full_log_panel_fetches_the_whole_log_as_text(console: tuple[WebEnv, str],
                                                      browser: Any) -> None:
    """The task drawer's "Full log" button shows GET .../log (here from a
    stand-in node that answers the control plane's signed call) as text,
    and keeps it open while live updates rebuild the drawer."""
    import http.server
    import threading

    from lpmos.models import Task

    env, url = console
    asked: list[str] = []

    class FakeNode(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            asked.append(self.headers.get("Authorization", ""))
            body = json.dumps({"lines": [EVIL, "second line"], "first_line": 3}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    node = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeNode)
    threading.Thread(target=node.serve_forever, daemon=True).start()
    try:
        env.store.put(env.keys.node("dc1", "node-log"), json.dumps(
            {"advertise_url": f"http://127.0.0.1:{node.server_address[1]}"}).encode())
        svc = TaskService(env.store, env.keys)
        svc.create(Task(idc="dc1", sn="SN-FULL-LOG", mac="00:1a:2b:3c:4d:a1",
                        os_type="Debian 12"), by="operator1")
        svc.transition("dc1", "SN-FULL-LOG", "approved", by="approver1")
        stored = svc.transition("dc1", "SN-FULL-LOG", "booting", by="node:node-log",
                                mutate=lambda t: t.served_by("node-log"))
        env.context.cache.wait_for_revision(stored.revision, 5)
        errors: list[str] = []
        page = login(browser, url, "viewer1")
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.click('#tasks-body tr[data-key="dc1/SN-FULL-LOG"]')
        page.click("#full-log-toggle")
        page.wait_for_selector("#full-log-text")
        assert page.text_content("#full-log-text") == f"{EVIL}\nsecond line"
        assert "3 older lines" in page.text_content("#full-log")
        assert page.locator("img").count() == 0
        assert asked and asked[0].startswith("LPMOS-HMAC ")
        # a live update rebuilds the drawer: the panel comes back without a new fetch
        svc.apply_events("dc1", "SN-FULL-LOG", [ProgressEvent("agent", 1, percent=5.0,
                                                              message="moving")])
        page.wait_for_function("() => document.querySelector('#task-log') && "
                               "document.querySelector('#task-log').textContent"
                               ".includes('moving')")
        page.wait_for_selector("#full-log-text")
        assert len(asked) == 1
        page.click("#full-log-toggle")
        assert page.locator("#full-log-text").count() == 0
        assert errors == []
    finally:
        node.shutdown()
        node.server_close()
