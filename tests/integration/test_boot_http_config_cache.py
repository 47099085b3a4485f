"""Rendered install configs served from the node's render cache, against a
real etcd and a real node's HTTP service (issue #23 item 4): a repeat is
answered from memory on the event loop with the body, headers, timeline
record and counters the Flask route gives; every refusal is still the
route's; an edit, a redeploy or a new template renders again; a render
error is never remembered."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from test_boot_http_support import IDC, Node, eventually, start_node, write_catalog
from werkzeug.test import Client

from bootsvc.context import MemoryTimeline
from bootsvc.http.fastpath import BootFastPath
from bootsvc.render import Renderer, default_templates_dir
from lpmos.models import Task
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from lpmos.tasks import TaskService
from tests.prometheus_text import value

MAC = "52:54:00:cc:00:01"
SN = "CC-1"


class ThreadedTimeline(MemoryTimeline):
    """A memory timeline that also notes which thread recorded each stage."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: list[str] = []

    def record(self, who: str, stage: str, detail: dict[str, Any] | None = None) -> None:
        self.threads.append(threading.current_thread().name)
        super().record(who, stage, detail)


@pytest.fixture
def node(etcd_server: Any, keys: Keys, tmp_path: Path) -> Iterator[Node]:
    root = tmp_path / "images"
    root.mkdir()
    tftp = tmp_path / "tftp"
    tftp.mkdir()
    n = start_node(etcd_server.url, keys, tmp_path / "state", "node-a", write_catalog(root)[0],
                   tftp__root=str(tftp))
    n.ctx.timeline = ThreadedTimeline()     # read back below (the route and the hit both use it)
    yield n
    n.stop()


@pytest.fixture
def tasks(etcd_store: EtcdStore, keys: Keys) -> TaskService:
    return TaskService(etcd_store, keys)


def claimed(node: Node, tasks: TaskService, sn: str = SN, mac: str = MAC,
            hostname: str = "db-1") -> tuple[str, str]:
    """An approved Rocky 9 task booted once (the claim): its kickstart URL and token."""
    if tasks.get(IDC, sn) is None:
        tasks.create(Task(idc=IDC, sn=sn, mac=mac, os_type="Rocky Linux 9",
                          params={"hostname": hostname}), by="alice")
    tasks.transition(IDC, sn, "approved", by="bob")
    eventually(lambda: (t := node.ctx.machines.view(sn).task) is not None
               and t.status == "approved")
    script = requests.get(f"{node.url}/boot/{mac}.ipxe", timeout=10).text
    url = next(w for w in script.split() if w.startswith("inst.ks="))[len("inst.ks="):]
    eventually(lambda: (t := node.ctx.machines.view(sn).task) is not None
               and t.status == "booting")
    return url, url.split("/t/")[1].split("/")[0]


def metrics(node: Node) -> str:
    return requests.get(node.url + "/metrics", timeout=10).text


def cache_counts(node: Node) -> tuple[float, float]:
    text = metrics(node)
    return (value(text, "lpmos_http_config_cache_total", result="hit"),
            value(text, "lpmos_http_config_cache_total", result="miss"))


def flask_render(node: Node, path: str) -> tuple[int, bytes, dict[str, str]]:
    """The Flask app's own answer, without the fast path or its cache."""
    fastpath = node.service.app.wsgi_app
    assert isinstance(fastpath, BootFastPath)
    resp = Client(fastpath.app).get(path)
    return resp.status_code, resp.get_data(), dict(resp.headers)


HEADERS = ("Content-Type", "Content-Length", "Cache-Control")


def test_a_repeat_is_served_from_memory_with_the_flask_body_and_records(
        node: Node, tasks: TaskService) -> None:
    url, token = claimed(node, tasks)
    path = url[len(node.url):]
    served_before = value(metrics(node), "lpmos_http_configs_total", config="ks.cfg")
    first = requests.get(url, timeout=10)
    assert first.status_code == 200 and "--hostname=db-1" in first.text
    assert cache_counts(node) == (0, 1)
    second = requests.get(url, timeout=10)
    assert cache_counts(node) == (1, 1)
    status, body, headers = flask_render(node, path)
    assert status == 200 and second.content == first.content == body
    assert {h: second.headers[h] for h in HEADERS} == {h: first.headers[h] for h in HEADERS} \
        == {h: headers[h] for h in HEADERS}
    # the header and ?token= forms are answered from the same entry
    by_header = requests.get(f"{node.url}/config/{SN}/ks.cfg",
                             headers={"Authorization": f"Bearer {token}"}, timeout=10)
    by_query = requests.get(f"{node.url}/config/{SN}/ks.cfg", params={"token": token},
                            timeout=10)
    assert by_header.content == by_query.content == body
    assert cache_counts(node) == (3, 1)
    text = metrics(node)
    # four through HTTP, one through flask_render (rendered again, not remembered)
    assert value(text, "lpmos_http_configs_total", config="ks.cfg") == served_before + 5
    assert value(text, "lpmos_http_config_cache_entries") == 1
    assert value(text, "lpmos_http_config_cache_bytes") == len(body)
    timeline = node.ctx.timeline
    assert isinstance(timeline, ThreadedTimeline)
    fetched = [e for e in timeline.entries(f"sn:{SN}") if e["stage"] == "config fetched"]
    # two through HTTP, flask_render's (no remote address), two more through HTTP
    http = {"name": "ks.cfg", "ip": "127.0.0.1"}
    assert [e["detail"] for e in fetched] == [http, http, {"name": "ks.cfg", "ip": ""},
                                              http, http]
    # the render on an app thread, every repeat on the event loop
    threads = timeline.threads[-5:]
    assert threads[0].startswith("http-worker") and threads[2] == "MainThread"
    assert [threads[1], threads[3], threads[4]] == ["http-loop"] * 3


def test_refused_tokens_get_the_routes_answers_never_the_cache(
        node: Node, tasks: TaskService) -> None:
    url, token = claimed(node, tasks)
    other_url, other_token = claimed(node, tasks, sn="CC-2", mac="52:54:00:cc:00:02")
    assert requests.get(url, timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 200
    assert cache_counts(node) == (1, 1)
    refused_before = value(metrics(node), "lpmos_http_token_refused_total")
    cases = [
        (url.replace(token, other_token), {}, 403, "token_other_machine"),
        (url.replace(token, "x" * 43), {}, 401, "token_invalid"),
        (url.replace(token, token[:-1] + ("A" if token[-1] != "A" else "B")), {}, 401,
         "token_invalid"),
        (f"{node.url}/config/{SN}/ks.cfg", {}, 401, "token_missing"),
        (f"{node.url}/config/{SN}/ks.cfg", {"Authorization": "Bearer "}, 401, "token_missing"),
        (f"{node.url}/config/{SN}/ks.cfg", {"Authorization": f"Bearer {other_token}"}, 403,
         "token_other_machine"),
    ]
    for target, headers, status, error in cases:
        r = requests.get(target, headers=headers, timeout=10)
        assert (r.status_code, r.json()["error"]) == (status, error), target
        assert token not in r.text and "%pre" not in r.text
        if status == 401:
            assert r.headers["WWW-Authenticate"] == 'Bearer realm="lpmos"'
    assert cache_counts(node) == (1, 1)
    assert value(metrics(node), "lpmos_http_token_refused_total") == refused_before + len(cases)
    # the other machine's own config is its own render
    mine = requests.get(other_url, timeout=10)
    assert mine.status_code == 200 and other_token in mine.text and token not in mine.text


def test_an_edit_of_the_task_changes_the_served_body(node: Node, tasks: TaskService) -> None:
    url, _token = claimed(node, tasks)
    assert "--hostname=db-1" in requests.get(url, timeout=10).text
    assert "--hostname=db-1" in requests.get(url, timeout=10).text
    assert cache_counts(node) == (1, 1)

    def edit(task: Task) -> None:
        task.params["hostname"] = "db-2"
    revision = tasks.update(IDC, SN, edit).revision
    eventually(lambda: node.ctx.machines.view(SN).task_revision == revision)
    edited = requests.get(url, timeout=10)
    assert edited.status_code == 200 and "--hostname=db-2" in edited.text
    assert "db-1" not in edited.text
    assert cache_counts(node) == (1, 2)
    assert requests.get(url, timeout=10).content == edited.content
    assert cache_counts(node) == (2, 2)


def test_a_redeploy_gets_its_new_token_and_the_old_one_is_refused(
        node: Node, tasks: TaskService) -> None:
    url, token = claimed(node, tasks)
    assert requests.get(url, timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 200
    tasks.transition(IDC, SN, "failed", by="node-a", reason="installer crashed")
    eventually(lambda: (t := node.ctx.machines.view(SN).task) is not None
               and t.status == "failed")
    gone = requests.get(url, timeout=10)
    assert gone.status_code == 409 and gone.json()["error"] == "no_install"
    new_url, new_token = claimed(node, tasks)       # retried: approved again, claimed again
    assert new_token != token
    again = requests.get(new_url, timeout=10)
    assert again.status_code == 200 and new_token in again.text and token not in again.text
    assert requests.get(new_url, timeout=10).content == again.content
    hits, misses = cache_counts(node)
    assert (hits, misses) == (2, 2)
    old = requests.get(url, timeout=10)     # the claim replaced the token in etcd
    assert old.status_code == 401 and old.json()["error"] == "token_invalid"
    assert cache_counts(node) == (2, 2)


def _templates_copy(tmp: Path, ks_text: str | None) -> Renderer:
    shutil.copytree(default_templates_dir(), tmp)
    if ks_text is not None:
        (tmp / "kickstart" / "rhel9.ks.j2").write_text(ks_text)
    return Renderer(tmp)


def test_a_new_template_renders_again_and_a_render_error_is_never_cached(
        node: Node, tasks: TaskService, tmp_path: Path) -> None:
    url, _token = claimed(node, tasks)
    boot = node.service.boot
    original = boot.renderer
    first = requests.get(url, timeout=10)
    assert requests.get(url, timeout=10).content == first.content
    assert cache_counts(node) == (1, 1)
    boot.renderer = _templates_copy(tmp_path / "t1", "# edited kickstart for {{ sn | line }}\n")
    edited = requests.get(url, timeout=10)
    assert edited.status_code == 200 and edited.text == f"# edited kickstart for {SN}\n"
    assert cache_counts(node) == (1, 2)
    errors_before = value(metrics(node), "lpmos_http_render_errors_total",
                          template="kickstart/rhel9.ks.j2")
    boot.renderer = _templates_copy(tmp_path / "t2", "{{ no_such_variable }}\n")
    for _ in range(3):
        broken = requests.get(url, timeout=10)
        assert broken.status_code == 500 and broken.json()["error"] == "render_error"
        assert "no_such_variable" in broken.json()["detail"]
    assert cache_counts(node) == (1, 2)
    assert value(metrics(node), "lpmos_http_render_errors_total",
                 template="kickstart/rhel9.ks.j2") == errors_before + 3
    boot.renderer = original
    back = requests.get(url, timeout=10)
    assert back.content == first.content
    assert cache_counts(node) == (1, 3)
    assert requests.get(url, timeout=10).content == first.content
    assert cache_counts(node) == (2, 3)


def test_no_install_in_progress_is_the_routes_409_even_after_a_hit(
        node: Node, tasks: TaskService) -> None:
    url, _token = claimed(node, tasks)
    assert requests.get(url, timeout=10).status_code == 200
    assert requests.get(url, timeout=10).status_code == 200
    tasks.transition(IDC, SN, "cancelled", by="alice")
    eventually(lambda: (t := node.ctx.machines.view(SN).task) is not None
               and t.status == "cancelled")
    r = requests.get(url, timeout=10)
    assert r.status_code == 409 and r.json()["error"] == "no_install"
    assert cache_counts(node) == (1, 1)
