"""Install inputs through the control plane's API, against a real etcd and
Debian's real ``cloud-init schema``: a bad cloud-config is a 400 quoting
cloud-init and stores nothing; secrets never come back."""

from __future__ import annotations

import json
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from lpmos.catalog import parse_catalog
from lpmos.store.keys import Keys
from tests.unit.test_cloud_config import ED25519, OPERATOR, SHA512, STATIC_V4
from web.testing import WebEnv

CATALOG = parse_catalog({"image": [
    {"name": "debian-12-cloud", "os_type": "Debian 12", "os_family": "debian", "version": "12",
     "disk_image": "debian.qcow2"},
    {"name": "ubuntu-24.04", "os_type": "Ubuntu 24.04", "os_family": "ubuntu",
     "version": "24.04", "mode": "installer", "kernel": "https://example.invalid/linux",
     "initrd": "https://example.invalid/initrd"},
    {"name": "rocky-9", "os_type": "Rocky Linux 9", "os_family": "rhel", "version": "9",
     "mode": "installer", "kernel": "https://example.invalid/vmlinuz",
     "initrd": "https://example.invalid/initrd.img"},
]})

needs_cloud_init = pytest.mark.skipif(shutil.which("cloud-init") is None,
                                      reason="Debian's cloud-init package is not installed")
SECRET_CONFIG = ("#cloud-config\nusers:\n  - default\n  - name: ops\n"
                 "    hashed_passwd: $6$x$secret-hash\n    plain_text_passwd: hunter2\n")


@pytest.fixture
def env(etcd_store: Any, keys: Keys) -> Iterator[WebEnv]:
    e = WebEnv(etcd_store, keys, catalog=CATALOG)
    yield e
    e.close()


def body(os_type: str = "Debian 12", **params: Any) -> dict[str, Any]:
    return {"idc": "dc1", "sn": "sn-" + uuid.uuid4().hex[:10], "mac": "52:54:00:12:34:56",
            "os_type": os_type, "params": params}


def post(env: WebEnv, data: dict[str, Any]) -> Any:
    return env.app.test_client().post("/api/v1/tasks", json=data,
                                      headers=env.headers("operator"))


@needs_cloud_init
def test_bad_cloud_config_is_400_quoting_cloud_init_and_nothing_is_stored(env: WebEnv) -> None:
    data = body(cloud_config="#cloud-config\nhostname: 5\nruncmd: reboot\n")
    before = env.store.revision()
    r = post(env, data)
    assert r.status_code == 400, r.get_json()
    answer = r.get_json()
    assert answer["error"] == "invalid" and answer["field"] == "params.cloud_config"
    assert "Cloud config schema errors:" in answer["detail"]
    assert "hostname: 5 is not of type 'string'" in answer["detail"]
    assert env.store.revision() == before
    assert env.context.tasks.get("dc1", data["sn"]) is None


@needs_cloud_init
def test_good_cloud_config_is_stored_for_images_and_autoinstall(env: WebEnv) -> None:
    for os_type in ("Debian 12", "Ubuntu 24.04"):
        data = body(os_type, cloud_config=OPERATOR, ssh_keys=[ED25519], network=STATIC_V4)
        r = post(env, data)
        assert r.status_code == 201, r.get_json()
        stored = env.context.tasks.get("dc1", data["sn"])
        assert stored is not None and stored.task.params["cloud_config"] == OPERATOR


def test_cloud_config_for_an_installer_that_reads_none_is_refused(env: WebEnv) -> None:
    r = post(env, body("Rocky Linux 9", cloud_config=OPERATOR))
    assert r.status_code == 400
    assert "rhel installer does not read cloud-config" in r.get_json()["detail"]


@pytest.mark.parametrize(("params", "field"), [
    ({"hostname": "bad_name"}, "params.hostname"),
    ({"ssh_keys": ["ssh-rsa notbase64!"]}, "params.ssh_keys[0]"),
    ({"password_hash": "plain-password"}, "params.password_hash"),
    ({"cloud_config": "runcmd: [reboot]"}, "params.cloud_config"),
    ({"network": {"mode": "static", "addresses": ["192.0.2.10/24"],
                  "gateway4": "198.51.100.1"}}, "params.network.gateway4"),
    ({"network": {"mode": "static", "addresses": ["192.0.2.10/24"],
                  "vlans": {"v": {"id": 5000, "link": "eth0"}}, "interface": "v"}},
     "params.network.vlans.v.id"),
])
def test_bad_install_inputs_are_400_naming_the_field(env: WebEnv, params: dict[str, Any],
                                                     field: str) -> None:
    before = env.store.revision()
    r = post(env, body(**params))
    assert r.status_code == 400 and r.get_json()["field"] == field, r.get_json()
    assert env.store.revision() == before


@needs_cloud_init
def test_password_hash_and_cloud_config_secrets_are_never_returned(env: WebEnv) -> None:
    c = env.app.test_client()
    data = body(password_hash=SHA512, cloud_config=SECRET_CONFIG, hostname="web-01")
    r = post(env, data)
    assert r.status_code == 201, r.get_json()
    created = r.get_json()["task"]
    shown = c.get(f"/api/v1/tasks/dc1/{data['sn']}", headers=env.headers("viewer")).get_json()
    fresh = c.get(f"/api/v1/tasks/dc1/{data['sn']}?fresh=1",
                  headers=env.headers("viewer")).get_json()
    listed = c.get("/api/v1/tasks", headers=env.headers("viewer")).get_json()
    approved = c.post(f"/api/v1/tasks/dc1/{data['sn']}/approve", json={},
                      headers=env.headers("approver")).get_json()
    audit = c.get("/api/v1/audit", headers=env.headers("viewer")).get_json()
    for task in (created, shown["task"], fresh["task"], approved["task"]):
        assert task["params"]["password_hash"] == "<set>"
        assert task["params"]["hostname"] == "web-01"
        assert "<redacted>" in task["params"]["cloud_config"]
    everything = json.dumps([created, shown, fresh, listed, approved, audit])
    for secret in (SHA512, "secret-hash", "hunter2"):
        assert secret not in everything
    # the node reads the real values from etcd
    stored = env.context.tasks.get("dc1", data["sn"])
    assert stored is not None and stored.task.params["password_hash"] == SHA512
    assert "hunter2" in stored.task.params["cloud_config"]


def test_task_templates_check_and_redact_install_inputs(env: WebEnv) -> None:
    c = env.app.test_client()
    r = c.put("/api/v1/templates/web", json={"os_type": "Debian 12", "params": {
        "password_hash": SHA512, "ssh_keys": [ED25519], "network": STATIC_V4}},
        headers=env.headers("operator"))
    assert r.status_code == 200, r.get_json()
    assert r.get_json()["template"]["params"]["password_hash"] == "<set>"
    listed = c.get("/api/v1/templates", headers=env.headers("viewer")).get_json()
    assert SHA512 not in json.dumps(listed)
    assert SHA512 not in json.dumps(c.get("/api/v1/audit",
                                          headers=env.headers("viewer")).get_json())
    r = c.put("/api/v1/templates/bad", json={"os_type": "Debian 12", "params": {
        "ssh_keys": ["ssh-ed25519 AAAA"]}}, headers=env.headers("operator"))
    assert r.status_code == 400 and r.get_json()["field"] == "params.ssh_keys[0]"
    # a task from the template gets the real hash; its answer shows "<set>"
    data = {"idc": "dc1", "sn": "sn-" + uuid.uuid4().hex[:10], "mac": "52:54:00:12:34:56",
            "template": "web", "params": {"hostname": "from-template"}}
    r = post(env, data)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["task"]["params"]["password_hash"] == "<set>"
    stored = env.context.tasks.get("dc1", data["sn"])
    assert stored is not None and stored.task.params["password_hash"] == SHA512
    assert stored.task.params["ssh_keys"] == [ED25519]
