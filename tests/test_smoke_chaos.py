"""Smoke of `make chaos-test`: kill -9 of the forwarder and of the consumer, a short link cut, and a link that
resets and refuses connections, on one stack under steady load, each followed by the oracle (every trade
exactly once, in order), a measured recovery and the check that no process exited on its own. The full
scenario list runs only through `make chaos-test`."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

from tickbridge_dev.devstack import chaos
from tickbridge_dev.devstack.servers import ManagedProcess
from tickbridge_dev.devstack.stack import NativeStack, StackConfig


class ExitingRole(ManagedProcess):
    """A process that exits by itself with code 3 (a role that crashed)."""

    name = "forwarder"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "import time; time.sleep(0.2); raise SystemExit(3)"]

    def ready(self) -> bool:
        return True


def test_a_process_that_exits_on_its_own_fails_the_scenario(tmp_path: Path) -> None:
    """The harness's check: a process it did not kill that is not running is a problem (and is restarted);
    one the harness took down on purpose is not."""
    stack = NativeStack(StackConfig(workdir=tmp_path / "stack"))  # not started: only this process runs
    role = ExitingRole(tmp_path / "role")
    stack.roles["forwarder"] = role  # type: ignore[assignment]
    ctx = chaos.Ctx(stack, chaos.ChaosOptions(quick=True, out=None), random.Random(1))
    try:
        role.spawn()
        assert role.proc is not None
        first = role.proc
        first.wait(10)
        ctx.expected_down.add("forwarder")
        ctx.check_alive()
        assert ctx.problems == []
        ctx.expected_down.clear()
        ctx.check_alive()
        assert len(ctx.problems) == 1 and "forwarder exited on its own (code 3)" in ctx.problems[0], ctx.problems
        assert role.proc is not first  # restarted by the harness, so the run can go on
    finally:
        role.stop()


def test_every_scenario_is_listed_once() -> None:
    names = [s.name for s in chaos.SCENARIOS]
    assert len(names) == len(set(names))
    needed = {
        "brain_outage_ram", "brain_outage_spill", "link_flap", "link_latency", "link_bandwidth", "kill_collector",
        "kill_forwarder", "kill_consumer", "kill_writer", "vps_redis_crash", "brain_redis_crash",
        "brain_questdb_crash", "vps_questdb_crash", "exchange_disconnect", "exchange_update_gap",
        "exchange_server_shutdown", "exchange_burst_reconnect", "combined", "link_reset", "link_loss_1",
        "link_loss_5", "link_loss_10", "vps_power_cut",
    }  # fmt: skip
    assert needed <= set(names)
    # Issue 18: per venue a disconnect, its book break and missed trades; one venue down while the others flow.
    venues = {s.name: s.venues for s in chaos.SCENARIOS if s.venues}
    for venue, book in (("coinbase", "sequence_gap"), ("kraken", "checksum_mismatch")):
        for kind in ("disconnect", book, "missed_trades"):
            assert venues[f"{venue}_{kind}"] == (venue,)
    assert venues["venue_down_kraken"] == ("coinbase", "kraken")


@pytest.mark.chaos
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_chaos_smoke_kills_link_cut_and_reset(tmp_path: Path) -> None:
    opts = chaos.ChaosOptions(quick=True, shared=True, out=tmp_path / "results", workdir=tmp_path / "stack",
                              rate=1000.0, drain_timeout=90.0, recovery_timeout=90.0)  # fmt: skip
    names = ["kill_forwarder", "kill_consumer", "brain_outage_ram", "link_reset"]
    doc = chaos.run(names, opts)
    for res in doc["scenarios"]:
        assert res["faults"], res["name"]
        assert (res["lost"], res["duplicated"], res["out_of_order"]) == (0, 0, 0), res
        assert res["ticks_sent"] > 1000, res
        assert res["recovery_s"] is not None, res
        assert res["ok"], res["problems"]
    assert doc["ok"]
    saved = json.loads((tmp_path / "results" / "chaos.json").read_text())
    assert [s["name"] for s in saved["scenarios"]] == names
