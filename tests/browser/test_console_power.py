"""The console's BMC and power section (issue #21) in headless Chromium,
against a live control plane on the real etcd, a real ``lpmos regional``
that carries the power requests out, and a real Redfish emulator
(sushy-tools' own fake systems driver, which Ironic uses for scale tests:
no libvirt, the power state held by the emulator, HTTP basic auth from an
htpasswd file, so a request that succeeds proves the node used the stored
password).

Checked: an admin sets the record in the drawer and the password appears in
no page HTML, API response or /ws frame; a power button queues a request
the drawer shows, then its result (node, state read back); a viewer gets no
controls, an operator power buttons but not the admin form; a bad address
shows the API's reason and stores nothing; a wrong password shows the BMC's
reason; clearing the record takes the buttons away; every action is
audited under the user who clicked.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

from lpmos.models import ProgressEvent, Server, Task
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.browser.test_console import CATALOG, SCREENSHOTS, browser, login  # noqa: F401
from tests.power_lab import VENV_BIN
from tests.reliability.support import Regional, eventually
from web.testing import LiveServer, WebEnv

pytestmark = [pytest.mark.browser, pytest.mark.timeout(180)]

IDC = "dc1"
NODE = "pwc1"
BMC_USER = "admin"


@dataclass
class FakeRedfish:
    """``sushy-emulator`` with its fake systems driver on a loopback port:
    one system per test, powered off, behind HTTP basic auth (a BMC with
    several systems: each record names its own in ``options.system``)."""

    password: str = field(default_factory=lambda: "bmc-secret-" + uuid.uuid4().hex[:12])
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="lpmos-fake-rf-")))
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    systems: list[str] = field(default_factory=lambda: [str(uuid.uuid4()) for _ in range(3)])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FakeRedfish:
        import bcrypt

        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(4)).decode()
        (self.root / "htpasswd").write_text(f"{BMC_USER}:{hashed}\n")
        self.port = free_port()
        systems = [{"uuid": ident, "name": f"console-{i}", "power_state": "Off",
                    "external_notifier": False,
                    "nics": [{"mac": f"52:54:00:aa:bb:0{i}", "ip": f"192.0.2.{10 + i}"}]}
                   for i, ident in enumerate(self.systems)]
        (self.root / "sushy.conf").write_text(
            "SUSHY_EMULATOR_LISTEN_IP = '127.0.0.1'\n"
            f"SUSHY_EMULATOR_LISTEN_PORT = {self.port}\n"
            f"SUSHY_EMULATOR_AUTH_FILE = '{self.root / 'htpasswd'}'\n"
            "SUSHY_EMULATOR_FAKE_DRIVER = True\n"
            # its own state: the fake driver keeps systems in a shared sqlite file otherwise
            f"SUSHY_EMULATOR_STATE_DIR = '{self.root / 'state'}'\n"
            f"SUSHY_EMULATOR_FAKE_SYSTEMS = {systems!r}\n")
        with (self.root / "sushy.out").open("ab") as log:
            self.proc = subprocess.Popen(
                [str(VENV_BIN / "sushy-emulator"), "--config", str(self.root / "sushy.conf")],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)

        def up() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log()
            return requests.get(self.url + "/redfish/v1/", timeout=2).status_code in (200, 401)

        eventually(up, 30, 0.1, what="sushy-emulator (fake driver)")
        return self

    def system(self, i: int) -> str:
        return f"/redfish/v1/Systems/{self.systems[i]}"

    def log(self) -> str:
        return (self.root / "sushy.out").read_text(errors="replace")[-3000:]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:  # ours, by its Popen
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Plane:
    env: WebEnv
    url: str
    node: Regional
    bmc: FakeRedfish

    @property
    def keys(self) -> Keys:
        return self.env.keys

    def server(self, sn: str) -> None:
        """A discovered machine (its agent's record), so its drawer opens."""
        inventory = {"schema": 1, "collected_at": time.time(),
                     "system": {"vendor": "QEMU", "product": "Standard PC", "serial": sn},
                     "bmc": {"address": "127.0.0.1"}}
        rev = self.env.store.put(self.keys.server(IDC, sn), Server(
            idc=IDC, sn=sn, macs=["52:54:00:aa:bb:01"], boot_mac="52:54:00:aa:bb:01",
            inventory=inventory, last_seen=time.time()).to_json())
        self.env.context.cache.wait_for_revision(rev, 5)

    def set_bmc(self, sn: str, password: str, system: str) -> None:
        r = requests.put(f"{self.url}/api/v1/servers/{IDC}/{sn}/bmc", timeout=15,
                         headers=self.env.headers("admin"),
                         json={"driver": "redfish", "address": "127.0.0.1", "port": self.bmc.port,
                               "user": BMC_USER, "password": password,
                               "options": {"scheme": "http", "verify_tls": False,
                                           "system": system}})
        assert r.status_code == 200, r.text

    def audit(self, sn: str) -> list[dict[str, Any]]:
        r = requests.get(f"{self.url}/api/v1/audit", params={"target": sn, "limit": 100},
                         headers=self.env.headers("viewer"), timeout=15)
        assert r.status_code == 200, r.text
        return list(r.json()["items"])


@pytest.fixture(scope="module")
def plane(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    keys = Keys("/t-" + uuid.uuid4().hex[:12])
    env = WebEnv(store, keys, catalog=CATALOG)
    live = LiveServer(env.app)
    bmc = FakeRedfish()
    node: Regional | None = None
    try:
        url = live.__enter__()
        bmc.start()
        node = Regional(etcd_server.url, keys.prefix, tmp_path_factory.mktemp("power-console"),
                        name=NODE).start()
        yield Plane(env, url, node, bmc)
    finally:
        if node is not None:
            node.stop()
        bmc.close()
        live.__exit__(None, None, None)
        env.close()
        store.close()


class Recorder:
    """Every API response body and /ws frame a page received."""

    def __init__(self, page: Any) -> None:
        self.responses: list[Any] = []
        self.frames: list[str] = []
        self.errors: list[str] = []
        page.on("response", lambda r: self.responses.append(r) if "/api/" in r.url else None)
        page.on("websocket", lambda ws: ws.on(
            "framereceived", lambda payload: self.frames.append(str(payload))))
        page.on("pageerror", lambda exc: self.errors.append(str(exc)))

    def bodies(self) -> list[str]:
        return [r.text() for r in self.responses]


def open_server(page: Any, sn: str) -> None:
    page.click('.tab[data-view="servers"]')
    page.click(f'#servers-body tr[data-key="{IDC}/{sn}"]')
    page.wait_for_selector("#power-status dl.kv")


def wait_last(page: Any, state: str, after: str = "") -> str:
    """The id of the newest request the drawer shows, once it is ``state``
    (and is not ``after``, the one shown before)."""
    try:
        page.wait_for_function(
            "([state, after]) => { const n = document.querySelector('#power-last');"
            " return n && n.dataset.state === state && n.dataset.id !== after; }",
            arg=[state, after], timeout=60000)
    except Exception as exc:
        shown = page.text_content("#drawer-body") if page.locator("#drawer-body").count() else ""
        raise AssertionError(f"the drawer shows no {state} request: {shown}") from exc
    return str(page.get_attribute("#power-last", "data-id"))


def test_admin_sets_the_bmc_and_powers_it_and_the_password_is_shown_nowhere(
        plane: Plane, browser: Any) -> None:  # noqa: F811
    sn = "SN-PWR-ADMIN"
    plane.server(sn)
    page = login(browser, plane.url, "admin1")
    seen = Recorder(page)
    open_server(page, sn)
    status = page.text_content("#power-status")
    assert "none: power actions need one" in status and "127.0.0.1" in status   # inventory
    assert page.locator("[data-power]").count() == 0          # nothing to act on yet

    page.select_option("#bmc-driver", "redfish")
    page.fill("#bmc-address", "127.0.0.1")
    page.fill("#bmc-port", str(plane.bmc.port))
    page.fill("#bmc-user", BMC_USER)
    page.fill("#bmc-password", plane.bmc.password)
    page.select_option("#bmc-scheme", "http")
    page.fill("#bmc-system", plane.bmc.system(0))
    page.uncheck("#bmc-verify-tls")
    page.click("#bmc-save")
    page.wait_for_selector('#bmc-has-password[data-set="yes"]')
    status = page.text_content("#power-status")
    assert f"http://127.0.0.1:{plane.bmc.port}" in status and BMC_USER in status
    assert "set (never shown)" in status and plane.bmc.system(0) in status
    assert page.input_value("#bmc-password") == ""             # write-only
    assert page.get_attribute("#bmc-password", "type") == "password"
    assert sorted(page.eval_on_selector_all("[data-power]", "ns => ns.map(n => n.dataset.power)")) \
        == ["cycle", "off", "on", "pxe-once", "status"]

    page.click('[data-power="status"]')
    first = wait_last(page, "done")
    assert page.text_content("#power-read-back") == "off"
    assert NODE in page.text_content("#power-status")
    page.click('[data-power="pxe-once"]')
    wait_last(page, "done", after=first)
    status = page.text_content("#power-status")
    assert "pxe-once: done" in status and "Pxe" in status      # the boot override read back
    history = page.locator("#power-history tr")                # the one before it
    assert history.count() == 1 and history.get_attribute("data-id") == first
    assert "power status done on node pwc1: power off" in history.text_content()
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / "server-power.png"), full_page=True)

    # the password is in the secret key, and nowhere the console ever saw
    secret = plane.env.store.get(plane.keys.bmc_secret(IDC, sn))
    assert secret is not None and plane.bmc.password.encode() in secret.value
    assert plane.bmc.password not in page.content()
    bodies = seen.bodies()
    assert any(f"/servers/{IDC}/{sn}/bmc" in r.url for r in seen.responses)
    assert [b for b in bodies if plane.bmc.password in b] == []
    assert [f for f in seen.frames if plane.bmc.password in f] == []
    actions = [(a["action"], a["actor"]) for a in plane.audit(sn)]
    # newest first; the node audits each result under its own name
    assert actions == [("power.done", f"node:{NODE}"), ("power.request", "admin1"),
                       ("power.done", f"node:{NODE}"), ("power.request", "admin1"),
                       ("bmc.set", "admin1")], actions
    assert plane.bmc.password not in json.dumps(plane.audit(sn))
    assert seen.errors == []


def test_a_viewer_sees_the_record_an_operator_powers_it_neither_sets_it(
        plane: Plane, browser: Any) -> None:  # noqa: F811
    sn = "SN-PWR-ROLES"
    plane.server(sn)
    plane.set_bmc(sn, plane.bmc.password, plane.bmc.system(1))
    svc = TaskService(plane.env.store, plane.keys)
    stored = svc.create(Task(idc=IDC, sn=sn, mac="52:54:00:aa:bb:01", os_type="Debian 12"),
                        by="operator1")
    plane.env.context.cache.wait_for_revision(stored.revision, 5)
    row = f'#tasks-body tr[data-key="{IDC}/{sn}"]'

    viewer = login(browser, plane.url, "viewer1", locale="zh-CN")
    viewer.click(row)
    viewer.wait_for_selector('#power-status #bmc-has-password[data-set="yes"]')
    assert "redfish" in viewer.text_content("#power-status")
    assert "BMC 与电源" in viewer.text_content("#drawer-body")
    assert "已设置" in viewer.text_content("#bmc-has-password")
    assert viewer.locator("[data-power]").count() == 0
    assert viewer.locator("#bmc-form, #bmc-clear").count() == 0

    operator = login(browser, plane.url, "operator1")
    seen = Recorder(operator)
    operator.click(row)
    operator.wait_for_selector('[data-power="cycle"]')
    assert operator.locator("#bmc-form, #bmc-clear, #bmc-password").count() == 0
    operator.click('[data-power="cycle"]')                    # asks first, with a reason
    operator.fill("#modal-notes", "hung kernel, ticket 81")
    operator.click("#modal-confirm")
    operator.wait_for_selector("#power-last")                 # queued, visible in the drawer
    wait_last(operator, "done")
    status = operator.text_content("#power-status")
    assert "operator1" in status and "hung kernel, ticket 81" in status and NODE in status
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    operator.screenshot(path=str(SCREENSHOTS / "task-power.png"))
    audit = [a for a in plane.audit(sn) if a["action"] == "power.request"]
    assert [(a["actor"], a["detail"]) for a in audit] == [("operator1", "hung kernel, ticket 81")]
    # the API keeps its rule whatever the page shows: an operator cannot set a BMC
    r = requests.put(f"{plane.url}/api/v1/servers/{IDC}/{sn}/bmc", timeout=15,
                     headers=plane.env.headers("operator"), json={"user": "x"})
    assert r.status_code == 403
    assert seen.errors == []


def test_bad_input_shows_the_apis_and_the_bmcs_reason_in_the_drawer(
        plane: Plane, browser: Any) -> None:  # noqa: F811
    sn = "SN-PWR-BAD"
    plane.server(sn)
    page = login(browser, plane.url, "admin1")
    seen = Recorder(page)
    open_server(page, sn)
    page.fill("#bmc-address", "https://10.0.0.5:443")
    page.fill("#bmc-user", BMC_USER)
    page.fill("#bmc-password", "pw-not-kept-1")
    page.click("#bmc-save")
    page.wait_for_selector("#power-error:not(.hidden)")
    error = page.text_content("#power-error")
    assert "HTTP 400" in error and "[address]" in error, error
    assert "is not an IP address or a host name (give the port in 'port'" in error, error
    assert plane.env.store.get(plane.keys.bmc(IDC, sn)) is None        # nothing stored
    assert plane.env.store.get(plane.keys.bmc_secret(IDC, sn)) is None
    assert page.input_value("#bmc-password") == ""

    # a good record with a password the BMC refuses: the node's reason, in the drawer
    wrong = "wrong-" + uuid.uuid4().hex[:8]
    page.fill("#bmc-address", "127.0.0.1")
    page.fill("#bmc-port", str(plane.bmc.port))
    page.fill("#bmc-password", wrong)
    page.select_option("#bmc-scheme", "http")
    page.fill("#bmc-system", plane.bmc.system(2))
    page.click("#bmc-save")
    page.wait_for_selector('#bmc-has-password[data-set="yes"]')
    assert page.is_hidden("#power-error")
    page.click('[data-power="status"]')
    wait_last(page, "failed")
    bmc_error = page.text_content("#power-bmc-error")
    assert page.get_attribute("#power-bmc-error", "data-kind") == "auth"
    assert "refused the credentials" in bmc_error, bmc_error
    assert NODE in page.text_content("#power-status")
    assert wrong not in page.content() and "pw-not-kept-1" not in page.content()
    assert [b for b in seen.bodies() if wrong in b] == []

    # the admin clears it: the buttons go.  A boot-timeline event rebuilds the
    # drawer while the confirmation is open: the answer goes to the section shown
    page.click("#bmc-clear")
    before = page.query_selector("#power-section")
    assert before is not None
    plane.env.store.put(plane.keys.timeline(IDC, sn), json.dumps(
        [{"at": time.time(), "stage": "dhcp", "detail": {"x": "rebuild"}}]).encode())
    page.wait_for_function("(n) => !n.isConnected", arg=before)
    page.wait_for_selector("#power-section #bmc-clear")
    page.click("#modal-confirm")
    page.wait_for_function("() => !document.querySelector('[data-power]') && "
                           "document.querySelector('#power-status').textContent"
                           ".includes('none: power actions need one')")
    assert plane.env.store.get(plane.keys.bmc_secret(IDC, sn)) is None
    actions = [a["action"] for a in plane.audit(sn)]
    # the refused PUT wrote nothing, so it is not in the audit either
    assert actions == ["bmc.delete", "power.failed", "power.request", "bmc.set"], actions
    assert seen.errors == []


def test_what_an_admin_types_survives_live_updates_of_the_task_drawer(
        plane: Plane, browser: Any) -> None:  # noqa: F811
    sn = "SN-PWR-DRAFT"
    plane.server(sn)
    svc = TaskService(plane.env.store, plane.keys)
    svc.create(Task(idc=IDC, sn=sn, mac="52:54:00:aa:bb:01", os_type="Debian 12"),
               by="operator1")
    svc.transition(IDC, sn, "approved", by="approver1")
    stored = svc.transition(IDC, sn, "booting", by="node-a")
    plane.env.context.cache.wait_for_revision(stored.revision, 5)
    page = login(browser, plane.url, "admin1")
    page.click(f'#tasks-body tr[data-key="{IDC}/{sn}"]')
    page.wait_for_selector("#bmc-form")
    page.select_option("#bmc-driver", "ipmi")
    page.fill("#bmc-address", "192.0.2.77")
    page.fill("#bmc-user", "ADMIN")
    page.fill("#bmc-password", "draft-pw-1")
    before = page.query_selector("#power-section")
    svc.apply_events(IDC, sn, [ProgressEvent("agent", 1, step="partitioning", percent=3.0,
                                             message="draft test")])
    page.wait_for_function("(n) => !n.isConnected", arg=before)      # the drawer was rebuilt
    page.wait_for_selector("#bmc-form")
    assert page.input_value("#bmc-driver") == "ipmi"
    assert page.input_value("#bmc-address") == "192.0.2.77"
    assert page.input_value("#bmc-user") == "ADMIN"
    assert page.input_value("#bmc-password") == "draft-pw-1"
    assert page.is_hidden("#bmc-scheme")                            # Redfish only
    assert "draft-pw-1" not in page.content()          # a value typed, never an attribute
    # closing the drawer forgets the draft; nothing was saved
    page.click("#drawer-close")
    page.click(f'#tasks-body tr[data-key="{IDC}/{sn}"]')
    page.wait_for_selector("#bmc-form")
    assert page.input_value("#bmc-address") == "" and page.input_value("#bmc-password") == ""
    assert plane.env.store.get(plane.keys.bmc(IDC, sn)) is None
