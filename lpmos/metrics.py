"""Metrics as records, rendered in the Prometheus text format.

Services count into a :class:`Registry`; ``/metrics`` renders it.  No
background threads, no globals: each service owns its registry.  Counters and
histograms are keyed by label tuples; every refusal is counted with a reason
(RELIABILITY L4), e.g. ``registry.inc("dhcp_dropped_total", reason="bad_cookie")``.
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = tuple[tuple[str, str], ...]


def _labels(kw: dict[str, object]) -> Labels:
    return tuple(sorted((k, str(v)) for k, v in kw.items()))


def _fmt_labels(labels: Labels, extra: Iterable[tuple[str, str]] = ()) -> str:
    items = list(labels) + list(extra)
    if not items:
        return ""
    esc = [(k, v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"'))
           for k, v in items]
    return "{" + ",".join(f'{k}="{v}"' for k, v in esc) + "}"


def _fmt_value(value: float) -> str:
    """Whole numbers in full (a byte count of 3145728, not ``3.14573e+06``),
    others as ``%g``."""
    if value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return f"{value:g}"


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


class Registry:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: dict[str, dict[Labels, float]] = defaultdict(dict)
        self._gauges: dict[str, dict[Labels, Callable[[], float]]] = defaultdict(dict)
        self._hists: dict[str, dict[Labels, Histogram]] = defaultdict(dict)
        self._help: dict[str, str] = {}

    def describe(self, name: str, help_text: str) -> None:
        self._help[name] = help_text

    def inc(self, name: str, amount: float = 1.0, **labels: object) -> None:
        key = _labels(labels)
        with self._lock:
            series = self._counters[name]
            series[key] = series.get(key, 0.0) + amount

    def get(self, name: str, **labels: object) -> float:
        with self._lock:
            return self._counters.get(name, {}).get(_labels(labels), 0.0)

    def total(self, name: str) -> float:
        with self._lock:
            return sum(self._counters.get(name, {}).values())

    def gauge(self, name: str, fn: Callable[[], float], help_text: str = "",
              **labels: object) -> None:
        """A value read at render time (queue depth, cache staleness ...);
        with ``labels``, one series of several under ``name``
        (``etcd_alarm{alarm="nospace"}``)."""
        self._gauges[name][_labels(labels)] = fn
        if help_text:
            self._help[name] = help_text

    def observe(self, name: str, value: float, buckets: tuple[float, ...] = LATENCY_BUCKETS,
                **labels: object) -> None:
        key = _labels(labels)
        with self._lock:
            hist = self._hists[name].get(key)
            if hist is None:
                hist = self._hists[name][key] = Histogram(buckets)
            hist.observe(value)

    def snapshot(self) -> dict[str, dict[str, float]]:
        """Counters as ``{name: {"k=v,...": value}}`` (tests, JSON stats)."""
        with self._lock:
            return {name: {",".join(f"{k}={v}" for k, v in labels): value
                           for labels, value in series.items()}
                    for name, series in self._counters.items()}

    def render(self) -> str:
        lines: list[str] = []
        with self._lock:
            for name in sorted(self._counters):
                if name in self._help:
                    lines.append(f"# HELP {name} {self._help[name]}")
                lines.append(f"# TYPE {name} counter")
                for labels, value in sorted(self._counters[name].items()):
                    lines.append(f"{name}{_fmt_labels(labels)} {_fmt_value(value)}")
            for name in sorted(self._hists):
                if name in self._help:
                    lines.append(f"# HELP {name} {self._help[name]}")
                lines.append(f"# TYPE {name} histogram")
                for labels, hist in sorted(self._hists[name].items()):
                    cumulative = 0
                    for bound, count in zip(hist.buckets, hist.counts, strict=False):
                        cumulative += count
                        lines.append(f"{name}_bucket{_fmt_labels(labels, [('le', f'{bound:g}')])} "
                                     f"{cumulative}")
                    lines.append(f"{name}_bucket{_fmt_labels(labels, [('le', '+Inf')])} {hist.n}")
                    lines.append(f"{name}_sum{_fmt_labels(labels)} {_fmt_value(hist.total)}")
                    lines.append(f"{name}_count{_fmt_labels(labels)} {hist.n}")
        for name in sorted(self._gauges):
            series = []
            for labels, fn in sorted(self._gauges[name].items(), key=lambda item: item[0]):
                try:
                    series.append(f"{name}{_fmt_labels(labels)} {_fmt_value(float(fn()))}")
                except Exception:  # noqa: S112 (a broken gauge must not break /metrics)
                    continue
            if not series:
                continue
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} gauge")
            lines.extend(series)
        return "\n".join(lines) + "\n"
