"""The task drawer's Schedule form and the Release button (issue #21) in
headless Chromium against a live control plane on the real etcd: an
approver changes a task's schedule and sees it on the row and in the
drawer; a bad window shows the API's reason and changes nothing; an
operator gets neither the form nor the button; Release turns a succeeded
task into releasing, and with a BMC record its PXE boot and power cycle are
queued and shown in the drawer's power section (and a second power action
is the API's 409 while it is open)."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import pytest

from lpmos.models import Task
from lpmos.tasks import TaskService
from tests.browser.test_console import browser, console, login  # noqa: F401 (fixtures)
from web.testing import WebEnv

pytestmark = pytest.mark.browser

IDC = "dc1"


def new_task(env: WebEnv, sn: str, mac: str, *, to: tuple[str, ...] = ()) -> None:
    svc = TaskService(env.store, env.keys)
    stored = svc.create(Task(idc=IDC, sn=sn, mac=mac, os_type="Debian 12"), by="operator1")
    for status in to:
        stored = svc.transition(IDC, sn, status, by="approver1" if status == "approved"
                                else "node-a")
    env.context.cache.wait_for_revision(stored.revision, 5)


def audit(env: WebEnv, sn: str) -> list[tuple[str, str]]:
    items = env.app.test_client().get("/api/v1/audit", query_string={"target": sn},
                                      headers=env.headers("viewer")).get_json()["items"]
    return [(a["action"], a["actor"]) for a in items]


def test_an_approver_changes_the_schedule_in_the_drawer(console: tuple[WebEnv, str],  # noqa: F811
                                                        browser: Any) -> None:  # noqa: F811
    env, url = console
    sn = "SN-SCHED-1"
    new_task(env, sn, "00:1a:2b:3c:4d:b1")
    row = f'#tasks-body tr[data-key="{IDC}/{sn}"]'
    operator = login(browser, url, "operator1")
    operator.click(row)
    operator.wait_for_selector("#task-schedule")
    assert "none: starts as soon as approved" in operator.text_content("#task-schedule")
    assert operator.locator("#schedule-form").count() == 0       # approvers only

    page = login(browser, url, "approver1")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.click(row)
    later = int(time.time()) + 2 * 86400
    iso = datetime.fromtimestamp(later, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    page.fill("#schedule-not-before", iso)
    page.fill("#schedule-window", "22:00-04:00")
    page.click("#schedule-save")
    page.wait_for_selector(f'{row} .schedule-note[data-schedule="≥ {iso} 22:00-04:00 UTC"]')
    page.wait_for_function("() => document.querySelector('#task-schedule')"
                           ".textContent.includes('window 22:00-04:00 UTC daily')")
    shown = page.text_content("#task-schedule")
    assert "waiting" in shown and "not before" in shown, shown
    stored = env.context.tasks.get(IDC, sn)
    assert stored is not None
    assert (int(stored.task.not_before), stored.task.window) == (later, "22:00-04:00")
    operator.wait_for_selector(f"{row} .schedule-note")              # live, no reload

    # a bad window: the API's reason, in the drawer; the stored schedule is kept
    page.fill("#schedule-window", "25:00-04:00")
    page.click("#schedule-save")
    page.wait_for_selector("#schedule-error:not(.hidden)")
    error = page.text_content("#schedule-error")
    assert "HTTP 400" in error and "[window]" in error and "25:00-04:00" in error, error
    stored = env.context.tasks.get(IDC, sn)
    assert stored is not None and stored.task.window == "22:00-04:00"
    assert audit(env, sn) == [("task.schedule", "approver1")]   # once: the refusal wrote nothing

    # approved with a BMC: its PXE + power cycle is queued and waits for the schedule
    client = env.app.test_client()
    r = client.put(f"/api/v1/servers/{IDC}/{sn}/bmc", headers=env.headers("admin"),
                   json={"driver": "ipmi", "address": "192.0.2.51", "user": "root",
                         "password": "sched-pw-1"})
    assert r.status_code == 200, r.get_json()
    r = client.post(f"/api/v1/tasks/{IDC}/{sn}/approve", headers=env.headers("approver"),
                    json={"notes": "night shift"})
    assert r.status_code == 200, r.get_json()
    page.wait_for_selector(f'{row}[data-status="approved"]')
    page.wait_for_selector('#power-last[data-state="queued"]')
    note = page.get_attribute("#power-section .schedule-note", "data-schedule")
    assert note == f"≥ {iso} 22:00-04:00 UTC", note
    assert errors == []


def test_release_turns_a_succeeded_task_into_releasing_and_queues_its_power(
        console: tuple[WebEnv, str], browser: Any) -> None:  # noqa: F811
    env, url = console
    sn, pending = "SN-REL-1", "SN-REL-PENDING"
    new_task(env, sn, "00:1a:2b:3c:4d:c1", to=("approved", "booting", "installing",
                                                "succeeded"))
    new_task(env, pending, "00:1a:2b:3c:4d:c2")
    r = env.app.test_client().put(f"/api/v1/servers/{IDC}/{sn}/bmc", headers=env.headers("admin"),
                                  json={"driver": "ipmi", "address": "192.0.2.50",
                                        "user": "root", "password": "rel-pw-1"})
    assert r.status_code == 200, r.get_json()
    row = f'#tasks-body tr[data-key="{IDC}/{sn}"]'
    operator = login(browser, url, "operator1")
    operator.wait_for_selector(f'{row}[data-status="succeeded"]')
    assert operator.locator(f'{row} [data-action="release"]').count() == 0

    page = login(browser, url, "approver1")
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.wait_for_selector(f'{row}[data-status="succeeded"]')
    assert page.locator(f'#tasks-body tr[data-key="{IDC}/{pending}"] '
                        '[data-action="release"]').count() == 0
    page.click(row)
    page.click('#drawer-body [data-action="release"]')
    assert "wiped" in page.text_content("#modal-box")             # it says what happens
    page.fill("#modal-notes", "rack 9 returned to the pool")
    page.click("#modal-confirm")
    page.wait_for_selector(f'{row}[data-status="releasing"]')
    operator.wait_for_selector(f'{row}[data-status="releasing"]')   # live, no reload
    # the drawer, rebuilt live: releasing, and the release's PXE + power cycle queued
    page.wait_for_selector('#power-last[data-state="queued"]')
    assert "pxe-once+cycle queued" in page.text_content("#power-last")
    stored = env.context.tasks.get(IDC, sn)
    assert stored is not None and stored.task.status == "releasing" and stored.task.attempt == 2
    # no node runs here, so it stays open: another power action is the API's 409, in the drawer
    queued = page.get_attribute("#power-last", "data-id")
    page.click('[data-power="status"]')
    page.wait_for_selector("#power-error:not(.hidden)")
    error = page.text_content("#power-error")
    assert "HTTP 409 busy" in error and f"power request still open: {queued}" in error, error
    # the release and its power request, in one transaction, both the approver's
    assert {("task.release", "approver1"), ("power.request", "approver1")} \
        <= set(audit(env, sn)[:2])
    assert "rel-pw-1" not in page.content()
    assert errors == []
