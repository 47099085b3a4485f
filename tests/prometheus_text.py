"""Reading a Prometheus text exposition in tests, with ``prometheus_client``'s
own parser: values are compared as numbers (``1.0``, ``3.145728e+06``), not
as text."""

from __future__ import annotations

import re
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families


def value(text: str, name: str, **labels: str) -> float:
    """The sum of the samples called ``name`` (as exposed:
    ``lpmos_x_total``, ``lpmos_y_seconds_count``) whose labels include
    ``labels``; 0 when there is none."""
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


def has_sample(text: str, name: str, **labels: str) -> bool:
    return any(s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
               for family in text_string_to_metric_families(text) for s in family.samples)


@dataclass(frozen=True)
class Family:
    name: str          # as exposed: lpmos_x_total for a counter
    kind: str
    help: str
    labels: frozenset[str]


def families(text: str) -> dict[str, Family]:
    """The families of an exposition by exposed name (the TYPE line's), with
    the label names their samples use (``le`` of histogram buckets left out)."""
    found: dict[str, Family] = {}
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", text, re.M))
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M))
    parsed = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in types.items():
        family = parsed.get(name.removesuffix("_total") if kind == "counter" else name)
        labels = {k for s in (family.samples if family else []) for k in s.labels} - {"le"}
        found[name] = Family(name, kind, helps.get(name, ""), frozenset(labels))
    return found


def series_names(text: str) -> set[str]:
    """Every name a PromQL query can use: counters (``_total``), gauges,
    histograms' ``_bucket``, ``_sum`` and ``_count``."""
    names = set()
    for family in families(text).values():
        if family.kind == "histogram":
            names.update(family.name + s for s in ("_bucket", "_sum", "_count"))
        else:
            names.add(family.name)
    return names
