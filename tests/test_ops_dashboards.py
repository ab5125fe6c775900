"""Grafana provisioning and dashboards: generated files up to date, one fixed datasource uid, plain PromQL that a
real Prometheus accepts, only series the roles define, and every metric family the design asks to see."""

from __future__ import annotations

import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tickbridge.devstack.servers import REPO_ROOT, PrometheusServer
from tickbridge.ops import dashboards
from tickbridge.ops.catalog import known_series, referenced_series
from tickbridge.ops.compose import load_compose, parse_env_file

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
        "run `python -m tickbridge.ops.dashboards` and commit grafana/dashboards/"
    )


@pytest.mark.parametrize("host", sorted(dashboards.DASHBOARDS))
def test_dashboard_structure(host: str) -> None:
    board = _load(host)
    datasource = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())["datasources"][0]
    assert board["uid"] == f"tickbridge-{host}" and board["templating"]["list"] == []
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == datasource["uid"] == dashboards.DATASOURCE["uid"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert "$" not in target["expr"], f"{panel['title']}: template variables are not plain PromQL"
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
