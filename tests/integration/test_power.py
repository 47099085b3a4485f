"""Power control end to end (issue #21): a real control plane (Werkzeug
LiveServer) and a real ``lpmos regional`` on the real etcd, in front of
libvirt TCG domains behind sushy-tools (Redfish) and virtualbmc (IPMI)
(:mod:`tests.power_lab`).  The control plane never talks to a BMC: the
node claims the requests and carries them out.

The bad-BMC cases use no emulator: a closed port, a TCP server that accepts
and never answers, and a tiny fake Redfish service whose ComputerSystem has
fields outside the schema (the only fake, for that one reply).
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests

from lpmos.store import range_all
from lpmos.store.embedded import free_port
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from tests.power_lab import LabUnavailable, PowerLab, lpmos_cli
from tests.reliability.support import Regional, eventually
from web.testing import LiveServer, WebEnv

IDC = "dc1"
pytestmark = pytest.mark.timeout(240)


@dataclass
class Plane:
    store: EtcdStore
    keys: Keys
    env: WebEnv
    url: str
    node: Regional

    def call(self, method: str, path: str, role: str = "admin",
             body: Any = None) -> requests.Response:
        return requests.request(method, self.url + path, json=body,
                                headers=self.env.headers(role), timeout=15)

    def set_bmc(self, sn: str, **body: Any) -> dict[str, Any]:
        r = self.call("PUT", f"/api/v1/servers/{IDC}/{sn}/bmc", body=body)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def power(self, sn: str, action: str, **extra: Any) -> str:
        r = self.call("POST", f"/api/v1/servers/{IDC}/{sn}/power", "operator",
                      {"action": action, **extra})
        assert r.status_code == 202, r.text
        return str(r.json()["request"]["id"])

    def result(self, sn: str, ident: str, timeout: float = 90.0) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            r = self.call("GET", f"/api/v1/servers/{IDC}/{sn}/power/{ident}?fresh=1", "viewer")
            assert r.status_code == 200, r.text
            req = r.json()["request"]
            return req if req["state"] in ("done", "failed") else None

        return dict(eventually(final, timeout, 0.2, what=f"power request {ident} finished"))

    def written_since(self, revision: int, sn: str) -> list[str]:
        """Keys of this test's prefix (and the secrets beside it) written
        after ``revision``, but for the regional node's own bookkeeping of
        other machines (its registration, other machines' timelines): the
        node runs beside the test and may flush those at any time."""
        items = range_all(self.store, self.keys.root()).items
        secrets = range_all(self.store, self.keys.bmc_secret(IDC, "")).items
        return [kv.key for kv in items + secrets if kv.mod_revision > revision
                and (sn in kv.key or not (kv.key.startswith(self.keys.nodes(IDC))
                                          or kv.key.endswith("/timeline")))]

    def everything_in_etcd(self) -> list[tuple[str, bytes]]:
        """Every key of this test's prefix, and of the secrets beside it."""
        items = range_all(self.store, self.keys.root()).items
        secrets = range_all(self.store, self.keys.bmc_secret(IDC, "")).items
        return [(kv.key, kv.value) for kv in items + secrets]


@pytest.fixture(scope="module")
def lab() -> Iterator[PowerLab]:
    try:
        lab = PowerLab().start()
    except LabUnavailable as exc:    # a blocker to report, not a skip to hide
        pytest.fail(f"the libvirt + BMC emulator lab cannot run here: {exc}")
    yield lab
    lab.close()


@pytest.fixture(scope="module")
def plane(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Plane]:
    store = EtcdStore([etcd_server.url], timeout=2.0)
    keys = Keys("/t-" + uuid.uuid4().hex[:12])
    env = WebEnv(store, keys)
    live = LiveServer(env.app)
    url = live.__enter__()
    node = Regional(etcd_server.url, keys.prefix, tmp_path_factory.mktemp("power-node"),
                    name="pw1").start()
    try:
        yield Plane(store, keys, env, url, node)
    finally:
        node.stop()
        live.__exit__(None, None, None)
        env.close()
        store.close()


def new_sn() -> str:
    return "pw-" + uuid.uuid4().hex[:10]


def assert_secret_nowhere(plane: Plane, sn: str, password: str) -> None:
    """The password is in etcd at the secret key only: not in the BMC
    record, the requests, the audit, the node's log, or any API answer."""
    holders = [key for key, value in plane.everything_in_etcd() if password.encode() in value]
    assert plane.keys.bmc_secret(IDC, sn) in holders
    # (the lab's BMCs share one password: other machines' secret keys hold it too)
    assert all(key.startswith(plane.keys.bmc_secret(IDC, "")) for key in holders), holders
    assert password not in plane.node.log_path.read_text(errors="replace")
    for path in (f"/api/v1/servers/{IDC}/{sn}/bmc", f"/api/v1/servers/{IDC}/{sn}/power",
                 "/api/v1/audit?limit=500"):
        r = plane.call("GET", path)
        assert r.status_code == 200, r.text
        assert password not in r.text
    # the control plane's own watch never held it either
    assert all(password.encode() not in kv.value for kv in plane.env.context.cache.items())


def audit_actions(plane: Plane, sn: str) -> list[str]:
    r = plane.call("GET", "/api/v1/audit?limit=500")
    assert r.status_code == 200, r.text
    return [item["action"] for item in r.json()["items"] if item["target"] == f"{IDC}/{sn}"]


# -- against the emulators -------------------------------------------------------------


@pytest.mark.slow
def test_redfish_on_pxe_once_off_drive_the_libvirt_domain(lab: PowerLab, plane: Plane) -> None:
    dom = lab.define()
    sn = new_sn()
    view = plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=lab.sushy_port,
                         user=lab.user, password=lab.password,
                         options={"scheme": "http", "system": lab.system_path(dom)})
    assert "password" not in view["bmc"] and view["bmc"]["has_password"] is True
    assert lab.state(dom) == "shut off"

    done = plane.result(sn, plane.power(sn, "on"))
    assert done["state"] == "done", done
    assert done["node"] == "pw1" and done["power_state"] == "on"
    assert lab.state(dom) == "running"

    done = plane.result(sn, plane.power(sn, "pxe-once"))
    assert done["state"] == "done", done
    assert done["boot_override"] == "Pxe"
    system = lab.redfish_system(dom)
    assert system["Boot"]["BootSourceOverrideTarget"] == "Pxe"  # type: ignore[index]
    assert "<boot order='1'/>" in lab.xml(dom).split("<interface", 1)[1].split("</interface>")[0]

    done = plane.result(sn, plane.power(sn, "status"))
    assert (done["state"], done["power_state"]) == ("done", "on")

    done = plane.result(sn, plane.power(sn, "off"))
    assert (done["state"], done["power_state"]) == ("done", "off"), done
    assert lab.state(dom) == "shut off"

    actions = audit_actions(plane, sn)
    assert actions.count("power.request") == 4 and actions.count("power.done") == 4
    assert "bmc.set" in actions
    assert_secret_nowhere(plane, sn, lab.password)


def cli(plane: Plane, role: str, *args: str, stdin: str | None = None,
        ) -> subprocess.CompletedProcess[str]:
    return lpmos_cli(plane.url, plane.env.tokens[role], *args, stdin=stdin)


@pytest.mark.slow
def test_ipmi_on_pxe_once_off_drive_the_libvirt_domain(lab: PowerLab, plane: Plane) -> None:
    """Through the CLI as an operator types it: bmc-set with the password on
    standard input, bmc-show, power ... --wait."""
    dom = lab.define(ipmi=True)
    sn = new_sn()
    r = cli(plane, "admin", "server", "bmc-set", f"{IDC}/{sn}", "--driver", "ipmi",
            "--address", "127.0.0.1", "--port", str(dom.ipmi_port), "--user", lab.user,
            "--password-file", "-", stdin=lab.password + "\n")
    assert r.returncode == 0, r.stderr
    assert lab.password not in r.stdout and f"127.0.0.1:{dom.ipmi_port}" in r.stdout
    r = cli(plane, "viewer", "server", "bmc-show", f"{IDC}/{sn}", "--output", "json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["bmc"]["has_password"] is True
    assert lab.password not in r.stdout
    r = cli(plane, "operator", "server", "power", f"{IDC}/{sn}", "on", "--wait")
    assert r.returncode == 0, r.stderr
    assert "done on node pw1: power on" in r.stdout
    assert lab.state(dom) == "running"
    done = plane.result(sn, plane.power(sn, "pxe-once"))
    assert done["state"] == "done", (done["error"], done["steps"])
    # virtualbmc sets the boot device in the domain's persistent definition
    # (the next start takes it); its own read-back reports the running one
    assert done["boot_override"] in ("network", "hd")
    assert "<boot dev='network'/>" in lab.xml(dom)
    done = plane.result(sn, plane.power(sn, "off"))
    assert (done["state"], done["power_state"]) == ("done", "off"), done
    assert lab.state(dom) == "shut off"
    assert_secret_nowhere(plane, sn, lab.password)


@pytest.mark.slow
def test_approve_with_a_bmc_sets_pxe_and_power_cycles_with_no_other_call(
        lab: PowerLab, plane: Plane) -> None:
    dom = lab.define()
    sn = new_sn()
    plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=lab.sushy_port,
                  user=lab.user, password=lab.password,
                  options={"scheme": "http", "system": lab.system_path(dom)})
    r = plane.call("POST", "/api/v1/tasks", "operator",
                   {"idc": IDC, "sn": sn, "mac": "02:00:00:21:00:01", "os_type": "Ubuntu 22.04",
                    "os_version": "22.04"})
    assert r.status_code == 201, r.text
    r = plane.call("POST", f"/api/v1/tasks/{IDC}/{sn}/approve", "approver", {})
    assert r.status_code == 200, r.text
    ident = r.json()["power_request"]
    assert r.json()["task"]["status"] == "approved"

    done = plane.result(sn, ident)
    assert done["state"] == "done", done
    assert done["action"] == "provision" and done["task_attempt"] == 1
    assert [(s["name"], s["state"]) for s in done["steps"]] == [("pxe-once", "done"),
                                                                 ("cycle", "done")]
    assert lab.state(dom) == "running"            # it was off: the cycle powered it on
    assert lab.redfish_system(dom)["Boot"]["BootSourceOverrideTarget"] == "Pxe"  # type: ignore[index]

    def logged() -> list[str]:
        task = plane.call("GET", f"/api/v1/tasks/{IDC}/{sn}?fresh=1", "viewer").json()["task"]
        return [line for line in task["logs"] if "power: pxe-once done, cycle done" in line]

    assert eventually(logged, 15, what="the power steps in the task log")
    task = plane.call("GET", f"/api/v1/tasks/{IDC}/{sn}?fresh=1", "viewer").json()["task"]
    assert task["status"] == "approved"
    assert any("queued PXE as the next boot" in line for line in task["logs"])
    actions = audit_actions(plane, sn)
    assert {"task.approve", "power.request", "power.done"} <= set(actions)
    assert_secret_nowhere(plane, sn, lab.password)


@pytest.mark.slow
@pytest.mark.parametrize("driver", ["redfish", "ipmi"])
def test_wrong_password_fails_with_refused_credentials_and_changes_nothing(
        lab: PowerLab, plane: Plane, driver: str) -> None:
    dom = lab.define(ipmi=driver == "ipmi")
    sn = new_sn()
    wrong = "wrong-" + uuid.uuid4().hex[:8]
    if driver == "redfish":
        plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=lab.sushy_port,
                      user=lab.user, password=wrong,
                      options={"scheme": "http", "system": lab.system_path(dom)})
    else:
        plane.set_bmc(sn, driver="ipmi", address="127.0.0.1", port=dom.ipmi_port,
                      user=lab.user, password=wrong)
    started = time.monotonic()
    done = plane.result(sn, plane.power(sn, "on", deadline=20))
    assert done["state"] == "failed"
    # the CLI exits 1 with the reason
    r = cli(plane, "operator", "server", "power", f"{IDC}/{sn}", "status", "--wait")
    assert r.returncode == 1 and "refused the credentials" in r.stderr, (r.stdout, r.stderr)
    assert "refused the credentials" in done["error"] and done["error_kind"] == "auth"
    assert done["tries"] == 1                  # a refusal is not retried
    assert time.monotonic() - started < 15
    assert lab.state(dom) == "shut off"
    assert_secret_nowhere(plane, sn, wrong)


# -- bad BMCs, no emulator needed --------------------------------------------------------


class SilentServer:
    """Accepts TCP connections and never answers (a hung BMC)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.sock.getsockname()[1])
        self.held: list[socket.socket] = []
        self._stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        self.sock.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(conn)

    def close(self) -> None:
        self._stop = True
        self.thread.join(2)
        for conn in self.held:
            conn.close()
        self.sock.close()


class OddRedfish(BaseHTTPRequestHandler):
    """A Redfish service whose ComputerSystem has a PowerState outside the
    schema and no Boot object."""

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        path = self.path.rstrip("/")
        bodies: dict[str, Any] = {
            "/redfish/v1": {"@odata.id": "/redfish/v1/", "Id": "RootService", "Name": "Root",
                            "RedfishVersion": "1.6.0",
                            "Systems": {"@odata.id": "/redfish/v1/Systems"}},
            "/redfish/v1/Systems": {"@odata.id": "/redfish/v1/Systems", "Name": "Systems",
                                    "Members": [{"@odata.id": "/redfish/v1/Systems/1"}]},
            "/redfish/v1/Systems/1": {"@odata.id": "/redfish/v1/Systems/1", "Id": "1",
                                      "Name": "odd", "PowerState": "Banana",
                                      "Unexpected": {"deeply": ["nested"]}},
        }
        if path not in bodies:
            self.send_response(404)
            self.end_headers()
            return
        raw = json.dumps(bodies[path]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(raw)))
        self.end_headers()
        self.wfile.write(raw)


def _closed_port() -> int:
    return free_port()      # bound and released: nothing listens there


@pytest.mark.parametrize("case", ["closed", "silent"])
def test_unreachable_or_silent_bmc_fails_within_the_deadline_with_its_reason(
        plane: Plane, case: str) -> None:
    silent = SilentServer() if case == "silent" else None
    try:
        sn = new_sn()
        port = silent.port if silent else _closed_port()
        plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=port, user="admin",
                      password="pw-unused-1", options={"scheme": "http"})
        deadline = 8
        done = plane.result(sn, plane.power(sn, "cycle", deadline=deadline), timeout=40)
        assert done["state"] == "failed", done
        took = done["finished_at"] - done["claimed_at"]
        assert took <= deadline + 3, took
        if case == "closed":
            assert done["error_kind"] == "unreachable", (done["error"], done["tries"])
            assert f"BMC unreachable at http://127.0.0.1:{port}" in done["error"]
            assert "connection refused" in done["error"]
            assert done["tries"] >= 2               # retried with back-off in the deadline
        else:
            assert done["error_kind"] == "timeout"
            assert "did not answer" in done["error"]
        assert [s["state"] for s in done["steps"]] == ["failed"]
        # the node stays well: it answers its health check at once
        assert requests.get(plane.node.url + "/healthz", timeout=2).status_code == 200
    finally:
        if silent is not None:
            silent.close()


def test_unexpected_redfish_fields_give_a_clear_error(plane: Plane) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), OddRedfish)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        sn = new_sn()
        plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=server.server_port,
                      user="admin", password="pw-unused-2", options={"scheme": "http"})
        done = plane.result(sn, plane.power(sn, "on"))
        assert done["state"] == "failed"
        assert done["error_kind"] == "protocol"
        assert "unexpected Redfish reply: PowerState 'Banana'" in done["error"]
        assert done["tries"] == 1
        done = plane.result(sn, plane.power(sn, "pxe-once"))
        assert done["state"] == "failed"
        assert "no Boot object" in done["error"]
    finally:
        server.shutdown()
        server.server_close()


# -- bad input at the API -------------------------------------------------------------------


BAD_PW = "pw-Zq81x"


@pytest.mark.parametrize(("body", "field"), [
    ({"driver": "amt", "address": "10.0.0.1", "user": "u", "password": BAD_PW}, "driver"),
    ({"driver": "redfish", "address": "http://10.0.0.1", "user": "u", "password": BAD_PW},
     "address"),
    ({"driver": "redfish", "address": "10.0.0.1:443", "user": "u", "password": BAD_PW}, "address"),
    ({"driver": "redfish", "user": "u", "password": BAD_PW}, "address"),   # no inventory either
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u"}, "password"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u\nx", "password": BAD_PW}, "user"),
    ({"driver": "ipmi", "address": "10.0.0.1", "user": "u", "password": BAD_PW * 21}, "password"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": BAD_PW,
      "port": 70000}, "port"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": BAD_PW,
      "options": {"scheme": "ftp"}}, "options.scheme"),
    ({"driver": "ipmi", "address": "10.0.0.1", "user": "u", "password": BAD_PW,
      "options": {"scheme": "http"}}, "options"),
    ({"driver": "redfish", "address": "10.0.0.1", "user": "u", "password": BAD_PW,
      "secret": "x"}, "secret"),
])
def test_bad_bmc_record_is_refused_with_its_field_and_changes_nothing(
        plane: Plane, body: dict[str, Any], field: str) -> None:
    sn = new_sn()
    before = plane.store.revision()
    r = plane.call("PUT", f"/api/v1/servers/{IDC}/{sn}/bmc", body=body)
    assert r.status_code == 400, r.text
    assert r.json()["field"] == field
    assert plane.written_since(before, sn) == []
    if "password" in body:
        assert body["password"] not in r.text


def test_power_requests_refused_without_a_bmc_bad_action_or_while_one_is_open(
        plane: Plane) -> None:
    sn = new_sn()
    before = plane.store.revision()
    r = plane.call("POST", f"/api/v1/servers/{IDC}/{sn}/power", "operator", {"action": "on"})
    assert r.status_code == 409 and r.json()["error"] == "no_bmc"
    for body in ({"action": "explode"}, {}, {"action": "on", "deadline": 1},
                 {"action": "on", "deadline": "soon"}, {"action": "on", "extra": 1}, [1]):
        r = plane.call("POST", f"/api/v1/servers/{IDC}/{sn}/power", "operator", body)
        assert r.status_code == 400, (body, r.text)
    r = plane.call("POST", f"/api/v1/servers/{IDC}/{sn}/power", "viewer", {"action": "on"})
    assert r.status_code == 403
    assert plane.written_since(before, sn) == []
    # a silent BMC keeps the first request open: a second one is refused
    silent = SilentServer()
    try:
        plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=silent.port, user="u",
                      password="pw-unused-3", options={"scheme": "http"})
        first = plane.power(sn, "cycle", deadline=6)
        r = plane.call("POST", f"/api/v1/servers/{IDC}/{sn}/power", "operator",
                       {"action": "cycle"})
        assert r.status_code == 409 and r.json()["error"] == "busy", r.text
        assert first in r.json()["detail"]
        assert plane.result(sn, first, timeout=30)["state"] == "failed"
    finally:
        silent.close()
    r = plane.call("GET", f"/api/v1/servers/{IDC}/{sn}/power/not-an-id", "viewer")
    assert r.status_code == 404


def test_bmc_address_is_prefilled_from_the_inventory(plane: Plane) -> None:
    from lpmos.models import Server

    sn = new_sn()
    server = Server(idc=IDC, sn=sn, macs=["02:00:00:21:00:99"],
                    inventory={"bmc": {"address": "192.0.2.21"}}).validate()
    revision = plane.store.put(plane.keys.server(IDC, sn), server.to_json())
    plane.env.context.cache.wait_for_revision(revision, 5)
    r = plane.call("GET", f"/api/v1/servers/{IDC}/{sn}/bmc", "viewer")
    assert r.json() == {"bmc": None, "revision": 0, "inventory_address": "192.0.2.21"}
    view = plane.set_bmc(sn, driver="ipmi", user="admin", password="pw-unused-4")
    assert view["bmc"]["address"] == "192.0.2.21" and view["bmc"]["source"] == "inventory"
    # a second PUT may keep the stored password
    view = plane.set_bmc(sn, driver="ipmi", user="root")
    assert view["bmc"]["user"] == "root" and view["bmc"]["has_password"]
    secret = plane.store.get(plane.keys.bmc_secret(IDC, sn))
    assert secret is not None and b"pw-unused-4" in secret.value
    r = plane.call("DELETE", f"/api/v1/servers/{IDC}/{sn}/bmc")
    assert r.status_code == 200
    assert plane.store.get(plane.keys.bmc_secret(IDC, sn)) is None
    assert plane.store.get(plane.keys.bmc(IDC, sn)) is None


@pytest.mark.slow
def test_approval_whose_power_step_fails_keeps_the_task_approved_and_says_why(
        lab: PowerLab, plane: Plane) -> None:
    dom = lab.define()
    sn = new_sn()
    plane.set_bmc(sn, driver="redfish", address="127.0.0.1", port=lab.sushy_port,
                  user=lab.user, password="not-" + lab.password,
                  options={"scheme": "http", "system": lab.system_path(dom)})
    r = plane.call("POST", "/api/v1/tasks", "operator",
                   {"idc": IDC, "sn": sn, "mac": "02:00:00:21:00:02", "os_type": "Ubuntu 22.04",
                    "os_version": "22.04"})
    assert r.status_code == 201, r.text
    r = plane.call("POST", f"/api/v1/tasks/{IDC}/{sn}/approve", "approver", {})
    assert r.status_code == 200, r.text
    done = plane.result(sn, r.json()["power_request"])
    assert done["state"] == "failed" and done["error_kind"] == "auth"
    assert [(s["name"], s["state"]) for s in done["steps"]] == [("pxe-once", "failed"),
                                                                 ("cycle", "pending")]

    def said() -> dict[str, Any] | None:
        task = plane.call("GET", f"/api/v1/tasks/{IDC}/{sn}?fresh=1", "viewer").json()["task"]
        return task if task["progress"].get("step") == "power" else None

    task = eventually(said, 15, what="the power failure on the task")
    assert task["status"] == "approved"            # someone may still power it by hand
    assert "refused the credentials" in task["progress"]["message"]
    assert any("refused the credentials" in line and "lpmos server power" in line
               for line in task["logs"])
    assert lab.state(dom) == "shut off"
    # approving with "power": false queues nothing
    sn2 = new_sn()
    plane.set_bmc(sn2, driver="redfish", address="127.0.0.1", port=lab.sushy_port,
                  user=lab.user, password=lab.password, options={"scheme": "http"})
    plane.call("POST", "/api/v1/tasks", "operator",
               {"idc": IDC, "sn": sn2, "mac": "02:00:00:21:00:03", "os_type": "Ubuntu 22.04",
                "os_version": "22.04"})
    r = plane.call("POST", f"/api/v1/tasks/{IDC}/{sn2}/approve", "approver", {"power": False})
    assert r.status_code == 200 and "power_request" not in r.json()
    assert plane.call("GET", f"/api/v1/servers/{IDC}/{sn2}/power", "viewer").json()["items"] == []


@pytest.mark.slow
def test_a_node_killed_mid_cycle_is_taken_over_and_the_cycle_is_not_repeated(
        etcd_server: Any, plane: Plane, tmp_path: Any) -> None:
    """Node A claims two requests of its IDC against a BMC that never
    answers and is SIGKILLed while carrying them out; node B takes over
    after the claim TTL: the power cycle A had begun fails (it may have
    happened; never twice), the idempotent power-on is claimed again."""
    idc = "dc-takeover"
    silent = SilentServer()
    nodes: list[Regional] = []
    try:
        ids = {}
        for action in ("cycle", "on"):
            sn = new_sn()
            r = plane.call("PUT", f"/api/v1/servers/{idc}/{sn}/bmc", body={
                "driver": "redfish", "address": "127.0.0.1", "port": silent.port, "user": "u",
                "password": "pw-unused-5", "options": {"scheme": "http"}})
            assert r.status_code == 200, r.text
            r = plane.call("POST", f"/api/v1/servers/{idc}/{sn}/power", "operator",
                           {"action": action, "deadline": 100})
            assert r.status_code == 202, r.text
            ids[action] = (sn, r.json()["request"]["id"])
        flags = ["--idc", idc, "--power-claim-ttl", "15", "--power-call-timeout", "60"]
        a = Regional(etcd_server.url, plane.keys.prefix, tmp_path / "a", name="pwa",
                     flags=flags)
        nodes.append(a)
        a.start()

        def request(action: str) -> dict[str, Any]:
            sn, ident = ids[action]
            kv = plane.store.get(plane.keys.power_request(idc, sn, ident))
            assert kv is not None
            return dict(json.loads(kv.value))

        eventually(lambda: request("cycle")["steps"][0]["state"] == "running"
                   and request("on")["state"] == "claimed", 20, what="node A carrying out")
        a.kill()
        b = Regional(etcd_server.url, plane.keys.prefix, tmp_path / "b", name="pwb",
                     flags=flags)
        nodes.append(b)
        b.start()
        cycle = eventually(lambda: (r := request("cycle"))["state"] == "failed" and r, 40,
                           what="the begun cycle failed by node B")
        assert cycle["error_kind"] == "interrupted" and cycle["claims"] == 1
        assert "node pwa stopped while carrying out cycle; not repeated" in cycle["error"]
        on = eventually(lambda: (r := request("on"))["node"] == "pwb" and r, 40,
                        what="the power-on taken over by node B")
        assert on["claims"] == 2
    finally:
        for node in nodes:
            node.kill()
        silent.close()
