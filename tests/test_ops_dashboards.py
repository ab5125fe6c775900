"""Grafana provisioning and dashboards: generated files up to date, one fixed datasource uid, plain PromQL that a
real Prometheus accepts, only series the roles define, and every metric family the design asks to see."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tickbridge_dev.deploy import dashboards
from tickbridge_dev.deploy.catalog import known_series, referenced_series, role_series
from tickbridge_dev.deploy.compose import load_compose, parse_env_file
from tickbridge_dev.devstack.servers import REPO_ROOT, PrometheusServer

pytestmark = pytest.mark.timeout(90)

GRAFANA = REPO_ROOT / "grafana"
#: Issue 19: Redis (redis_exporter) and the containers (cAdvisor) seen on both hosts.
EXPORTER_PANELS = [
    'redis_memory_max_bytes{job="redis-',  # Redis memory against maxmemory (issue 19)
    "redis_aof_delayed_fsync",  # AOF fsync falling behind
    "redis_aof_last_write_status",
    "redis_aof_rewrite_in_progress",
    "rate(redis_commands_processed_total",  # ops/s
    "redis_connected_clients",  # clients
    "redis_stream_length",  # the stream
    "redis_stream_last_generated_id",
    "container_memory_working_set_bytes",  # per container, against mem_limit (cAdvisor)
    "container_spec_memory_limit_bytes",
    "container_cpu_usage_seconds_total",
]
#: What the design asks each host's dashboard to show (a series or function each must use).
REQUIRED = {
    "vps": [
        'node_cpu_seconds_total{job="node"',  # per-core CPU
        "node_memory_MemAvailable_bytes",  # RAM
        "node_filesystem_avail_bytes",  # disk
        "node_network_receive_bytes_total",  # network
        "sum by (symbol) (rate(tickbridge_collector_ticks_total",  # ingest per symbol
        "tickbridge_collector_connection_up",  # connection status
        "tickbridge_forwarder_backlog_entries",  # stream depth
        "tickbridge_forwarder_backlog_oldest_age_seconds",  # stream lag
        "tickbridge_forwarder_buffer_rows",  # buffer rows
        "tickbridge_forwarder_buffer_bytes",  # buffer GB
        "tickbridge_forwarder_buffer_hours",  # buffer hours
        "tickbridge_forwarder_sent_total",  # forwarder rate
        "tickbridge_forwarder_retries_total",  # retries
        "tickbridge_forwarder_errors_total",  # errors
        *EXPORTER_PANELS,
    ],
    "brain": [
        "tickbridge_consumer_lag_entries",  # consumer lag
        "tickbridge_consumer_throughput_ticks_per_second",  # throughput
        "tickbridge_consumer_data_staleness_seconds",  # staleness
        "tickbridge_writer_rows_total",  # writer rate
        "tickbridge_writer_write_seconds_bucket",  # writer latency
        "tickbridge_tiered_latency_seconds_bucket",  # tier latencies
        *EXPORTER_PANELS,
        "redis_stream_group_last_delivered_id",  # the consumer group behind the Brain stream's top
    ],
}
#: Per-hop latency (issue 19): p50 and p99 per symbol of each hop a host's Prometheus scrapes.
REQUIRED_HOPS = {
    "vps": [m for m, *_ in dashboards.HOPS_VPS],
    "brain": [m for m, *_ in dashboards.HOPS_BRAIN],
}


def _load(host: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(dashboards.path_for(host).read_text())
    return result


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrometheusServer]:
    """A real Prometheus (nothing to scrape) to parse and evaluate every panel's PromQL."""
    workdir = tmp_path_factory.mktemp("prometheus")
    config = workdir / "prometheus.yml"
    config.write_text("global:\n  scrape_interval: 15s\nscrape_configs: []\n")
    server = PrometheusServer(config, workdir=workdir / "run")
    server.start()
    yield server
    server.stop()


@pytest.mark.parametrize("host", sorted(dashboards.DASHBOARDS))
def test_committed_dashboards_are_generated(host: str) -> None:
    assert dashboards.path_for(host).read_text() == dashboards.render(host), (
        "run `python -m tickbridge_dev.deploy.dashboards` and commit grafana/dashboards/"
    )


@pytest.mark.parametrize("host", sorted(dashboards.DASHBOARDS))
def test_dashboard_structure(host: str) -> None:
    board = _load(host)
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert board["uid"] == f"tickbridge-{host}"
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert set(variables) <= set(dashboards.VARIABLE_ALL), f"unknown template variables {set(variables)}"
    for name, variable in variables.items():
        assert variable["datasource"]["uid"] == dashboards.DATASOURCE["uid"]
        assert variable["multi"] and variable["includeAll"] and variable["allValue"] == dashboards.VARIABLE_ALL[name]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"] == dashboards.DATASOURCE["uid"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            # The only variables are the dashboard's own, as regex matchers (`label=~"$name"`: All is `.*`).
            for name in re.findall(r"\$\{?(\w+)", target["expr"]):
                assert name in variables, f"{panel['title']}: ${name} is not a variable of this dashboard"
                assert f'=~"${name}"' in target["expr"], f"{panel['title']}: ${name} outside a regex matcher"
            assert "$" not in dashboards.expand_variables(target["expr"]), panel["title"]
    # Node-exporter panels are marked, and only those select job="node"; likewise cAdvisor's (job="cadvisor").
    for query in dashboards.panel_queries(board):
        assert query.node == ('job="node"' in query.expr), query
        assert query.compose_only == ('job="node"' in query.expr or 'job="cadvisor"' in query.expr), query


def test_provisioning_matches_compose() -> None:
    env = parse_env_file(REPO_ROOT / ".env.example")
    provider = yaml.safe_load((GRAFANA / "provisioning/dashboards/tickbridge.yml").read_text())["providers"][0]
    for host in dashboards.DASHBOARDS:
        grafana = load_compose(REPO_ROOT / f"compose.{host}.yml", env)["services"]["grafana"]
        mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
        assert mounts[provider["options"]["path"]] == f"./grafana/dashboards/{host}"
        home = Path(grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
        assert (GRAFANA / "dashboards" / host / home.name).exists()


@pytest.mark.parametrize("host", sorted(dashboards.DASHBOARDS))
def test_dashboards_cover_the_design(host: str) -> None:
    exprs = "\n".join(q.expr for q in dashboards.panel_queries(_load(host)))
    missing = [needle for needle in REQUIRED[host] if needle not in exprs]
    assert not missing, f"{host} dashboard lacks {missing}"


@pytest.mark.parametrize("host", sorted(dashboards.DASHBOARDS))
def test_latency_row_shows_p50_and_p99_per_hop_and_symbol(host: str) -> None:
    board = _load(host)
    assert [v["name"] for v in board["templating"]["list"]] == ["exchange", "symbol"]
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    for metric in REQUIRED_HOPS[host]:
        for q in ("0.5", "0.99"):
            matchers = 'exchange=~"$exchange",symbol=~"$symbol"' if "_writer_" not in metric else 'symbol=~"$symbol"'
            wanted = f"histogram_quantile({q}, sum by (le, symbol) (rate({metric}_bucket{{{matchers}}}[1m])))"
            assert wanted in exprs, f"{host}: no p{q} per symbol of {metric}"
    # The variables list the exchanges (issue 18) and symbols of series this host's Prometheus has.
    for variable in board["templating"]["list"]:
        assert referenced_series(variable["query"]["query"]) <= set().union(*role_series().values())


def test_role_panels_filter_on_the_exchange() -> None:
    """Every collector, forwarder and consumer series in a panel carries the `$exchange` matcher (issue 18)."""
    assert dashboards.with_exchange("rate(tickbridge_collector_ticks_total[1m])") == (
        'rate(tickbridge_collector_ticks_total{exchange=~"$exchange"}[1m])'
    )
    assert dashboards.with_exchange('tickbridge_forwarder_mode{x="1"} + tickbridge_writer_rows') == (
        'tickbridge_forwarder_mode{exchange=~"$exchange",x="1"} + tickbridge_writer_rows'
    )
    for host in ("vps", "brain"):
        for panel in _load(host)["panels"]:
            for target in panel.get("targets", []):
                for m in re.finditer(r"tickbridge_(collector|forwarder|consumer)_\w+(\{[^}]*\})?", target["expr"]):
                    assert m.group(2) and 'exchange=~"$exchange"' in m.group(2), (host, panel["title"], m.group(0))


def test_market_dashboard_is_generated_and_reads_questdb_as_the_reader() -> None:
    assert dashboards.market_path().read_text() == dashboards.render_market(), (
        "run `python -m tickbridge_dev.deploy.dashboards` and commit grafana/dashboards/"
    )
    board = json.loads(dashboards.market_path().read_text())
    titles = {title for title, _, _ in dashboards.sql_queries(board)}
    assert {"Last price", "Trades per second", "Missing trade IDs"} <= titles
    source = yaml.safe_load((GRAFANA / "datasources/brain/questdb.yml").read_text())["datasources"][0]
    assert (
        source["uid"] == dashboards.QUESTDB_DATASOURCE["uid"]
        and source["type"] == dashboards.QUESTDB_DATASOURCE["type"]
    )
    assert all(p["datasource"] == dashboards.QUESTDB_DATASOURCE for p in board["panels"])
    # The read-only PG user; its password from the compose secret, never from the environment.
    assert source["user"] == "$QUESTDB_READER_USER" and source["url"] == "questdb:8812"
    assert source["secureJsonData"]["password"] == "$__file{/run/secrets/questdb_reader_password}"
    env = parse_env_file(REPO_ROOT / ".env.example")
    grafana = load_compose(REPO_ROOT / "compose.brain.yml", env)["services"]["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    assert mounts["/etc/grafana/provisioning/datasources/questdb.yml"] == "./grafana/datasources/brain/questdb.yml"
    assert "questdb_reader_password" in grafana["secrets"]
    assert not any(k.startswith("QUESTDB") and "PASSWORD" in k for k in grafana["environment"]), grafana["environment"]
    vps = load_compose(REPO_ROOT / "compose.vps.yml", env)["services"]["grafana"]
    assert not any("datasources/brain" in v for v in vps["volumes"]), "the VPS has no market data"


def test_dashboards_use_only_series_the_roles_define() -> None:
    known = known_series()
    for host in dashboards.DASHBOARDS:
        for query in dashboards.panel_queries(_load(host)):
            missing = referenced_series(query.expr) - known
            assert not missing, f"{host} / {query.title}: undefined series {missing}"


def test_every_panel_query_is_valid_promql(prometheus: PrometheusServer) -> None:
    for host in dashboards.DASHBOARDS:
        for query in dashboards.panel_queries(_load(host)):
            url = f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": query.expr})
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    body = json.loads(resp.read())
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read())
            assert body["status"] == "success", f"{host} / {query.title}: {body.get('error')}\n{query.expr}"


def test_queries_that_may_stay_empty_are_flagged() -> None:
    """A live-stack test may skip the emptiness check only for per-label event counts and tier reads."""
    flagged = {q.expr for h in dashboards.DASHBOARDS for q in dashboards.panel_queries(_load(h)) if q.may_be_empty}
    assert "sum by (kind) (increase(tickbridge_writer_errors_total[5m]))" in flagged
    assert any("tickbridge_tiered_latency_seconds_bucket" in e for e in flagged)
    assert not dashboards.may_be_empty("sum(increase(tickbridge_forwarder_dropped_total[5m])) or vector(0)")
    assert not dashboards.may_be_empty("max(tickbridge_consumer_lag_entries)")
