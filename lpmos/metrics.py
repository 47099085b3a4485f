"""Metrics as records, exposed in the Prometheus text format by
``prometheus_client``.

Services count into a :class:`Registry`; ``/metrics`` renders it.  No
background threads, no globals: each service owns its registry.  Counters and
histograms are keyed by label tuples; every refusal is counted with a reason
(RELIABILITY L4), e.g. ``registry.inc("dhcp_dropped_total", reason="bad_cookie")``.

Names.  Call sites use the short name (``dhcp_dropped_total``); the
``lpmos_`` namespace is added here, once, when the exposition is built
(``lpmos_dhcp_dropped_total``), so every metric of every service carries it
and no call site spells it.  :meth:`Registry.describe` and
:meth:`Registry.gauge` refuse a name that already carries it, or a counter
not ending in ``_total``.  :meth:`Registry.get`, :meth:`Registry.total`
accept either form; :meth:`Registry.snapshot` keys are the short names.
Units follow Prometheus's naming guide: base units (``_seconds``,
``_bytes``), ``_total`` on counters, latencies as histograms.
``docs/metrics.md`` lists them all, checked against the live expositions.

Why a custom collector and not ``prometheus_client.Counter`` objects: call
sites name their labels at the call (``inc(name, reason=...)``), a metric
first appears when it is first counted, and tests and the node's
registration read values back by name (:meth:`get`, :meth:`total`,
:meth:`snapshot`); ``Counter`` wants its label names fixed when it is
created and has no read-back API.  So the values live here, in plain dicts
under one lock (an increment is a dict update: cheap on the DHCP and TFTP
hot paths, and safe from any thread or the event loop), and
the collector of :func:`_private_registry` turns a consistent copy of them
into ``CounterMetricFamily`` / ``GaugeMetricFamily`` /
``HistogramMetricFamily`` at scrape time;
``prometheus_client.exposition.generate_latest`` writes the text, every
float printed exactly (``repr``'s digits, Go's exponent form past 1e6:
``1.234567e+06``, ``3.145728123e+09``), never rounded as ``%g`` did.

Each :class:`Registry` has its own private ``CollectorRegistry`` (never the
global ``REGISTRY``), made on the first :meth:`render`.  ``prometheus_client``
is imported there, lazily: the core is imported by the agent, which installs
without the ``server`` extra and counts (its spool) but never renders.
"""

from __future__ import annotations

import bisect
import re
import threading
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

NAMESPACE = "lpmos"

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]
Kind = Literal["counter", "gauge", "histogram"]

_NAME = re.compile(r"[a-z][a-z0-9_]*\Z")


def _labels(kw: dict[str, object]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


class Histogram:
    """Counts per bucket (not cumulative), the sum and the count."""

    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1

    def copy(self) -> Histogram:
        other = Histogram(self.buckets)
        other.counts, other.total, other.n = list(self.counts), self.total, self.n
        return other


class Registry:
    """One service's metrics.  Thread-safe; ``render`` needs the ``server``
    extra (``prometheus_client``), the rest only the standard library."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        self.namespace = namespace
        self._prefix = namespace + "_"
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, Callable[[], float]]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._help: dict[str, str] = {}
        self._kinds: dict[str, Kind] = {}
        self._exposition: Any = None      # the private CollectorRegistry, on first render

    # -- names -------------------------------------------------------------------------

    def _short(self, name: str) -> str:
        return name[len(self._prefix):] if name.startswith(self._prefix) else name

    def full_name(self, name: str) -> str:
        """The exposed name: ``dhcp_dropped_total`` -> ``lpmos_dhcp_dropped_total``."""
        return self._prefix + self._short(name)

    def _check(self, name: str, kind: Kind | None) -> None:
        if not _NAME.match(name):
            raise ValueError(f"metric name {name!r}: lower case, digits and _ only")
        if name.startswith(self._prefix):
            raise ValueError(f"metric name {name!r}: the {self._prefix} namespace is added "
                             "by the registry, not by the caller")
        if (kind == "counter") != name.endswith("_total"):
            raise ValueError(f"metric name {name!r}: counters, and only counters, end in "
                             "_total")

    def describe(self, name: str, help_text: str, kind: Kind | None = None) -> None:
        """The HELP text of ``name``.  With a ``kind`` (a name ending in
        ``_total`` is a counter), the metric is exposed (HELP and TYPE, no
        sample) before it is first recorded, so dashboards and
        ``docs/metrics.md`` see it from the start."""
        if kind is None and name.endswith("_total"):
            kind = "counter"
        self._check(name, kind)
        with self._lock:
            self._help[name] = help_text
            if kind is not None:
                self._kinds[name] = kind

    # -- recording (hot paths: no validation, one dict update under the lock) -----------

    def inc(self, name: str, amount: float = 1.0, **labels: object) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + amount

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                **labels: object) -> None:
        """One observation of histogram ``name``; its buckets are those of
        its first observation."""
        key = _labels(labels)
        with self._lock:
            hist = self._hists[name].get(key)
            if hist is None:
                hist = self._hists[name][key] = Histogram(buckets)
            hist.observe(value)

    def gauge(self, name: str, fn: Callable[[], float], help_text: str = "",
              **labels: object) -> None:
        """A value read at render time (queue depth, cache staleness ...);
        with ``labels``, one series of several under ``name``
        (``etcd_alarm{alarm="nospace"}``).  A callback that raises leaves
        its series out of that scrape."""
        self._check(name, "gauge")
        with self._lock:
            self._gauges[name][_labels(labels)] = fn
            self._kinds[name] = "gauge"
            if help_text:
                self._help[name] = help_text

    # -- reading back ------------------------------------------------------------------

    def get(self, name: str, **labels: object) -> float:
        with self._lock:
            return self._counters.get(self._short(name), {}).get(_labels(labels), 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._counters.get(self._short(name), {}).values())

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Counters as ``{short name: {"k=v,...": value}}`` (tests, JSON stats)."""
        with self._lock:
            return {name: {",".join(f"{k}={v}" for k, v in labels): value
                           for labels, value in series.items()}
                    for name, series in self._counters.items()}

    def help_texts(self) -> dict[str, str]:
        """HELP text by short name (what :meth:`describe` was told)."""
        with self._lock:
            return dict(self._help)

    # -- exposition --------------------------------------------------------------------

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4) of every metric."""
        from prometheus_client.exposition import generate_latest

        with self._lock:
            if self._exposition is None:
                self._exposition = _private_registry(self)
            exposition = self._exposition
        return generate_latest(exposition).decode()

    def _families(self) -> Iterator[Metric]:
        from prometheus_client.metrics_core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )
        from prometheus_client.utils import floatToGoString

        with self._lock:      # a consistent copy; gauge callbacks run outside the lock
            counters = {n: dict(s) for n, s in self._counters.items()}
            hists = {n: {k: h.copy() for k, h in s.items()} for n, s in self._hists.items()}
            gauges = {n: dict(s) for n, s in self._gauges.items()}
            helps = dict(self._help)
            kinds = dict(self._kinds)
        for name in counters:
            kinds.setdefault(name, "counter")
        for name in hists:
            kinds.setdefault(name, "histogram")
        for name in sorted(kinds):
            kind, full, doc = kinds[name], self._prefix + name, helps.get(name, "")
            if kind == "counter":
                series: dict[Labels, Any] = counters.get(name, {})
                names = _label_names(series)
                counter = CounterMetricFamily(full, doc, labels=names)
                for labels, value in sorted(series.items()):
                    counter.add_metric(_values(labels, names), value)
                yield counter
            elif kind == "histogram":
                series = hists.get(name, {})
                names = _label_names(series)
                histogram = HistogramMetricFamily(full, doc, labels=names)
                for labels, hist in sorted(series.items(), key=lambda item: item[0]):
                    cumulative, buckets = 0, []
                    for bound, count in zip(hist.buckets, hist.counts, strict=False):
                        cumulative += count
                        le = floatToGoString(bound)  # type: ignore[no-untyped-call]
                        buckets.append((str(le), float(cumulative)))
                    buckets.append(("+Inf", float(hist.n)))
                    histogram.add_metric(_values(labels, names), buckets, hist.total)
                yield histogram
            else:
                fns = gauges.get(name, {})
                names = _label_names(fns)
                gauge = GaugeMetricFamily(full, doc, labels=names)
                for labels, fn in sorted(fns.items(), key=lambda item: item[0]):
                    try:
                        value = float(fn())
                    except Exception:  # noqa: S112 (a broken gauge must not break /metrics)
                        continue
                    gauge.add_metric(_values(labels, names), value)
                yield gauge


def _label_names(series: dict[Labels, Any]) -> list[str]:
    """Every label name any series of a metric uses, sorted; a series
    without one of them gets the empty value (which Prometheus reads as the
    label being absent)."""
    return sorted({k for labels in series for k, _ in labels})


def _values(labels: Labels, names: list[str]) -> list[str]:
    have = dict(labels)
    return [have.get(n, "") for n in names]


def _private_registry(registry: Registry) -> Any:
    """A ``CollectorRegistry`` of ``registry`` alone, with one collector
    whose ``collect`` runs on every scrape.  It has no ``describe``: the
    metric set grows as things are first counted, so the private registry
    must not cache or check names at registration."""
    from prometheus_client import CollectorRegistry
    from prometheus_client.registry import Collector

    class _Collector(Collector):
        def collect(self) -> Iterator[Metric]:
            return registry._families()

        def describe(self) -> Iterator[Metric]:
            return iter(())

    exposition = CollectorRegistry(auto_describe=False)
    exposition.register(_Collector())
    return exposition
