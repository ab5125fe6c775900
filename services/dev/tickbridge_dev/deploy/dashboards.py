"""Grafana dashboards of the VPS and the Brain, generated from one compact description.

    python -m tickbridge_dev.deploy.dashboards        # rewrites grafana/dashboards/{vps,brain}/*.json

PromQL stays plain (fixed windows; the one template variable, `$symbol` of the latency rows, is a regex
matcher `symbol=~"$symbol"` whose All value is `.*`, expanded by `expand_variables`) so every panel can be
evaluated against a Prometheus scraping the native stack. Panels fed by node-exporter exist only on a real host:
they sit in their own row, select `job="node"`, and their description starts with `node-exporter:`
(`panel_queries` reports them with `node=True`, for a live-stack test to skip, and flags the queries
that stay empty in a healthy run with `may_be_empty=True`). Per-container panels (cAdvisor) likewise exist only
in compose: their row is marked `cadvisor=True`, they select `job="cadvisor"` and their description starts
with `cAdvisor (compose only):`; `panel_queries` reports both kinds with `compose_only=True`.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "tickbridge-prometheus"}
NODE_PREFIX = "node-exporter: "
CADVISOR_PREFIX = "cAdvisor (compose only): "
#: Description prefixes of the panels that only fill on a compose host (no counterpart in the native stack).
COMPOSE_ONLY_PREFIXES = (NODE_PREFIX, CADVISOR_PREFIX)
#: Host interfaces only: not loopback, container veths or Docker bridges.
_NIC = 'job="node",device!~"lo|veth.*|docker.*|br-.*|tb-.*"'
OUT_DIR = Path(__file__).resolve().parents[4] / "grafana" / "dashboards"


@dataclass(frozen=True)
class Panel:
    """One graph (or stat) with its queries as (PromQL, legend)."""

    title: str
    queries: tuple[tuple[str, str], ...]
    unit: str = "short"
    description: str = ""
    stat: bool = False


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]
    node: bool = False
    #: Fed by cAdvisor (per-container metrics): compose only, marked like node-exporter rows.
    cadvisor: bool = False


@dataclass(frozen=True)
class PanelQuery:
    """A panel's query as the live-stack test sees it.

    `node`: fed by node-exporter (compose only). `may_be_empty`: no series in a healthy native run (see
    `may_be_empty`), so a live test should only require such a query to be valid. `compose_only`: a node-exporter
    or cAdvisor panel (marked by its description prefix), which a live test of the native stack skips.
    """

    dashboard: str
    title: str
    expr: str
    node: bool
    may_be_empty: bool = False
    compose_only: bool = False


def may_be_empty(expr: str) -> bool:
    """Per-label event counts (a label's series appears with its first event: no errors, no series) and
    the tiered-read series (exported by the trading process using TieredMarketData, not by a role)."""
    return bool(re.match(r"sum by \([a-z_, ]+\) \(increase\(", expr)) or "tickbridge_tiered_" in expr


def _q(expr: str, legend: str = "") -> tuple[str, str]:
    return (expr, legend)


def _events(counter: str, window: str = "5m", selector: str = "") -> str:
    """Events of a counter over a window; 0 rather than "No data" before a labelled counter's first event."""
    sel = f"{{{selector}}}" if selector else ""
    return f"sum(increase({counter}{sel}[{window}])) or vector(0)"


def _quantiles(metric: str, by: str = "", window: str = "1m") -> tuple[tuple[str, str], ...]:
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return tuple(
        _q(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{window}])))", f"p{int(q * 100)}{suffix}")
        for q in (0.5, 0.99)
    )


def _process_row(jobs: str) -> Row:
    sel = f'job=~"{jobs}"'
    return Row(
        "Processes",
        (
            Panel(
                "Resident memory", (_q(f"max by (job) (process_resident_memory_bytes{{{sel}}})", "{{job}}"),), "bytes"
            ),
            Panel(
                "CPU", (_q(f"sum by (job) (rate(process_cpu_seconds_total{{{sel}}}[1m]))", "{{job}}"),), "percentunit"
            ),
            Panel("Open file descriptors", (_q(f"max by (job) (process_open_fds{{{sel}}})", "{{job}}"),)),
        ),
    )


def _questdb_row(job: str, title: str) -> Row:
    sel = f'job="{job}"'
    return Row(
        title,
        (
            Panel(
                "Rows committed / applied per second",
                (
                    _q(f"sum(rate(questdb_committed_rows_total{{{sel}}}[1m]))", "committed"),
                    _q(f"sum(rate(questdb_wal_apply_written_rows_total{{{sel}}}[1m]))", "WAL applied"),
                ),
                "ops",
            ),
            Panel(
                "Memory",
                (
                    _q(f"max(questdb_memory_rss{{{sel}}})", "RSS"),
                    _q(f"max(questdb_memory_mem_used{{{sel}}})", "native used"),
                    _q(f"max(questdb_memory_jvm_total{{{sel}}})", "JVM heap"),
                ),
                "bytes",
            ),
            Panel(
                "Suspended tables and errors",
                (
                    _q(f"max(questdb_suspended_tables{{{sel}}})", "suspended tables"),
                    _q(_events("questdb_unhandled_errors_total", "5m", sel), "unhandled errors / 5m"),
                    _q(
                        f"sum(questdb_wal_apply_seq_txn{{{sel}}}) - sum(questdb_wal_apply_writer_txn{{{sel}}})",
                        "WAL txns not applied",
                    ),
                ),
                description="A suspended table accepts writes but applies none (docs/monitoring.md).",
            ),
        ),
    )


_MEMORY_ALERTS = {"vps": "VPSRedisMemoryCritical at 90 %", "brain": "BrainRedisMemoryHigh at 80 %, critical at 90 %"}


def _redis_row(host: str, title: str) -> Row:
    """Redis as redis_exporter sees it (job `redis-<host>`, user `monitor`): memory against maxmemory, AOF,
    ops/s, clients and the relay's stream. Fills in the native stack too (devstack runs the same exporter)."""
    sel = f'job="redis-{host}"'
    stream = sel  # the exporter checks one stream: STREAM_KEY (market:vps:stream)
    stream_panels: tuple[tuple[str, str], ...] = (
        _q(f"max(redis_stream_length{{{stream}}})", "entries"),
        _q(f"max(redis_stream_groups{{{stream}}})", "consumer groups"),
    )
    age = _q(f"time() - max(redis_stream_last_generated_id{{{stream}}}) / 1000", "newest entry age")
    panels = [
        Panel(
            "Redis memory against maxmemory",
            (
                _q(f"max(redis_memory_used_bytes{{{sel}}})", "used"),
                _q(f"max(redis_memory_max_bytes{{{sel}}})", "maxmemory"),
                _q(f"max(redis_memory_used_rss_bytes{{{sel}}})", "RSS"),
            ),
            "bytes",
            f"noeviction: at maxmemory Redis refuses every write and the pipeline stops ({_MEMORY_ALERTS[host]}).",
        ),
        Panel(
            "AOF and persistence",
            (
                _q(f"max(redis_aof_last_write_status{{{sel}}})", "last AOF write ok"),
                _q(f"max(redis_aof_last_bgrewrite_status{{{sel}}})", "last AOF rewrite ok"),
                _q(f"max(redis_aof_rewrite_in_progress{{{sel}}})", "AOF rewrite running"),
                _q(f"max(redis_rdb_bgsave_in_progress{{{sel}}})", "RDB save running"),
                _q(f"sum(increase(redis_aof_delayed_fsync{{{sel}}}[5m]))", "delayed fsyncs / 5m"),
            ),
            description="Status 1 = ok. A delayed fsync is an everysec fsync still running after 2 s (the disk is "
            "behind; Redis blocks writes meanwhile).",
        ),
        Panel(
            "Redis commands per second",
            (_q(f"sum(rate(redis_commands_processed_total{{{sel}}}[1m]))", "ops/s"),),
            "ops",
        ),
        Panel(
            "Redis clients",
            (
                _q(f"max(redis_connected_clients{{{sel}}})", "connected"),
                _q(f"max(redis_blocked_clients{{{sel}}})", "blocked (XREAD/XREADGROUP BLOCK)"),
                _q(f"sum(increase(redis_rejected_connections_total{{{sel}}}[5m]))", "rejected / 5m"),
            ),
        ),
        Panel(
            "Stream (Redis)",
            stream_panels,
            description="XINFO STREAM of market:vps:stream as the exporter reads it (-check-single-streams).",
        ),
    ]
    if host == "vps":
        panels.append(
            Panel(
                "Stream top",
                (age,),
                "s",
                "Now minus the time of the newest entry's ID (the collector's receive time): how long since the "
                "collector last appended.",
            )
        )
    else:
        group_lag = (
            f"max by (group) (redis_stream_last_generated_id{{{stream}}} - on (db, stream) group_right "
            f"redis_stream_group_last_delivered_id{{{stream}}}) / 1000"
        )
        panels.append(
            Panel(
                "Stream top and consumer groups",
                (
                    age,
                    _q(group_lag, "{{group}}: behind the top"),
                    _q(f"max by (group) (redis_stream_group_messages_pending{{{stream}}})", "{{group}}: pending"),
                ),
                description="Newest entry age (s, by ID time: the VPS stream's replica here), how far each consumer "
                "group's last delivered ID is behind the top (s of ID time), and its pending entries.",
            )
        )
    return Row(title, tuple(panels))


def _containers_row() -> Row:
    """Per-container CPU and memory against `mem_limit` (cAdvisor, compose only)."""
    sel = 'job="cadvisor",name!=""'
    limit = f"container_spec_memory_limit_bytes{{{sel}}}"
    return Row(
        "Containers (cAdvisor)",
        (
            Panel(
                "Container CPU",
                (_q(f"sum by (name) (rate(container_cpu_usage_seconds_total{{{sel}}}[1m]))", "{{name}}"),),
                "percentunit",
                "Cores used per container (1 = a whole core; compare with its cpuset).",
            ),
            Panel(
                "Container memory",
                (
                    _q(f"max by (name) (container_memory_working_set_bytes{{{sel}}})", "{{name}}"),
                    _q(f"max by (name) (container_spec_memory_limit_bytes{{{sel}}} > 0)", "{{name}} mem_limit"),
                ),
                "bytes",
                "Working set (what the kernel cannot drop easily) against each container's mem_limit.",
            ),
            Panel(
                "Container memory against mem_limit",
                (_q(f"max by (name) (container_memory_rss{{{sel}}} / ({limit} > 0))", "{{name}}"),),
                "percentunit",
                "Anonymous memory (RSS) over mem_limit: at 1 the OOM killer acts (page cache is reclaimed first). "
                "ContainerMemoryNearLimit at 90 %.",
            ),
        ),
        cadvisor=True,
    )


# ---- per-hop latency (issue 19): every tick, per symbol, in seconds; `$symbol` filters ---------------------

#: The dashboards' symbol filter: a regex matcher, All = `.*` (Grafana joins a multi-selection as `(A|B)`).
SYMBOL_MATCH = 'symbol=~"$symbol"'
#: Template variables by name and the value a test substitutes (Grafana's All value).
VARIABLE_ALL = {"symbol": ".*", "exchange": ".*"}
#: Issue 18: each exchange's collector, forwarder and consumer carry an `exchange` target label (Prometheus
#: scrape configs); every query of their series filters on `$exchange` (All = `.*`, which also matches a
#: series without the label).
EXCHANGE_MATCH = 'exchange=~"$exchange"'
_ROLE_SERIES = re.compile(r"\b(tickbridge_(?:collector|forwarder|consumer)_[a-z0-9_]+)(\{)?")


def with_exchange(expr: str) -> str:
    """`expr` with the `$exchange` matcher on every collector, forwarder and consumer series."""
    return _ROLE_SERIES.sub(lambda m: f"{m.group(1)}{{{EXCHANGE_MATCH}" + ("," if m.group(2) else "}"), expr)


def query_variable(name: str, series: str) -> dict[str, Any]:
    """`$<name>`: the values of label `name` that `series` has, multi-select with All (`VARIABLE_ALL[name]`)."""
    query = f"label_values({series}, {name})"
    return {
        "name": name, "label": name, "type": "query", "datasource": DATASOURCE,
        "query": {"query": query, "refId": name}, "definition": query, "refresh": 2, "sort": 1, "regex": "",
        "multi": True, "includeAll": True, "allValue": VARIABLE_ALL[name], "hide": 0, "options": [],
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
    }  # fmt: skip


def symbol_variable(series: str) -> dict[str, Any]:
    """`$symbol`: the symbols `series` has (the configured SYMBOLS)."""
    return query_variable("symbol", series)


def exchange_variable(series: str) -> dict[str, Any]:
    """`$exchange`: the exchanges `series` has (binance_spot, coinbase, kraken; issue 18)."""
    return query_variable("exchange", series)


def expand_variables(expr: str, values: dict[str, str] = VARIABLE_ALL) -> str:
    """`expr` with each `$name` / `${name}` replaced by `values[name]` (the All value by default)."""
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), expr)


def _hop_quantiles(metric: str, by_symbol: bool = True) -> tuple[tuple[str, str], ...]:
    by = "le, symbol" if by_symbol else "le"
    legend = " {{symbol}}" if by_symbol else ""
    return tuple(
        _q(f"histogram_quantile({q}, sum by ({by}) (rate({metric}_bucket{{{SYMBOL_MATCH}}}[1m])))",
           f"p{int(q * 100)}{legend}")
        for q in (0.5, 0.99)
    )  # fmt: skip


def _hop_p99(metric: str, hop: str) -> tuple[str, str]:
    return _q(f"histogram_quantile(0.99, sum by (le) (rate({metric}_bucket{{{SYMBOL_MATCH}}}[1m])))", f"p99 {hop}")


_CLOCKS = "Two hosts' clocks (NTP assumed): a negative latency counts as 0."
#: (metric, hop legend, panel title, description) of each hop, in pipeline order.
HOPS_VPS = (
    ("tickbridge_collector_latency_seconds", "exchange → collector", "Exchange → collector receive",
     "Binance event time to the collector's receive time (recv_ts), every live tick. " + _CLOCKS
     + " Binance times are whole milliseconds: up to 1 ms too high."),
    ("tickbridge_collector_vps_stream_latency_seconds", "→ VPS stream", "Receive → VPS stream",
     "recv_ts to the VPS Redis confirming the append (the collector's batching and its Redis round trip)."),
    ("tickbridge_forwarder_brain_stream_latency_seconds", "→ Brain stream", "Receive → Brain stream",
     "recv_ts to the Brain Redis confirming the forwarder's XADD (VPS clock at both ends). Replayed ticks count "
     "with their age."),
)  # fmt: skip
HOPS_BRAIN = (
    ("tickbridge_consumer_symbol_stream_latency_seconds", "→ per-symbol stream", "Receive → per-symbol stream",
     "Collector receive (recv_ts, VPS clock) to the consumer's ingest call returning on the Brain: what trading "
     "code reading market:binance_spot:trades:<SYMBOL> sees. " + _CLOCKS + " BrainLatencyHigh fires at p99 > 1 s."),
    ("tickbridge_writer_questdb_latency_seconds", "→ QuestDB", "Receive → QuestDB",
     "Collector receive (recv_ts) to QuestDB confirming the writer's ILP transaction (WAL apply follows). " + _CLOCKS),
)  # fmt: skip


def _latency_row(hops: tuple[tuple[str, str, str, str], ...]) -> Row:
    overview = Panel(
        "p99 per hop",
        tuple(_hop_p99(metric, hop) for metric, hop, _, _ in hops),
        "s",
        "p99 over the selected symbols, each hop from the collector's receive time (cumulative); 1-minute rate.",
    )
    per_symbol = tuple(
        Panel(f"{title} (p50 / p99)", _hop_quantiles(metric), "s", doc) for metric, _, title, doc in hops
    )
    return Row("Latency per hop ($symbol)", (overview, *per_symbol))


VPS: tuple[Row, ...] = (
    Row(
        "Exchange and collector",
        (
            Panel(
                "Exchange connection",
                (
                    _q("max(tickbridge_collector_connection_up)", "connected"),
                    _q("max(tickbridge_collector_connections_open)", "open sockets"),
                ),
                stat=True,
                description="1 while a WebSocket is the primary; 2 sockets open during a make-before-break reconnect.",
            ),
            Panel(
                "Ingest rate", (_q("sum by (type) (rate(tickbridge_collector_ticks_total[1m]))", "{{type}}"),), "ops"
            ),
            Panel(
                "Ingest per symbol",
                (_q("sum by (symbol) (rate(tickbridge_collector_ticks_total[1m]))", "{{symbol}}"),),
                "ops",
            ),
            Panel(
                "Exchange to collector latency",
                _quantiles("tickbridge_collector_latency_seconds", "type"),
                "s",
                "Binance event time to collector receive time (includes clock offset).",
            ),
            Panel(
                "Reconnects",
                (
                    _q("sum by (reason) (increase(tickbridge_collector_reconnects_total[5m]))", "{{reason}}"),
                    _q(_events("tickbridge_collector_connect_failures_total", "5m"), "failed attempts"),
                ),
                description="Per 5 minutes.",
            ),
            Panel(
                "Exchange REST requests",
                (
                    _q(
                        "sum by (status) (increase(tickbridge_collector_rest_requests_total[5m]))",
                        "HTTP {{status}}",
                    ),
                ),
                description="Per 5 minutes: depth snapshots and trade back-fill; 429/418 are rate limits and bans.",
            ),
            Panel(
                "Order books",
                (
                    _q("sum(tickbridge_collector_book_valid)", "valid books"),
                    _q("count(tickbridge_collector_book_valid)", "books"),
                    _q(_events("tickbridge_collector_resyncs_total", "5m"), "resyncs / 5m"),
                ),
            ),
            Panel(
                "Gaps, back-fill and loss",
                (
                    _q(_events("tickbridge_collector_trade_gaps_total", "5m"), "trade gaps"),
                    _q(_events("tickbridge_collector_depth_gaps_total", "5m"), "depth gaps"),
                    _q(_events("tickbridge_collector_backfilled_trades_total", "5m"), "back-filled trades"),
                    _q(_events("tickbridge_collector_lost_trades_total", "5m"), "lost trades"),
                ),
                description="Per 5 minutes. Lost trades are gaps REST could not fill.",
            ),
            Panel(
                "Collector errors",
                (
                    _q(
                        "sum by (reason) (increase(tickbridge_collector_dead_letters_total[5m]))",
                        "dead letter: {{reason}}",
                    ),
                    _q(_events("tickbridge_collector_redis_errors_total", "5m"), "Redis write errors"),
                    _q("sum by (queue) (increase(tickbridge_collector_queue_full_total[5m]))", "queue full: {{queue}}"),
                    _q(_events("tickbridge_collector_duplicates_total", "5m"), "duplicates dropped"),
                ),
                description="Per 5 minutes.",
            ),
            Panel(
                "Ticks per Redis transaction",
                _quantiles("tickbridge_collector_batch_ticks"),
                description="Batching of stream writes (higher under load).",
            ),
        ),
    ),
    Row(
        "Stream and forwarder",
        (
            Panel(
                "Forwarder mode",
                (_q("max by (mode) (tickbridge_forwarder_mode)", "{{mode}}"),),
                description="direct, ram_backlog (Brain slow or away, Redis holds it), disk_spill, replay.",
            ),
            Panel(
                "Links",
                (_q("max by (target) (tickbridge_forwarder_connected)", "{{target}}"),),
                description="1 while the forwarder reaches the Brain Redis, the VPS Redis, the VPS QuestDB.",
            ),
            Panel(
                "Forward rate",
                (
                    _q("sum(rate(tickbridge_forwarder_sent_total[1m]))", "sent to Brain"),
                    _q("sum(rate(tickbridge_forwarder_replayed_total[1m]))", "replayed from buffer"),
                    _q("sum(rate(tickbridge_forwarder_already_delivered_total[1m]))", "already on Brain"),
                    _q("sum(tickbridge_forwarder_send_rate)", "delivered (forwarder)"),
                ),
                "ops",
            ),
            Panel(
                "Stream depth",
                (_q("sum(tickbridge_forwarder_backlog_entries)", "undelivered entries"),),
                description="Entries not yet confirmed by the Brain (Redis and buffer).",
            ),
            Panel(
                "Stream memory",
                (
                    _q("sum(tickbridge_forwarder_redis_stream_bytes)", "VPS stream"),
                    _q("sum(tickbridge_forwarder_ram_budget_bytes)", "budget (RAM_BUFFER_BYTES)"),
                ),
                "bytes",
                "MEMORY USAGE of the VPS stream; spilling starts at RAM_BUFFER_BYTES.",
            ),
            Panel(
                "Stream lag",
                (
                    _q("max(tickbridge_forwarder_backlog_oldest_age_seconds)", "oldest undelivered"),
                    _q("max(tickbridge_forwarder_replay_eta_seconds)", "replay ETA"),
                ),
                "s",
            ),
            Panel(
                "Live lane (fast-forward)",
                (
                    _q("max(tickbridge_forwarder_live_lag_seconds)", "age of the newest entry it sent"),
                    _q("max(tickbridge_forwarder_live_brain_behind_seconds)", "Brain stream top behind the VPS"),
                    _q("max(tickbridge_forwarder_live_active)", "on (1)"),
                ),
                "s",
                "Issue 16: the forwarder-live process copies the newest entries to the Brain's live stream while the "
                "Brain stream's top is 1 s or more behind the VPS (a replay, or the forwarder down); it runs beside "
                "the replaying forwarder, so a kill -9 of either leaves the other going.",
            ),
            Panel(
                "Brain round trip", _quantiles("tickbridge_forwarder_batch_seconds"), "s", "XADD batch to the Brain."
            ),
            Panel(
                "Retries per minute",
                (_q("sum by (target) (increase(tickbridge_forwarder_retries_total[1m]))", "{{target}}"),),
            ),
            Panel(
                "Errors per minute",
                (
                    _q("sum by (target) (increase(tickbridge_forwarder_errors_total[1m]))", "{{target}}"),
                    _q(_events("tickbridge_forwarder_rewinds_total", "1m"), "rewinds"),
                ),
            ),
        ),
    ),
    Row(
        "QuestDB spill buffer",
        (
            Panel(
                "Buffer rows",
                (
                    _q("sum(tickbridge_forwarder_buffer_rows)", "rows"),
                    _q("sum(tickbridge_forwarder_buffer_undelivered_rows)", "undelivered"),
                ),
            ),
            Panel(
                "Buffer size",
                (
                    _q("sum(tickbridge_forwarder_buffer_bytes)", "on disk"),
                    _q("sum(tickbridge_forwarder_disk_budget_bytes)", "budget (DISK_BUFFER_BYTES)"),
                ),
                "bytes",
                "Alert at 80 % of the budget.",
            ),
            Panel("Buffer span", (_q("max(tickbridge_forwarder_buffer_hours)", "hours held"),), "h"),
            Panel(
                "Spill and replay",
                (
                    _q("sum(rate(tickbridge_forwarder_spilled_total[1m]))", "spilled"),
                    _q("sum(rate(tickbridge_forwarder_replayed_total[1m]))", "replayed"),
                ),
                "ops",
            ),
            Panel(
                "Dropped ticks",
                (
                    _q(_events("tickbridge_forwarder_dropped_total", "5m"), "dropped / 5m"),
                    _q(_events("tickbridge_forwarder_buffer_missing_total", "5m"), "missing / 5m"),
                    _q(_events("tickbridge_forwarder_buffer_quarantined_total", "5m"), "quarantined / 5m"),
                ),
                description="Undelivered ticks deleted past DISK_BUFFER_BYTES; spilled ticks that did not come back "
                "from the buffer (missing); corrupt or foreign buffer rows set aside (quarantined). All data loss.",
            ),
        ),
    ),
    _latency_row(HOPS_VPS),
    _questdb_row("questdb-vps", "QuestDB (VPS)"),
    _redis_row("vps", "Redis (VPS)"),
    _process_row("collector|forwarder"),
    _containers_row(),
    Row(
        "Host (node-exporter)",
        (
            Panel(
                "CPU per core",
                (_q('1 - avg by (cpu) (rate(node_cpu_seconds_total{job="node",mode="idle"}[1m]))', "core {{cpu}}"),),
                "percentunit",
                "Core 0: collector and Redis; core 1: forwarder and QuestDB.",
            ),
            Panel(
                "Memory",
                (
                    _q('node_memory_MemTotal_bytes{job="node"} - node_memory_MemAvailable_bytes{job="node"}', "used"),
                    _q('node_memory_MemTotal_bytes{job="node"}', "total"),
                ),
                "bytes",
            ),
            Panel(
                "Disk space used",
                (
                    _q(
                        '1 - node_filesystem_avail_bytes{job="node",mountpoint="/"}'
                        ' / node_filesystem_size_bytes{job="node",mountpoint="/"}',
                        "/",
                    ),
                ),
                "percentunit",
            ),
            Panel(
                "Disk I/O",
                (
                    _q('sum by (device) (rate(node_disk_written_bytes_total{job="node"}[1m]))', "write {{device}}"),
                    _q('sum by (device) (rate(node_disk_read_bytes_total{job="node"}[1m]))', "read {{device}}"),
                ),
                "Bps",
            ),
            Panel(
                "Network",
                (
                    _q(
                        f"sum by (device) (rate(node_network_receive_bytes_total{{{_NIC}}}[1m]))",
                        "in {{device}}",
                    ),
                    _q(
                        f"sum by (device) (rate(node_network_transmit_bytes_total{{{_NIC}}}[1m]))",
                        "out {{device}}",
                    ),
                ),
                "Bps",
            ),
            Panel("Load", (_q('node_load1{job="node"}', "1 min"), _q('node_load5{job="node"}', "5 min"))),
        ),
        node=True,
    ),
)

BRAIN: tuple[Row, ...] = (
    _latency_row(HOPS_BRAIN),
    Row(
        "VPS link and consumer",
        (
            Panel(
                "VPS link",
                (_q("max(tickbridge_consumer_vps_link_up)", "ticks arriving"),),
                stat=True,
                description="0 once staleness passes its threshold; the VPSDisconnected alert fires after 5 minutes.",
            ),
            Panel(
                "Data staleness",
                (_q("max(tickbridge_consumer_data_staleness_seconds)", "newest tick age"),),
                "s",
                "Now minus the exchange time of the newest tick in the Brain stream.",
            ),
            Panel(
                "Order books",
                (
                    _q("sum(max by (symbol) (tickbridge_consumer_book_valid))", "valid"),
                    _q(
                        "count(max by (symbol) (tickbridge_consumer_book_valid))"
                        " - sum(max by (symbol) (tickbridge_consumer_book_valid))",
                        "not valid",
                    ),
                    _q("max(tickbridge_consumer_book_invalid_seconds)", "longest not valid (s)"),
                    _q("max(tickbridge_consumer_book_age_seconds)", "oldest book update (s)"),
                ),
                description="The Brain's order books (issue 17): how many trading code gets as valid, how long the "
                "worst one has not been (BrainBookInvalid fires past 30 s for 30 s), and the age of the stalest.",
            ),
            Panel(
                "Consumer lag",
                (
                    _q("max(tickbridge_consumer_lag_entries)", "undelivered to the group"),
                    _q("max(tickbridge_consumer_pending_entries)", "pending (not acked)"),
                ),
            ),
            Panel(
                "Catch-up backlog (fast-forward)",
                (
                    _q("max(tickbridge_catchup_backlog_entries)", "backlog (VPS + Brain lag)"),
                    _q("max(tickbridge_catchup_rate)", "catch-up rate /s"),
                ),
                description="Issue 16: entries not yet on the ordered path while a backlog replays; live ticks reach "
                "HOT/WARM meanwhile. Alert CatchUpStalled when it stops shrinking for 5 minutes.",
            ),
            Panel(
                "Catch-up ETA and live view age",
                (
                    _q("max(tickbridge_catchup_eta_seconds)", "ETA"),
                    _q("max(tickbridge_consumer_fastforward_live_age_seconds)", "newest live trade written to WARM"),
                ),
                "s",
                "ETA -1: unknown. The live age is the age of the newest trade the fast-forward follower wrote.",
            ),
            Panel(
                "Lag age",
                (
                    _q("max(tickbridge_consumer_lag_seconds)", "oldest unhandled"),
                    _q("max(tickbridge_consumer_oldest_pending_age_seconds)", "oldest pending"),
                ),
                "s",
            ),
            Panel(
                "Consumer throughput",
                (
                    _q("sum(tickbridge_consumer_throughput_ticks_per_second)", "handled (consumer)"),
                    _q("sum by (outcome) (rate(tickbridge_consumer_entries_total[1m]))", "{{outcome}}"),
                ),
                "ops",
            ),
            Panel("Consumer batch time", _quantiles("tickbridge_consumer_batch_seconds"), "s"),
            Panel(
                "Consumer errors and re-deliveries",
                (
                    _q("sum by (kind) (increase(tickbridge_consumer_errors_total[5m]))", "error: {{kind}}"),
                    _q(_events("tickbridge_consumer_claimed_total", "5m"), "claimed / re-delivered"),
                    _q(_events("tickbridge_consumer_dead_letters_total", "5m"), "dead-lettered"),
                    _q(_events("tickbridge_consumer_dead_letters_truncated_total", "5m"), "dead letters truncated"),
                    _q(_events("tickbridge_consumer_dead_letters_evicted_total", "5m"), "dead letters evicted"),
                    _q("max(tickbridge_consumer_dead_letter_entries)", "dead-letter stream length"),
                ),
                description="Per 5 minutes.",
            ),
            Panel(
                "Brain Redis memory",
                (
                    _q("max(tickbridge_consumer_brain_redis_used_memory_bytes)", "used"),
                    _q("max(tickbridge_consumer_brain_redis_maxmemory_bytes)", "maxmemory"),
                ),
                "bytes",
                "INFO memory, read by the consumer. BrainRedisMemoryHigh at 80 % of maxmemory, critical at 90 %: at "
                "maxmemory (noeviction) Redis refuses every write and the pipeline stops.",
            ),
        ),
    ),
    Row(
        "Writer",
        (
            Panel("Rows written", (_q("sum by (table) (rate(tickbridge_writer_rows_total[1m]))", "{{table}}"),), "ops"),
            Panel(
                "Write latency", _quantiles("tickbridge_writer_write_seconds", "table"), "s", "ILP flush to QuestDB."
            ),
            Panel(
                "Writer backlog",
                (
                    _q("max(tickbridge_writer_backlog_entries)", "in per-symbol streams"),
                    _q("max(tickbridge_writer_buffered_rows)", "buffered in memory"),
                ),
            ),
            Panel(
                "Last flush age",
                (_q("time() - max(tickbridge_writer_last_flush_timestamp_seconds)", "since last flush"),),
                "s",
            ),
            Panel("Rows per flush", _quantiles("tickbridge_writer_batch_rows")),
            Panel(
                "Writer errors",
                (
                    _q("sum by (kind) (increase(tickbridge_writer_errors_total[5m]))", "{{kind}}"),
                    _q(_events("tickbridge_writer_dead_letters_total", "5m"), "dead-lettered"),
                    _q("max(tickbridge_writer_suspended_tables)", "suspended tables"),
                ),
                description="Per 5 minutes; a suspended table needs RESUME WAL (docs/monitoring.md).",
            ),
        ),
    ),
    Row(
        "Tiered reads (HOT / WARM / COLD)",
        (
            Panel(
                "Tier latency",
                _quantiles("tickbridge_tiered_latency_seconds", "tier", "5m"),
                "s",
                "Read latency per tier of the process using TieredMarketData (scraped when it exposes /metrics).",
            ),
            Panel(
                "Answers by tier",
                (_q("sum by (tier) (rate(tickbridge_tiered_answers_total[5m]))", "{{tier}}"),),
                "ops",
            ),
        ),
    ),
    _questdb_row("questdb-brain", "QuestDB (Brain)"),
    _redis_row("brain", "Redis (Brain)"),
    _process_row("consumer|writer"),
    _containers_row(),
)

DASHBOARDS: dict[str, tuple[str, tuple[Row, ...]]] = {
    "vps": ("tickbridge VPS", VPS),
    "brain": ("tickbridge Brain", BRAIN),
}
#: Template variables per host dashboard.
VARIABLES: dict[str, tuple[dict[str, Any], ...]] = {
    "vps": (exchange_variable("tickbridge_collector_connection_up"),
            symbol_variable("tickbridge_collector_vps_stream_latency_seconds_count")),
    "brain": (exchange_variable("tickbridge_consumer_batch_entries_count"),
              symbol_variable("tickbridge_consumer_symbol_stream_latency_seconds_count")),
}  # fmt: skip


def _prefix(row: Row) -> str:
    return NODE_PREFIX if row.node else CADVISOR_PREFIX if row.cadvisor else ""


def _panel_json(panel: Panel, pid: int, x: int, y: int, prefix: str) -> dict[str, Any]:
    description = prefix + panel.description
    targets = [
        {"refId": chr(ord("A") + i), "datasource": DATASOURCE, "expr": with_exchange(expr), "legendFormat": legend}
        for i, (expr, legend) in enumerate(panel.queries)
    ]
    body: dict[str, Any] = {
        "id": pid,
        "type": "stat" if panel.stat else "timeseries",
        "title": panel.title,
        "description": description.strip(),
        "datasource": DATASOURCE,
        "gridPos": {"h": 8, "w": 8, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": targets,
    }
    if panel.stat:
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                           "colorMode": "background", "graphMode": "none", "textMode": "value_and_name"}  # fmt: skip
    else:
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    return body


def build(host: str) -> dict[str, Any]:
    """The dashboard JSON for `host` ("vps" or "brain")."""
    title, rows = DASHBOARDS[host]
    panels: list[dict[str, Any]] = []
    pid, y = 1, 0
    for row in rows:
        panels.append({"id": pid, "type": "row", "title": row.title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}})  # fmt: skip
        pid, y = pid + 1, y + 1
        for i, panel in enumerate(row.panels):
            panels.append(_panel_json(panel, pid, (i % 3) * 8, y + (i // 3) * 8, _prefix(row)))
            pid += 1
        y += ((len(row.panels) + 2) // 3) * 8
    return {
        "uid": f"tickbridge-{host}",
        "title": title,
        "tags": ["tickbridge", host],
        "timezone": "utc",
        "schemaVersion": 39,
        "version": 1,
        "editable": False,
        "graphTooltip": 1,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": list(VARIABLES.get(host, ()))},
        "annotations": {"list": []},
        "panels": panels,
    }


def render(host: str) -> str:
    return json.dumps(build(host), indent=2) + "\n"


def path_for(host: str, root: Path = OUT_DIR) -> Path:
    return root / host / f"tickbridge-{host}.json"


def panel_queries(dashboard: dict[str, Any]) -> list[PanelQuery]:
    """Every (panel, PromQL) of a dashboard JSON, template variables at their All value; `node` marks
    node-exporter panels, `compose_only` those and the cAdvisor ones."""
    result = []
    for panel in dashboard["panels"]:
        node = panel.get("description", "").startswith(NODE_PREFIX.strip())
        compose_only = is_compose_only(panel)
        for target in panel.get("targets", []):
            if "expr" not in target:
                continue  # an SQL target (the market dashboard): see `sql_queries`
            expr = expand_variables(target["expr"])
            result.append(PanelQuery(dashboard["uid"], panel["title"], expr, node, may_be_empty(expr), compose_only))
    return result


def is_compose_only(panel: dict[str, Any]) -> bool:
    """A panel of the JSON marked compose-only (node-exporter or cAdvisor): no data in the native stack."""
    description = str(panel.get("description", ""))
    return any(description.startswith(prefix.strip()) for prefix in COMPOSE_ONLY_PREFIXES)


# ---- market data from the Brain QuestDB (issue 19): SQL over PG wire, Grafana's built-in PostgreSQL source ------

#: grafana/provisioning/datasources-brain/questdb.yml (the Brain only: the read-only PG-wire login).
QUESTDB_DATASOURCE = {"type": "grafana-postgresql-datasource", "uid": "tickbridge-questdb"}
MARKET_UID = "tickbridge-market"


@dataclass(frozen=True)
class SqlPanel:
    """A panel fed by one SQL query on the Brain QuestDB, with Grafana's macros (`$__timeFilter(timestamp)`,
    `${__interval_ms}`); `fmt` is the query's format: `time_series` (columns time, metric, values) or `table`."""

    title: str
    sql: str
    kind: str = "timeseries"
    fmt: str = "time_series"
    unit: str = "short"
    description: str = ""
    width: int = 12


MARKET: tuple[SqlPanel, ...] = (
    SqlPanel(
        "Last price",
        "SELECT symbol, price FROM trades WHERE $__timeFilter(timestamp) LATEST ON timestamp PARTITION BY symbol "
        "ORDER BY symbol",
        kind="stat", fmt="table", width=24,
        description="Price of each symbol's newest trade in QuestDB within the dashboard's time range.",
    ),
    SqlPanel(
        "Trades per second",
        "SELECT timestamp AS time, symbol AS metric, count() * 1000.0 / ${__interval_ms} AS trades_per_s "
        "FROM trades WHERE $__timeFilter(timestamp) SAMPLE BY ${__interval_ms}T ALIGN TO CALENDAR ORDER BY time",
        unit="ops",
        description="Trades per second and symbol in Brain QuestDB, by exchange time (one point per Grafana "
        "interval; an interval without trades has no point).",
    ),
    SqlPanel(
        "Missing trade IDs",
        "SELECT symbol, count() AS trades, min(trade_id) AS first_id, max(trade_id) AS last_id, "
        "max(trade_id) - min(trade_id) + 1 - count() AS missing FROM trades WHERE $__timeFilter(timestamp) "
        "GROUP BY symbol ORDER BY symbol",
        kind="table", fmt="table",
        description="Per symbol over the dashboard's range: trade IDs between the first and the last that are not "
        "in QuestDB (0 = complete; DEDUP keeps each trade once). A trade-ID sequence reset (TradeIdsStartedOver) "
        "shows as a large number: narrow the range to either side of it.",
    ),
)  # fmt: skip


def _sql_panel_json(panel: SqlPanel, pid: int, x: int, y: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": pid,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": QUESTDB_DATASOURCE,
        "gridPos": {"h": 8, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": {"unit": panel.unit}, "overrides": []},
        "targets": [{"refId": "A", "datasource": QUESTDB_DATASOURCE, "editorMode": "code", "format": panel.fmt,
                     "rawQuery": True, "rawSql": panel.sql}],
    }  # fmt: skip
    if panel.kind == "stat":
        body["options"] = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": True},
                           "colorMode": "none", "graphMode": "none", "textMode": "value_and_name"}  # fmt: skip
    elif panel.kind == "timeseries":
        body["options"] = {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                           "tooltip": {"mode": "multi", "sort": "desc"}}  # fmt: skip
    return body


def build_market() -> dict[str, Any]:
    """The Brain's market dashboard: what QuestDB holds, over PG wire as the read-only user."""
    panels: list[dict[str, Any]] = []
    x = y = 0
    for pid, panel in enumerate(MARKET, start=1):
        if x + panel.width > 24:
            x, y = 0, y + 8
        panels.append(_sql_panel_json(panel, pid, x, y))
        x += panel.width
    return {
        "uid": MARKET_UID, "title": "tickbridge market", "tags": ["tickbridge", "brain", "market"],
        "timezone": "utc", "schemaVersion": 39, "version": 1, "editable": False, "graphTooltip": 1,
        "refresh": "10s", "time": {"from": "now-1h", "to": "now"}, "templating": {"list": []},
        "annotations": {"list": []}, "panels": panels,
    }  # fmt: skip


def market_path(root: Path = OUT_DIR) -> Path:
    return root / "brain" / "tickbridge-market.json"


def render_market() -> str:
    return json.dumps(build_market(), indent=2) + "\n"


def sql_queries(dashboard: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(panel title, format, SQL with Grafana's macros) of every SQL target of a dashboard JSON."""
    return [
        (panel["title"], target["format"], target["rawSql"])
        for panel in dashboard["panels"]
        for target in panel.get("targets", [])
        if "rawSql" in target
    ]


def expand_sql_macros(sql: str, start: datetime, end: datetime, interval_ms: int) -> str:
    """SQL as Grafana's PostgreSQL data source sends it: `$__timeFilter(col)` -> `col BETWEEN '<from>' AND
    '<to>'` (RFC 3339, UTC), `$__timeFrom()` / `$__timeTo()` -> the quoted bounds, `${__interval_ms}` /
    `$__interval_ms` -> the interval in ms."""

    def ts(t: datetime) -> str:
        text = t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f").rstrip("0").rstrip(".")
        return f"'{text}Z'"

    sql = re.sub(r"\$__timeFilter\(([^)]+)\)", lambda m: f"{m.group(1).strip()} BETWEEN {ts(start)} AND {ts(end)}", sql)
    sql = sql.replace("$__timeFrom()", ts(start)).replace("$__timeTo()", ts(end))
    return re.sub(r"\$\{__interval_ms\}|\$__interval_ms\b", str(interval_ms), sql)


def main(argv: list[str] | None = None) -> None:
    root = Path(argv[0]) if argv else OUT_DIR
    for host in DASHBOARDS:
        path = path_for(host, root)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(host))
        print(f"wrote {path}")
    path = market_path(root)
    path.write_text(render_market())
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1:])
