"""Smoke of `make chaos-test`: kill -9 of the forwarder and of the consumer, and a short link cut, on one
stack under steady load, each followed by the oracle (every trade exactly once, in order) and a measured
recovery. The full scenario list runs only through `make chaos-test`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tickbridge.devstack import chaos


def test_every_scenario_is_listed_once() -> None:
    names = [s.name for s in chaos.SCENARIOS]
    assert len(names) == len(set(names))
    needed = {
        "brain_outage_ram", "brain_outage_spill", "link_flap", "link_latency", "link_bandwidth", "kill_collector",
        "kill_forwarder", "kill_consumer", "kill_writer", "vps_redis_crash", "brain_redis_crash",
        "brain_questdb_crash", "vps_questdb_crash", "exchange_disconnect", "exchange_update_gap",
        "exchange_server_shutdown", "exchange_burst_reconnect", "combined",
    }  # fmt: skip
    assert needed <= set(names)


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_smoke_kills_and_link_cut(tmp_path: Path) -> None:
    opts = chaos.ChaosOptions(quick=True, shared=True, out=tmp_path / "results", workdir=tmp_path / "stack",
                              rate=1000.0, drain_timeout=90.0, recovery_timeout=90.0)  # fmt: skip
    doc = chaos.run(["kill_forwarder", "kill_consumer", "brain_outage_ram"], opts)
    for res in doc["scenarios"]:
        assert res["faults"], res["name"]
        assert (res["lost"], res["duplicated"], res["out_of_order"]) == (0, 0, 0), res
        assert res["ticks_sent"] > 1000, res
        assert res["recovery_s"] is not None, res
        assert res["ok"], res["problems"]
    assert doc["ok"]
    saved = json.loads((tmp_path / "results" / "chaos.json").read_text())
    assert [s["name"] for s in saved["scenarios"]] == ["kill_forwarder", "kill_consumer", "brain_outage_ram"]
