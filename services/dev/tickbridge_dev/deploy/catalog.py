"""Every `tickbridge_*` series the roles define, read from their metrics classes (fresh registries), and the
`redis_*` / `container_*` series the rules and dashboards take from the exporters.

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
    "books": ("tickbridge.brain.book_metrics", "BookMetrics"),  # the consumer's, issue 17
    "writer": ("tickbridge.brain.writer", "WriterMetrics"),
    "tiered": ("tickbridge.brain.tiered", "TieredMetrics"),
    "forwarder_live": ("tickbridge.forwarder.live_lane", "LiveLaneMetrics"),
    "fastforward": ("tickbridge.brain.fastforward", "FastForwardMetrics"),
    "sim": ("tickbridge_dev.sim.metrics", "SimMetrics"),
}

_SUFFIXES = {
    "counter": ("_total",),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("", "_sum", "_count"),
    "info": ("_info",),
}

#: What the rules and dashboards use from the exporters (issue 19). redis_exporter 1.45: the compose image's
#: version and Debian's `prometheus-redis-exporter`, which the native stack runs; tests/test_ops_exporters.py
#: checks each name against a live exporter. cAdvisor v0.49 (compose only, no native counterpart): names from
#: its metrics/prometheus.go with `--enable_metrics=cpu,memory`.
EXPORTER_SERIES: dict[str, set[str]] = {
    "redis_exporter": {
        "redis_up",
        "redis_memory_used_bytes",
        "redis_memory_max_bytes",
        "redis_memory_used_rss_bytes",
        "redis_aof_enabled",
        "redis_aof_delayed_fsync",
        "redis_aof_last_write_status",
        "redis_aof_last_bgrewrite_status",
        "redis_aof_rewrite_in_progress",
        "redis_rdb_bgsave_in_progress",
        "redis_commands_processed_total",
        "redis_connected_clients",
        "redis_blocked_clients",
        "redis_rejected_connections_total",
        "redis_stream_length",
        "redis_stream_last_generated_id",
        "redis_stream_groups",
        "redis_stream_group_last_delivered_id",
        "redis_stream_group_messages_pending",
    },
    "cadvisor": {
        "container_cpu_usage_seconds_total",
        "container_memory_working_set_bytes",
        "container_memory_rss",
        "container_spec_memory_limit_bytes",
    },
}

_METRIC_REF = re.compile(r"\b(?:tickbridge|redis|container)_[a-z0-9_]+")


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


def known_series() -> set[str]:
    """Every series a rule or panel may use: the roles' and the exporters' of `EXPORTER_SERIES`."""
    return set().union(*role_series().values(), *EXPORTER_SERIES.values())


def referenced_series(promql: str) -> set[str]:
    """`tickbridge_*`, `redis_*` and `container_*` series an expression uses."""
    return set(_METRIC_REF.findall(promql))
