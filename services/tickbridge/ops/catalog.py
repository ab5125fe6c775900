"""Every `tickbridge_*` series the roles define, read from their metrics classes (fresh registries).

Alert rules and dashboards are checked against this catalog, so a renamed metric fails a test
instead of silently emptying a panel or disarming an alert.
"""

from __future__ import annotations

import importlib
import re

from prometheus_client import CollectorRegistry

#: source of each metrics family: (module, class). `tiered` is the Brain's HOT/WARM/COLD read path.
METRICS_CLASSES: dict[str, tuple[str, str]] = {
    "collector": ("tickbridge.collector.metrics", "CollectorMetrics"),
    "forwarder": ("tickbridge.forwarder.metrics", "ForwarderMetrics"),
    "consumer": ("tickbridge.brain.consumer", "ConsumerMetrics"),
    "writer": ("tickbridge.brain.writer", "WriterMetrics"),
    "tiered": ("tickbridge.brain.tiered", "TieredMetrics"),
    "sim": ("tickbridge.sim.metrics", "SimMetrics"),
}

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}

_METRIC_REF = re.compile(r"\btickbridge_[a-z0-9_]+")


def series_names(registry: CollectorRegistry) -> set[str]:
    """Sample names a registry can expose, including labelled families that have no child yet."""
    names: set[str] = set()
    for family in registry.collect():
        for suffix in _SUFFIXES.get(family.type, ("",)):
            names.add(family.name + suffix)
    return names


def role_series() -> dict[str, set[str]]:
    """Series names per metrics source, from a fresh registry each."""
    result: dict[str, set[str]] = {}
    for source, (module, cls) in METRICS_CLASSES.items():
        registry = CollectorRegistry()
        getattr(importlib.import_module(module), cls)(registry)
        result[source] = series_names(registry)
    return result


def referenced_series(promql: str) -> set[str]:
    """`tickbridge_*` series an expression uses."""
    return set(_METRIC_REF.findall(promql))
