"""The console's create form sends the install inputs, and the task drawer
never shows the password hash (the API answers "<set>")."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.browser.test_console import browser, console, login  # noqa: F401 (fixtures)
from tests.unit.test_cloud_config import ED25519, RSA, SHA512
from web.testing import WebEnv

pytestmark = pytest.mark.browser


def test_create_form_sends_install_inputs_and_hides_the_hash(console: tuple[WebEnv, str],  # noqa: F811
                                                             browser: Any) -> None:  # noqa: F811
    env, url = console
    errors: list[str] = []
    page = login(browser, url, "operator1")
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.click("#btn-new-task")
    page.select_option("#new-idc", "dc1")
    page.fill("#new-sn", "SN-INPUTS-1")
    page.fill("#new-mac", "52:54:00:12:34:70")
    page.select_option("#new-os", "Debian 12")
    page.fill("#new-hostname", "web-07.example.com")
    page.fill("#new-ssh-keys", f"{ED25519}\n\n{RSA}\n")
    page.fill("#new-password-hash", SHA512)
    page.fill("#new-network", json.dumps({"mode": "static", "addresses": ["192.0.2.7/24"],
                                          "gateway4": "192.0.2.1"}))
    page.click("#create-submit")
    row = '#tasks-body tr[data-key="dc1/SN-INPUTS-1"]'
    page.wait_for_selector(f'{row}[data-status="pending"]')
    stored = env.context.tasks.get("dc1", "SN-INPUTS-1")
    assert stored is not None
    params = stored.task.params
    assert params["hostname"] == "web-07.example.com" and params["ssh_keys"] == [ED25519, RSA]
    assert params["password_hash"] == SHA512 and params["network"]["gateway4"] == "192.0.2.1"
    page.click(f'{row} td')
    page.wait_for_selector("#drawer dl.kv")
    drawer = page.inner_text("#drawer")
    assert "web-07.example.com" in drawer and "<set>" in drawer
    assert SHA512 not in page.content()
    assert not errors
