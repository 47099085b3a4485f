"""``/metrics`` of a real regional node and a real control plane, checked by
Prometheus's own linter, and everything that names those metrics held to
them: the Grafana dashboard (``docs/grafana/lpmos.json``) and the metrics
reference (``docs/metrics.md``).

One ``lpmos regional`` and one ``lpmos control-plane`` (gunicorn) on the
session's real etcd, started as an operator starts them, serve the whole
module.  Traffic first (boot scripts, TFTP, ProxyDHCP, an agent's register /
heartbeat / claim / events, API calls, a refused request, a WebSocket), so
the counters and histograms have series; then each exposition goes through
``promtool check metrics`` (Debian's ``prometheus`` package) on stdin.
"""

from __future__ import annotations

import json
import re
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import websocket
from prometheus_client.parser import text_string_to_metric_families

from lpmos.auth import Auth
from lpmos.store.etcd import EtcdStore
from lpmos.store.keys import Keys
from tests.prometheus_text import families, series_names
from tests.prometheus_text import value as sample
from tests.reliability.support import (
    IDC,
    ControlPlane,
    Regional,
    auth,
    eventually,
    progress,
    register,
)

REPO = Path(__file__).resolve().parents[2]
PROMTOOL = "/usr/bin/promtool"
DASHBOARD = REPO / "docs" / "grafana" / "lpmos.json"
METRICS_DOC = REPO / "docs" / "metrics.md"
MAC = "52:54:00:6d:00:01"
UUID = "6d6d6d6d-0000-4000-8000-000000000001"
SN = "MET-1"


@dataclass
class Expositions:
    node: str
    plane: str

    def by_service(self) -> dict[str, str]:
        return {"regional node": self.node, "control plane": self.plane}


def _traffic(node: Regional, plane: ControlPlane, tokens: dict[str, str], tmp: Path) -> None:
    """What an hour of a small site does, in a few seconds."""
    # the boot node: constant and per-machine scripts, a refused path, TFTP, ProxyDHCP
    assert requests.get(node.url + "/boot.ipxe", timeout=10).status_code == 200
    assert requests.get(f"{node.url}/boot/{MAC}.ipxe", timeout=10).status_code == 200
    assert requests.get(node.url + "/boot/not-a-mac.ipxe", timeout=10).status_code == 400
    assert requests.get(node.url + "/nowhere", timeout=10).status_code == 404
    assert len(node.tftp("undionly.kpxe", tmp / "undionly.kpxe")) > 1000
    missing = subprocess.run(["curl", "-sf", "--max-time", "10", "-o", str(tmp / "none"),
                              f"tftp://127.0.0.1:{node.ports['tftp']}/no-such-file"],
                             capture_output=True, timeout=30, check=False)
    assert missing.returncode != 0
    assert node.proxy_dhcp(MAC, xid=4242).file.rstrip(b"\0") == b"ipxe.efi"
    # an agent registers, beats, and its approved task is claimed and reports progress
    reg = register(node.url, SN, MAC, UUID)
    assert reg.status_code == 200, reg.text
    agent = auth(reg.json()["token"])
    assert requests.post(node.url + "/agent/v1/heartbeat", json={"sn": SN, "state": "idle"},
                         headers=agent, timeout=10).status_code == 200
    assert requests.get(node.url + "/agent/v1/task", params={"sn": SN},
                        timeout=10).status_code == 401             # no token: refused
    # the control plane: the task is created and approved through the API
    api = plane.url + "/api/v1"
    r = requests.post(api + "/tasks", headers=auth(tokens["operator"]), timeout=10,
                      json={"idc": IDC, "sn": SN, "mac": MAC, "os_type": "Lab OS"})
    assert r.status_code == 201, r.text
    r = requests.post(f"{api}/tasks/{IDC}/{SN}/approve", headers=auth(tokens["approver"]),
                      json={}, timeout=10)
    assert r.status_code == 200, r.text
    assert requests.get(api + "/tasks", headers=auth(tokens["viewer"]),
                        timeout=10).status_code == 200
    assert requests.get(api + "/tasks", timeout=10).status_code == 401
    assert requests.get(plane.url + "/healthz", timeout=10).status_code == 200
    ws = websocket.create_connection(f"ws://127.0.0.1:{plane.port}/ws", timeout=30,
                                     header=[f"Authorization: Bearer {tokens['viewer']}"])
    try:
        assert json.loads(ws.recv())["t"] == "hello"
    finally:
        ws.close()

    def claimed() -> bool:
        r = requests.get(node.url + "/agent/v1/task", params={"sn": SN}, headers=agent,
                         timeout=30)
        return r.status_code == 200 and r.json()["action"] == "install"

    eventually(claimed, what="the agent's install claim")
    r = requests.post(node.url + "/agent/v1/events", headers=agent, timeout=30,
                      json={"sn": SN, "events": progress(1, 3)})
    assert r.status_code == 200 and len(r.json()["acked"]) == 3, r.text


@pytest.fixture(scope="module")
def expositions(etcd_server: Any, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[Expositions]:
    work = tmp_path_factory.mktemp("metrics")
    prefix = "/metrics-" + uuid.uuid4().hex[:8]
    store = EtcdStore([etcd_server.url], timeout=2.0)
    tokens = {}
    try:
        users = Auth(store, Keys(prefix))
        for role in ("viewer", "operator", "approver"):
            users.put_user(f"{role}-m", role, "password-123")
            tokens[role], _ = users.create_token(f"{role}-m")
    finally:
        store.close()
    plane = ControlPlane(etcd_server.url, prefix, work, name="cp-metrics")
    node = Regional(etcd_server.url, prefix, work, name="node-metrics")
    try:
        plane.start()
        node.start(wait_for=("ok",))
        _traffic(node, plane, tokens, work)
        yield Expositions(requests.get(node.url + "/metrics", timeout=10).text,
                          requests.get(plane.url + "/metrics", timeout=10).text)
    finally:
        node.kill()
        plane.kill()


# --- Prometheus's linter, and the namespace ---------------------------------------------


@pytest.mark.parametrize("service", ["regional node", "control plane"])
def test_promtool_finds_nothing_to_lint(expositions: Expositions, service: str) -> None:
    text = expositions.by_service()[service]
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip() == "" and done.stderr.strip() == "", done.stdout + done.stderr


def test_promtool_catches_what_the_check_is_for() -> None:
    """The check can fail: an exposition without HELP and with a counter
    that does not end in _total is refused."""
    bad = "# TYPE lpmos_things counter\nlpmos_things 1\n"
    done = subprocess.run([PROMTOOL, "check", "metrics"], input=bad, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode != 0
    assert "no help text" in done.stdout + done.stderr
    assert "_total" in done.stdout + done.stderr


@pytest.mark.parametrize("service", ["regional node", "control plane"])
def test_every_metric_is_in_the_lpmos_namespace_with_help(expositions: Expositions,
                                                          service: str) -> None:
    text = expositions.by_service()[service]
    found = families(text)
    assert len(found) > 15
    assert sorted(n for n in found if not n.startswith("lpmos_")) == []
    sample_names = {line.split("{")[0].split(" ")[0] for line in text.splitlines()
                    if line and not line.startswith("#")}
    assert sample_names and all(n.startswith("lpmos_") for n in sample_names)
    assert sorted(n for n, f in found.items() if not f.help.strip()) == []


def test_the_node_counted_the_traffic_and_timed_it(expositions: Expositions) -> None:
    text = expositions.node
    assert sample(text, "lpmos_http_boot_constant_total") == 1
    assert sample(text, "lpmos_http_boot_scripts_total", decision="discovery") >= 1
    assert sample(text, "lpmos_http_boot_script_seconds_count") >= 1
    assert sample(text, "lpmos_http_requests_refused_total", reason="not_found") >= 1
    assert sample(text, "lpmos_tftp_sessions_total", status="ok") == 1
    assert sample(text, "lpmos_tftp_transfer_seconds_count") == 1
    assert sample(text, "lpmos_tftp_bytes_total") == Path("/usr/lib/ipxe/undionly.kpxe"
                                                          ).stat().st_size
    assert sample(text, "lpmos_tftp_refused_total") >= 1
    assert sample(text, "lpmos_dhcp_packets_in_total") >= 1
    assert sample(text, "lpmos_dhcp_answer_seconds_count") >= 1
    assert sample(text, "lpmos_http_registrations_total") == 1
    assert sample(text, "lpmos_http_token_refused_total", reason="missing") >= 1
    assert sample(text, "lpmos_http_install_claims_total", result="claimed_by_agent") == 1
    assert sample(text, "lpmos_http_events_applied_total") == 3
    assert sample(text, "lpmos_node_cache_keys") > 0
    # a histogram's buckets are cumulative and end in its count
    buckets = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "lpmos_http_boot_script_seconds_bucket"]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels["le"] == "+Inf"
    assert counts[-1] == sample(text, "lpmos_http_boot_script_seconds_count")


def test_the_control_plane_counted_the_traffic_and_timed_it(expositions: Expositions) -> None:
    text = expositions.plane
    assert sample(text, "lpmos_web_requests_total", method="POST", status="201") == 1
    assert sample(text, "lpmos_web_requests_total", method="GET", status="401") >= 1
    assert sample(text, "lpmos_web_refused_total") >= 1
    assert sample(text, "lpmos_web_request_duration_seconds_count", method="POST",
                  route="/api/v1/tasks/<idc>/<sn>/approve") == 1
    assert sample(text, "lpmos_web_ws_connections_total") == 1
    assert sample(text, "lpmos_web_cache_staleness_seconds") < 10
    assert 'route="/ws"' not in text       # a WebSocket session is not a request duration


# --- the dashboard cannot drift from the expositions ------------------------------------


def _exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "expr" and isinstance(value, str):
                yield value
            else:
                yield from _exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _exprs(item)


def test_every_dashboard_query_names_an_exposed_metric(expositions: Expositions) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] and dashboard["panels"]
    exprs = list(_exprs(dashboard))
    assert len(exprs) >= 10
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"]
                 if isinstance(v.get("query"), dict)]
    assert variables
    exposed = series_names(expositions.node) | series_names(expositions.plane)
    used = {name for e in exprs + variables for name in re.findall(r"\blpmos_[a-z0-9_]+", e)}
    assert used, exprs
    assert sorted(used - exposed) == [], "the dashboard queries metrics nobody exposes"
    # every query is about LPMOS's own metrics (no other metric names)
    for e in exprs:
        bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\"[^\"]*\"", "", e)
        words = set(re.findall(r"\b[a-z_][a-z0-9_]*\b", bare))
        names = {w for w in words if "_" in w and not w.startswith("lpmos_")}
        assert names <= PROMQL_WORDS, (e, names - PROMQL_WORDS)


PROMQL_WORDS = {"histogram_quantile", "label_replace", "count_values", "absent_over_time",
                "max_over_time", "min_over_time", "avg_over_time", "sum_over_time",
                "last_over_time", "bottomk", "topk"}


def test_the_dashboard_queries_metrics_of_both_services(expositions: Expositions) -> None:
    used = {name for e in _exprs(json.loads(DASHBOARD.read_text()))
            for name in re.findall(r"\blpmos_[a-z0-9_]+", e)}
    assert used & series_names(expositions.node) - \
        series_names(expositions.plane)
    assert used & series_names(expositions.plane) - \
        series_names(expositions.node)


# --- docs/metrics.md is the expositions' HELP, TYPE and labels -----------------------------


ROW = re.compile(r"^\| `(lpmos_[a-z0-9_]+)` \| (\w+) \| ([^|]*) \| (.*) \|$")


def documented() -> dict[str, tuple[str, frozenset[str], str]]:
    """``docs/metrics.md``'s table rows: name -> (type, labels, meaning)."""
    rows = {}
    for line in METRICS_DOC.read_text().splitlines():
        m = ROW.match(line)
        if m:
            labels = frozenset(re.findall(r"`([a-z_]+)`", m.group(3)))
            rows[m.group(1)] = (m.group(2), labels, m.group(4).strip())
    return rows


def test_the_metrics_reference_matches_the_live_expositions(expositions: Expositions) -> None:
    """Every metric of either service is in the reference with its TYPE and
    its HELP text as the meaning, and every label its samples carry; and
    every row of the reference is a metric one of them exposes (or one of
    the agent's, which has no /metrics, of lab mode's address leases, or of
    DHCPv6, which runs only when configured)."""
    rows = documented()
    live = {**families(expositions.node), **families(expositions.plane)}
    missing = sorted(set(live) - set(rows))
    assert missing == [], f"not in docs/metrics.md: {missing}"
    for name, family in live.items():
        kind, labels, meaning = rows[name]
        assert kind == family.kind, name
        assert meaning == family.help.replace("|", "\\|"), name
        assert family.labels <= labels, (name, sorted(family.labels - labels))
    # the agent's; lab-mode DHCP's; DHCPv6's, which runs only with --dhcp6-mode (its
    # counters are read in tests/integration/test_dhcp6_netns.py)
    elsewhere = {n for n, (_, _, meaning) in rows.items()
                 if n.startswith(("lpmos_agent_", "lpmos_dhcp6_"))
                 or meaning.startswith("lab mode: ")}
    assert sorted(set(rows) - set(live) - elsewhere) == [], "documented but not exposed"


