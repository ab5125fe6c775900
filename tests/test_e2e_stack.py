"""The whole native pipeline (the same processes as `make demo` and compose): simulator -> collector ->
VPS Redis -> forwarder -> Brain Redis -> consumer -> writer -> Brain QuestDB, with Prometheus scraping
every role. Checks the oracle (no loss, no duplicate, order) and runs every Grafana panel's PromQL
against that live Prometheus."""

from __future__ import annotations

import json
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tickbridge_dev.deploy import dashboards
from tickbridge_dev.devstack.demo import drain_and_check
from tickbridge_dev.devstack.servers import REPO_ROOT
from tickbridge_dev.devstack.stack import NativeStack, StackConfig

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT", "XRPUSDT", "BNBUSDT", "DOGEUSDT")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NativeStack]:
    s = NativeStack(StackConfig(symbols=SYMBOLS, rate=300, workdir=tmp_path_factory.mktemp("stack"), with_reader=True))
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def prom_query(base: str, expr: str) -> list[Any]:
    url = f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=10) as resp:
        doc = json.loads(resp.read())
    assert doc["status"] == "success", doc
    result: list[Any] = doc["data"]["result"]
    return result


def panel_queries(*, compose_only: bool = False) -> list[tuple[str, str, str]]:
    """(dashboard, panel title, expr) for every panel target of the provisioned dashboards; the panels marked
    compose-only (node-exporter, cAdvisor: `dashboards.is_compose_only`) only with `compose_only=True`."""
    out = []
    for path in sorted((REPO_ROOT / "grafana").rglob("*.json")):
        doc = json.loads(path.read_text())
        panels = list(doc.get("panels", []))
        while panels:
            panel = panels.pop()
            panels.extend(panel.get("panels", []))
            if dashboards.is_compose_only(panel) != compose_only:
                continue
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((path.name, str(panel.get("title")), str(target["expr"])))
    return out


def grafana_to_promql(expr: str) -> str:
    """Replace Grafana's template variables with values Prometheus accepts."""
    expr = expr.replace("$__rate_interval", "30s").replace("$__interval", "10s").replace("$__range", "5m")
    expr = re.sub(r'=~?"\$\{?\w+(:\w+)?\}?"', '=~".*"', expr)
    return re.sub(r"\$\{?\w+\}?", ".*", expr)


def test_pipeline_delivers_every_trade_exactly_once_in_order(stack: NativeStack) -> None:
    stack.wait_for(lambda: stack.brain_sql("SELECT count() FROM trades")[0][0] > 1000, 120, "trades in QuestDB")
    time.sleep(5)  # let the flow run a little longer across all hops
    report = drain_and_check(stack)
    assert report.ok, report.summary()
    assert report.expected > 1000
    # Every role is still alive: nothing crashed on the way.
    assert all(proc.alive() for proc in stack.roles.values())
    stack.sim_fault("resume")


def test_every_dashboard_panel_returns_data_from_the_live_stack(stack: NativeStack) -> None:
    assert stack.prometheus is not None
    queries = panel_queries()
    assert queries, "no dashboards provisioned under grafana/"
    base = stack.prometheus.url
    # Two scrapes at least, so rate() has data.
    stack.wait_for(lambda: len(prom_query(base, "up")) > 0, 60, "Prometheus scraping")
    time.sleep(6)
    # Exempt by their marker only: node-exporter and cAdvisor panels (no host or containers in the native stack).
    exempt = panel_queries(compose_only=True)
    assert {title for _, title, _ in exempt} >= {"CPU per core", "Container CPU", "Container memory"}
    assert all('job="node"' in expr or 'job="cadvisor"' in expr for _, _, expr in exempt), exempt
    # The Redis panels (redis_exporter next to each Redis) are not exempt: the native stack runs the exporter.
    assert any("redis_memory_max_bytes" in expr for _, _, expr in queries)
    missing = []
    for dashboard, title, expr in queries:
        if not prom_query(base, grafana_to_promql(expr)):
            missing.append(f"{dashboard} / {title}: {expr}")
    assert not missing, "panels without data:\n" + "\n".join(missing)


def test_dashboards_exist_for_both_hosts() -> None:
    names = {p.name for p in Path(REPO_ROOT / "grafana").rglob("*.json")}
    assert any("vps" in n for n in names) and any("brain" in n for n in names), names
