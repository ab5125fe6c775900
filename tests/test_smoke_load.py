"""Smoke of `make load-test`: the real pipeline at 1,000 trades/s over the 50 symbols for 20 s.

Asserts what the full run asserts (zero loss, zero duplicates, order, the achieved rate at each end, latency
percentiles measured, the report files written); the full rates run only through `make load-test`.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tickbridge_dev.devstack import loadtest, report


def test_report_from_synthetic_numbers(tmp_path: Path) -> None:
    """The report, the plot and the summary come out of plain numbers (no stack)."""
    assert report.percentiles([float(i) for i in range(1, 101)]) == {
        "p50": 50.0, "p95": 95.0, "p99": 99.0, "max": 100.0, "mean": 50.5, "n": 100.0,
    }  # fmt: skip
    assert report.percentiles([])["n"] == 0
    timeline = [
        {"t": float(t), "rate": {"exchange": 1000.0, "questdb": 990.0 + t}, "cpu": {"writer": 10.0 + t},
         "latency": {"exchange_to_brain_redis": {"p50": 5.0, "p99": 40.0}}}
        for t in range(10)
    ]  # fmt: skip
    lat = report.percentiles([1.0, 2.0, 3.0])
    doc = {
        "rate_target": 1000.0, "duration_s": 10.0, "machine": report.machine_info(), "symbols": ["BTCUSDT"],
        "rates": {hop: {"mean": 1000.0, "max_1s": 1010.0, "ratio": 1.0} for hop in loadtest.HOPS},
        "latency_ms": {"exchange_to_brain_redis": lat, "exchange_to_questdb": report.percentiles([])},
        "processes": {"writer": {"cpu_mean": 10.0, "cpu_max": 20.0, "rss_max_mb": 50.0}},
        "system_cpu": {"mean": 50.0, "max": 90.0}, "redis_memory": {"vps-redis": {"start_mb": 1.0, "max_mb": 2.0,
        "end_mb": 2.0}}, "drain_s": 0.5, "oracle": {"expected": 10, "rows": 10, "lost": 0, "duplicated": 0,
        "out_of_order": 0, "ok": True}, "checks": {"oracle": True}, "pass": True, "timeline": timeline,
    }  # fmt: skip
    paths = report.write_load_report(doc, tmp_path)
    assert paths["png"].stat().st_size > 10_000
    md = paths["md"].read_text()
    assert "RATE=1000 trades/s" in md and "PASS" in md and "nproc" not in md
    assert json.loads(paths["json"].read_text())["latency_ms"]["exchange_to_questdb"]["p50"] is None  # NaN -> null
    assert "| 1,000 |" in paths["summary"].read_text()


def test_verdict_tells_a_slow_machine_from_a_slow_relay() -> None:
    """A simulator short of RATE (its loop skipped trades) is the machine's failure, not the relay's."""
    sim, qdb = "simulator achieved RATE within 1%", "Brain QuestDB ingest rate within 1% of RATE"
    assert loadtest.verdict({sim: True, qdb: True}, 1.0, 0.01, 0) == "PASS"
    slow = loadtest.verdict({sim: False, qdb: False}, 0.9, 0.01, 5000)
    assert slow.startswith("FAIL: machine too slow") and "90.0 %" in slow and "5,000 trades" in slow and qdb in slow
    assert loadtest.verdict({sim: True, qdb: False}, 1.0, 0.01, 0) == f"FAIL: relay: {qdb}"


def test_role_histograms_are_one_figure_per_metric() -> None:
    """Per-symbol series of a histogram are summed: one mean per metric, not one per label set."""
    metrics = {
        'x_seconds_sum{symbol="A"}': 1.0, 'x_seconds_count{symbol="A"}': 10.0,
        'x_seconds_sum{symbol="B"}': 3.0, 'x_seconds_count{symbol="B"}': 10.0,
    }  # fmt: skip
    line = "".join(report._role_metric_lines({"collector": metrics}))
    assert "`x_seconds` mean 200.0 ms over 20" in line and "symbol" not in line


@pytest.mark.load
@pytest.mark.slow
@pytest.mark.alone
@pytest.mark.timeout(240)
def test_load_smoke_50_symbols_1000_per_s(tmp_path: Path) -> None:
    opts = loadtest.LoadOptions(rate=1000.0, duration=20.0, out=tmp_path / "results", warmup=4.0, progress=False,
                                workdir=tmp_path / "stack", drain_timeout=90.0)  # fmt: skip
    doc = loadtest.run(opts)
    oracle = doc["oracle"]
    assert oracle["expected"] > 15_000
    assert (oracle["lost"], oracle["duplicated"], oracle["out_of_order"]) == (0, 0, 0), oracle
    assert oracle["ok"]
    assert doc["drain_s"] is not None
    # The full run holds 1 %; a 20-s smoke on a shared 2-core machine gets a little slack.
    for hop in ("exchange", "brain_trades", "questdb"):
        ratio = doc["rates"][hop]["ratio"]
        assert ratio is not None and abs(ratio - 1.0) < 0.05, (hop, doc["rates"][hop])
    lat = doc["latency_ms"]["exchange_to_brain_redis"]
    assert lat["n"] > 100 and not math.isnan(lat["p99"]) and 0 <= lat["p50"] <= lat["p99"] <= lat["max"]
    assert doc["processes"]["writer"]["rss_max_mb"] > 0
    # Where each Redis spends its time: on the VPS the collector's XADD of every tick (inside its transactions), on
    # the Brain the forwarder's XADD of every entry and the consumer's ingest function once per batch.
    brain = doc["redis_commands"]["brain-redis"]["commands"]
    assert brain["fcall"]["us_per_trade"] > 0 and brain["xadd"]["calls_per_1000_trades"] >= 1000, brain
    assert doc["redis_commands"]["vps-redis"]["commands"]["xadd"]["calls_per_1000_trades"] >= 1000
    md = (tmp_path / "results" / "load-1000.md").read_text()
    assert "## Redis time per command" in md and "brain-redis: " in md and "µs of CPU per trade" in md
    for suffix in ("md", "json", "png"):
        assert (tmp_path / "results" / f"load-1000.{suffix}").stat().st_size > 0
