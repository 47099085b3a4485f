"""The console's webhooks view (admins only): create a webhook, see its
secret once, and follow its delivery log as a real receiver on loopback
first fails and then accepts."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from lpmos.store.keys import Keys
from tests.browser.test_console import CATALOG, browser, login  # noqa: F401 (fixtures)
from tests.integration.test_webhooks_live import SETTINGS, Receiver, new_task, until
from web.testing import LiveServer, WebEnv

pytestmark = pytest.mark.browser


@pytest.fixture
def hooked_console(etcd_store: Any, keys: Keys) -> Iterator[tuple[WebEnv, str]]:
    env = WebEnv(etcd_store, keys, catalog=CATALOG, settings=SETTINGS)
    rev = env.store.put(keys.node("dc1", "node-a"), json.dumps(
        {"address": "10.0.0.1", "version": "0.1.0"}).encode())
    env.context.cache.wait_for_revision(rev, 5)
    server = LiveServer(env.app)
    try:
        with server as url:
            yield env, url
    finally:
        env.app.extensions["lpmos_webhooks"].stop()
        env.close()


def test_admin_creates_a_webhook_and_reads_its_delivery_log(
        hooked_console: tuple[WebEnv, str], browser: Any) -> None:  # noqa: F811
    env, url = hooked_console
    receiver = Receiver(statuses=(500, 204))
    errors: list[str] = []
    try:
        page = login(browser, url, "admin1")
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.click('.tab[data-view="webhooks"]')
        page.wait_for_selector("#webhooks-table")
        page.fill("#webhook-url", receiver.url)
        page.fill("#webhook-desc", "chat-ops <b>bridge</b>")
        page.uncheck("#webhook-ev-node-liveness")
        page.click("#webhook-create")
        page.wait_for_selector("#webhook-secret-value")
        secret = page.inner_text("#webhook-secret-value").strip()
        assert len(secret) >= 16
        row = page.wait_for_selector("#webhooks-table tr[data-webhook]")
        assert row is not None
        ident = row.get_attribute("data-webhook")
        listed = page.inner_text("#webhooks-table")
        assert receiver.url in listed and "task.state" in listed and "node.liveness" not in listed
        assert "chat-ops <b>bridge</b>" in listed      # user text is text, never markup
        receiver.secret = secret

        new_task(env)                                  # a task.state event
        until(lambda: len(receiver.got) >= 2)          # 500, then a retried 204
        assert all(g["verified"] for g in receiver.got)
        assert receiver.got[0]["headers"]["X-LPMOS-Event"] == "task.state"

        page.click(f'#webhooks-table tr[data-webhook="{ident}"] button >> nth=0')
        page.wait_for_selector('#webhook-deliveries tr[data-outcome="delivered"]')
        log = page.inner_text("#webhook-deliveries")
        assert "will retry" in log and "500" in log and "204" in log and "task.state" in log
        assert page.content().count(secret) == 1      # only where it was shown, once

        page.click(f'#webhooks-table tr[data-webhook="{ident}"] button >> nth=1')   # disable
        until(lambda: not env.app.extensions["lpmos_webhooks"].webhook(ident)[0]["enabled"])
        page.wait_for_selector(f'#webhooks-table tr[data-webhook="{ident}"]')
        assert "no" in page.inner_text(f'#webhooks-table tr[data-webhook="{ident}"]')
        assert not errors
    finally:
        receiver.close()


def test_the_webhooks_view_is_for_admins_only(hooked_console: tuple[WebEnv, str],
                                              browser: Any) -> None:  # noqa: F811
    _, url = hooked_console
    page = login(browser, url, "approver1")
    assert page.query_selector('.tab[data-view="webhooks"]') is None
    page.goto(f"{url}/#webhooks")                    # a hand-typed address opens the tasks view
    page.wait_for_selector("#tasks-table")
    assert page.is_hidden("#view-webhooks")
