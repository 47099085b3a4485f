"""The console's images view: an admin uploads an image from the browser
(the bytes streamed with upload progress) and adds one by URL; the copies
the regional nodes report in etcd show live, with progress and the
failure reason; a viewer sees the list but no form; removal works."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lpmos.images import NodeImageState
from lpmos.store.keys import Keys
from tests.browser.test_console import CATALOG, browser, login  # noqa: F401 (fixtures)
from web.testing import LiveServer, WebEnv

pytestmark = pytest.mark.browser


@pytest.fixture
def image_console(etcd_store: Any, keys: Keys, tmp_path: Path
                  ) -> Iterator[tuple[WebEnv, str, Path]]:
    store_dir = tmp_path / "image-store"
    env = WebEnv(etcd_store, keys, catalog=CATALOG, settings={"web.image_store": store_dir})
    lease = env.store.grant(60)
    rev = env.store.put(keys.node("dc1", "node-a"), json.dumps(
        {"address": "10.0.0.1", "version": "0.1.0", "updated_at": time.time()}).encode(),
        lease=lease)
    env.context.cache.wait_for_revision(rev, 5)
    try:
        with LiveServer(env.app) as url:
            yield env, url, store_dir
    finally:
        env.store.revoke(lease)
        env.close()


def test_admin_uploads_and_adds_by_url_and_sees_the_nodes_copies(
        image_console: tuple[WebEnv, str, Path], browser: Any, tmp_path: Path) -> None:  # noqa: F811
    env, url, store_dir = image_console
    errors: list[str] = []
    data = os.urandom(3 * 1024 * 1024)
    src = tmp_path / "golden.raw"
    src.write_bytes(data)
    page = login(browser, url, "admin1")
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.click('.tab[data-view="images"]')
    page.wait_for_selector("#images-table")
    assert "No managed image yet" in page.inner_text("#images-table")

    page.fill("#image-name", "golden-1")
    page.fill("#image-os-type", "Golden <b>Linux</b>")
    page.select_option("#image-os-family", "debian")
    page.set_input_files("#image-file", str(src))
    page.click("#image-add")
    page.wait_for_selector('#images-table tr[data-image="golden-1"]')
    row = page.inner_text('#images-table tr[data-image="golden-1"]')
    assert "available" in row and "upload" in row and "Golden <b>Linux</b>" in row
    assert (store_dir / "golden-1" / "disk_image").read_bytes() == data
    stored = env.store.get(env.keys.image("golden-1"))
    assert stored is not None
    assert json.loads(stored.value)["files"]["disk_image"]["sha256"] == \
        hashlib.sha256(data).hexdigest()

    sha = "ab" * 32
    page.fill("#image-name", "mirror-1")
    page.fill("#image-os-type", "Mirror 1")
    page.fill("#image-url", "https://images.invalid/mirror-1.raw")
    page.fill("#image-sha256", sha)
    page.click("#image-add")
    page.wait_for_selector('#images-table tr[data-image="mirror-1"]')

    # the node's copy shows live: fetching with progress, then failed with the reason
    key = env.keys.node_image("dc1", "node-a", "mirror-1")
    env.store.put(key, NodeImageState("mirror-1", sha, "fetching", bytes=42, total=100).to_json())
    page.wait_for_selector('[data-copies="mirror-1"] tr[data-copy="dc1/node-a"]'
                           '[data-state="fetching"]')
    assert "42 %" in page.inner_text('[data-copies="mirror-1"]')
    env.store.put(key, NodeImageState("mirror-1", sha, "failed",
                                      reason="HTTP 404 from images.invalid").to_json())
    page.wait_for_selector('[data-copies="mirror-1"] tr[data-state="failed"]')
    assert "HTTP 404 from images.invalid" in page.inner_text('[data-copies="mirror-1"]')
    env.store.put(key, NodeImageState("mirror-1", sha, "ready", bytes=100, total=100).to_json())
    page.wait_for_selector('[data-copies="mirror-1"] tr[data-state="ready"]')
    page.wait_for_function(
        "document.querySelector('#images-table tr[data-image=\"mirror-1\"] .ready')"
        ".textContent.includes('dc1 1/1')")

    # a viewer sees the list, not the form or a remove button
    viewer = login(browser, url, "viewer1")
    viewer.click('.tab[data-view="images"]')
    viewer.wait_for_selector('#images-table tr[data-image="golden-1"]')
    assert viewer.locator("#image-form").count() == 0
    assert viewer.locator("#images-table button").count() == 0

    page.once("dialog", lambda d: d.accept())
    page.click('#images-table tr[data-image="golden-1"] button')
    page.wait_for_selector('#images-table tr[data-image="golden-1"]', state="detached")
    assert env.store.get(env.keys.image("golden-1")) is None
    assert not (store_dir / "golden-1").exists()
    assert not errors
