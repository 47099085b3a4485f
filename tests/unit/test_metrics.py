"""lpmos.metrics: the Registry API on prometheus_client — exact values, the
one namespace, name rules, label handling, thread safety, a private
registry each, the agent's import without prometheus_client — and every
metric the code records listed in docs/metrics.md."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import threading
from pathlib import Path

import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lpmos.metrics import Registry
from tests.prometheus_text import families, has_sample, value

REPO = Path(__file__).resolve().parents[2]


def test_a_counter_past_a_million_is_not_rounded() -> None:
    m = Registry()
    m.describe("things_total", "things")
    m.inc("things_total", 1234567)
    m.inc("bytes_total", 3145728123, kind="image")
    m.describe("bytes_total", "bytes")
    text = m.render()
    assert value(text, "lpmos_things_total") == 1234567
    assert value(text, "lpmos_bytes_total", kind="image") == 3145728123
    # the text itself parses back to the very same float (the old %g gave 1.23457e+06)
    line = next(x for x in text.splitlines() if x.startswith("lpmos_things_total "))
    assert float(line.split()[1]) == 1234567.0 and "1.23457e+06" not in text
    line = next(x for x in text.splitlines() if x.startswith("lpmos_bytes_total"))
    assert float(line.rsplit(" ", 1)[1]) == 3145728123.0


def test_non_integers_and_histogram_sums_round_trip_exactly() -> None:
    m = Registry()
    m.describe("wait_seconds", "waits", kind="histogram")
    for v in (0.1, 0.2, 1234567.123456, 0.000123):
        m.observe("wait_seconds", v)
    m.gauge("ratio", lambda: 1 / 3, "a third")
    text = m.render()
    assert value(text, "lpmos_wait_seconds_sum") == 0.1 + 0.2 + 1234567.123456 + 0.000123
    assert value(text, "lpmos_wait_seconds_count") == 4
    assert value(text, "lpmos_ratio") == 1 / 3
    buckets = {s.labels["le"]: s.value for f in text_string_to_metric_families(text)
               for s in f.samples if s.name == "lpmos_wait_seconds_bucket"}
    assert buckets["0.00025"] == 1 and buckets["0.25"] == 3 and buckets["10.0"] == 3
    assert buckets["+Inf"] == 4


def test_the_namespace_is_added_once_and_reads_take_either_name() -> None:
    m = Registry()
    m.inc("dhcp_dropped_total", reason="truncated")
    m.inc("dhcp_dropped_total", 2, reason="truncated")
    text = m.render()
    assert "# TYPE lpmos_dhcp_dropped_total counter" in text
    assert "lpmos_lpmos_" not in text and "\ndhcp_dropped_total" not in text
    assert m.get("dhcp_dropped_total", reason="truncated") == 3
    assert m.get("lpmos_dhcp_dropped_total", reason="truncated") == 3
    assert m.total("lpmos_dhcp_dropped_total") == m.total("dhcp_dropped_total") == 3
    assert m.snapshot() == {"dhcp_dropped_total": {"reason=truncated": 3.0}}
    assert m.full_name("dhcp_dropped_total") == "lpmos_dhcp_dropped_total"


@pytest.mark.parametrize(("name", "kind", "why"), [
    ("lpmos_x_total", None, "namespace"),
    ("x_count", "counter", "_total"),
    ("x_total", "gauge", "_total"),
    ("x_total", "histogram", "_total"),
    ("X_total", None, "lower case"),
    ("x-y_total", None, "lower case"),
])
def test_describe_refuses_names_against_the_rules(name: str, kind: str | None, why: str) -> None:
    with pytest.raises(ValueError, match=why):
        Registry().describe(name, "text", kind=kind)  # type: ignore[arg-type]


def test_gauge_refuses_a_total_and_a_namespaced_name() -> None:
    with pytest.raises(ValueError, match="_total"):
        Registry().gauge("queue_total", lambda: 1.0, "no")
    with pytest.raises(ValueError, match="namespace"):
        Registry().gauge("lpmos_cache_keys", lambda: 1.0, "no")


def test_described_metrics_are_listed_before_their_first_sample() -> None:
    m = Registry()
    m.describe("refused_total", "refusals, by reason")
    m.describe("answer_seconds", "answer time", kind="histogram")
    m.describe("not_yet_known", "no kind: shown once recorded")
    found = families(m.render())
    assert found["lpmos_refused_total"].kind == "counter"
    assert found["lpmos_refused_total"].help == "refusals, by reason"
    assert found["lpmos_answer_seconds"].kind == "histogram"
    assert "lpmos_not_yet_known" not in found
    assert not has_sample(m.render(), "lpmos_refused_total")


def test_label_values_are_escaped_and_parse_back() -> None:
    m = Registry()
    nasty = 'a "quoted"\\ back\nslash'
    m.inc("odd_total", reason=nasty)
    m.describe("odd_total", "odd")
    assert value(m.render(), "lpmos_odd_total", reason=nasty) == 1


def test_series_with_fewer_labels_get_the_empty_value() -> None:
    """Prometheus reads an empty label as an absent one: both series stay
    in one family."""
    m = Registry()
    m.describe("mixed_total", "mixed")
    m.inc("mixed_total", reason="a")
    m.inc("mixed_total", reason="b", kind="k")
    samples = [s for f in text_string_to_metric_families(m.render()) for s in f.samples]
    assert sorted((s.labels["reason"], s.labels["kind"]) for s in samples) == \
        [("a", ""), ("b", "k")]


def test_a_broken_gauge_leaves_out_its_series_only() -> None:
    m = Registry()
    m.gauge("alarm", lambda: 1 / 0, "broken", alarm="nospace")
    m.gauge("alarm", lambda: 0.0, "broken", alarm="corrupt")
    m.gauge("fine", lambda: 7.0, "fine")
    text = m.render()
    assert not has_sample(text, "lpmos_alarm", alarm="nospace")
    assert has_sample(text, "lpmos_alarm", alarm="corrupt") and value(text, "lpmos_fine") == 7


def test_concurrent_increments_and_scrapes_lose_nothing() -> None:
    m = Registry()
    m.describe("hits_total", "hits")
    errors: list[BaseException] = []

    def count() -> None:
        for i in range(5000):
            m.inc("hits_total", reason=str(i % 4))
            m.observe("took_seconds", 0.001)

    def scrape() -> None:
        try:
            for _ in range(50):
                text = m.render()
                assert value(text, "lpmos_hits_total") <= 8 * 5000
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=count) for _ in range(8)] + \
        [threading.Thread(target=scrape) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    text = m.render()
    assert value(text, "lpmos_hits_total") == m.total("hits_total") == 8 * 5000
    assert value(text, "lpmos_took_seconds_count") == 8 * 5000


def test_each_registry_is_private_and_the_global_one_stays_clean() -> None:
    a, b = Registry(), Registry()
    a.inc("only_a_total")
    b.inc("only_b_total")
    assert "only_b" not in a.render() and "only_a" not in b.render()
    assert not any(f.name.startswith("lpmos_") for f in prometheus_client.REGISTRY.collect())


def test_the_agent_counts_without_prometheus_client() -> None:
    """The agent installs without the server extra: importing and counting
    needs no prometheus_client, and only ``render`` asks for it."""
    code = (
        "import sys; sys.modules['prometheus_client'] = None\n"
        "from lpmos.metrics import Registry\n"
        "m = Registry(); m.inc('agent_heartbeats_total', result='ok')\n"
        "assert m.get('agent_heartbeats_total', result='ok') == 1\n"
        "try:\n    m.render()\nexcept ImportError:\n    print('render needs it')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "render needs it"


# --- every metric the code records is in docs/metrics.md ----------------------------------


RECORDERS = {"inc", "observe", "gauge", "describe"}


def _recorded_names(methods: set[str] = RECORDERS) -> dict[str, str]:
    """Metric names given as a literal to inc/observe/gauge/describe in the
    services and the agent, with where; plus the DHCP batch counters'."""
    found: dict[str, str] = {}
    for package in ("lpmos", "bootsvc", "agent", "web"):
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr in methods and node.args \
                        and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str) \
                        and re.fullmatch(r"[a-z][a-z0-9_]*", node.args[0].value) \
                        and "_" in node.args[0].value:
                    where = f"{path.relative_to(REPO)}:{node.lineno}"
                    found.setdefault(node.args[0].value, where)
                elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                        and node.func.attr == "count_packet" and "inc" in methods and node.args \
                        and isinstance(node.args[0], ast.Constant):
                    found.setdefault(str(node.args[0].value), f"{path.relative_to(REPO)}")
    return found


def test_the_scan_finds_the_metrics_of_every_service() -> None:
    names = _recorded_names()
    for name in ("dhcp_packets_in_total", "tftp_transfer_seconds", "http_boot_scripts_total",
                 "web_refused_total", "etcd_alarm", "agent_spool_dropped_total"):
        assert name in names


def test_every_recorded_metric_is_in_the_reference() -> None:
    documented = set(re.findall(r"^\| `(lpmos_[a-z0-9_]+)` \|",
                                (REPO / "docs" / "metrics.md").read_text(), re.M))
    names = _recorded_names()
    missing = sorted(f"lpmos_{n} ({where})" for n, where in names.items()
                     if f"lpmos_{n}" not in documented)
    assert missing == [], "add them to docs/metrics.md"
    assert sorted(n for n in names if n.startswith("lpmos_")) == [], \
        "the namespace is the registry's: call sites use the short name"


def test_recorded_names_follow_the_naming_guide() -> None:
    """Counters end in _total; histograms and gauges carry a base unit or
    a count noun, never a non-base unit (ms, kb ...)."""
    names = _recorded_names()
    bad_units = re.compile(r"_(ms|milliseconds|us|microseconds|kb|kilobytes|mb|megabytes|"
                           r"minutes|hours|percent)(_|$)")
    assert sorted(n for n in names if bad_units.search(n)) == []
    assert sorted(n for n in _recorded_names({"inc"}) if not n.endswith("_total")) == []
    assert sorted(n for n in _recorded_names({"observe"})
                  if not n.endswith(("_seconds", "_bytes"))) == []
    assert sorted(n for n in _recorded_names({"gauge"}) if n.endswith("_total")) == []
