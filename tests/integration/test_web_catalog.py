"""The control plane offers only installable catalog entries and refuses a
task for any other (the live agent image), on a real etcd."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from lpmos.catalog import parse_catalog
from lpmos.store.keys import Keys
from web.testing import WebEnv

CATALOG = parse_catalog({"image": [
    {"name": "live", "os_type": "LPMOS live", "os_family": "lab", "role": "live",
     "mode": "installer", "kernel": "live/vmlinuz", "initrd": "live/initrd.img"},
    {"name": "lab-os", "os_type": "LPMOS lab OS", "os_family": "lab", "version": "1",
     "disk_image": "lab-os.img"},
    {"name": "debian-12", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "mode": "installer", "kernel": "https://mirror.invalid/linux",
     "initrd": "https://mirror.invalid/initrd.gz"},
]})


@pytest.fixture
def env(etcd_store: Any, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys, catalog=CATALOG)
    yield e
    e.close()


def test_catalog_offers_only_installable_entries(env: WebEnv) -> None:
    r = env.app.test_client().get("/api/v1/catalog", headers=env.headers("viewer"))
    assert r.status_code == 200
    body = r.get_json()
    assert body["configured"] is True
    assert [i["name"] for i in body["items"]] == ["debian-12", "lab-os"]


def test_console_os_list_is_the_catalog_api(env: WebEnv) -> None:
    # browser-free: the console builds its OS <select> from /api/v1/catalog
    # (tests/browser drives it); so the API's filter is the console's
    r = env.app.test_client().get("/static/app.js")
    assert r.status_code == 200
    script = r.get_data(as_text=True)
    assert 'state.catalog = (await api("GET", "/api/v1/catalog")).items' in script
    assert 'el("select", { name: "os_type", id: "new-os" }, state.catalog.map(' in script


@pytest.mark.parametrize("fields,field", [
    ({"os_type": "LPMOS live"}, "os_type"),
    ({"os_type": "lpmos live"}, "os_type"),
    ({"os_type": "Debian 12", "image": "live"}, "image"),
])
def test_a_task_for_the_live_image_is_refused_with_the_reason(env: WebEnv, fields: dict[str, str],
                                                              field: str) -> None:
    c = env.app.test_client()
    before = env.store.revision()
    body = {"idc": "dc1", "sn": "sn-live", "mac": "02:00:00:00:00:31", **fields}
    r = c.post("/api/v1/tasks", json=body, headers=env.headers("operator"))
    assert r.status_code == 400, r.get_json()
    err = r.get_json()
    assert err["field"] == field
    assert "live is the live agent image" in err["detail"]
    assert "cannot be installed" in err["detail"]
    assert "installable: Debian 12 (debian-12), LPMOS lab OS (lab-os)" in err["detail"]
    assert env.store.revision() == before                      # nothing written
    assert env.store.get(env.keys.task("dc1", "sn-live")) is None


def test_batches_and_templates_for_the_live_image_are_refused(env: WebEnv) -> None:
    c = env.app.test_client()
    before = env.store.revision()
    rows = [{"idc": "dc1", "sn": "sn-ok", "mac": "02:00:00:00:00:32", "os_type": "Debian 12"},
            {"idc": "dc1", "sn": "sn-live", "mac": "02:00:00:00:00:33",
             "os_type": "LPMOS live"}]
    r = c.post("/api/v1/tasks/batch", json=rows, headers=env.headers("operator"))
    assert r.status_code == 400
    errors = r.get_json()["errors"]
    assert [(e["row"], e["field"]) for e in errors] == [(1, "os_type")]
    assert "cannot be installed" in errors[0]["error"]
    r = c.put("/api/v1/templates/discovery", json={"os_type": "LPMOS live"},
              headers=env.headers("operator"))
    assert r.status_code == 400 and "cannot be installed" in r.get_json()["detail"]
    assert env.store.revision() == before
    # the installable ones still work
    r = c.post("/api/v1/tasks", json=rows[0], headers=env.headers("operator"))
    assert r.status_code == 201 and r.get_json()["task"]["image"] == "debian-12"
