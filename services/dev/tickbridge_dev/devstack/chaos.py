"""`make chaos-test`: every fault scenario under steady load, each ending with the zero-loss oracle.

Each scenario starts the whole native stack (Redis x2 with AOF, QuestDB x2, the simulator as the exchange,
collector, forwarder, consumer, writer, toxiproxy on the VPS->Brain link), puts it under steady load,
injects its faults, measures the recovery after each one, then pauses the exchange, waits for the Brain to
hold everything and checks per symbol: every trade the exchange emitted is in the Brain's QuestDB `trades`
exactly once, in order. Results go to `chaos.md/.json` in the results folder.

A scenario fails on lost, duplicated or out-of-order trades, and on any process of the stack (role, server,
simulator, proxy) that exits without the harness killing it: it is checked while the load runs, while the
harness waits for a recovery or the drain, and once more after the oracle. The link faults toxiproxy cannot
make (connections reset with a TCP RST or refused, segment loss) come from `LinkProxy`
(`tickbridge_dev.devstack.linkproxy`), which these scenarios put in front of toxiproxy.

`--quick` shortens every fault phase (the smoke in `make test` uses it with `--shared`: several scenarios
on one stack, with the oracle after each). `--scale` multiplies the full durations.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import random
import shlex
import shutil
import signal
import sys
import tempfile
import time
import traceback
import urllib.error
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tickbridge.core import keys
from tickbridge_dev.devstack import oracle, report
from tickbridge_dev.devstack.fastforward import (
    FF_RAM_BUDGET,
    sc_brain_outage_fastforward,
    sc_brain_outage_fastforward_cut,
    sc_brain_outage_fastforward_kills,
)
from tickbridge_dev.devstack.faults import (
    FaultEvent,
    kill9,
    poll,
    remove_toxic,
    restart_process,
    role_metric,
    start_load,
    toxic,
    vps_buffer_rows,
    wait_caught_up,
)
from tickbridge_dev.devstack.servers import ManagedProcess, stop_on_signals
from tickbridge_dev.devstack.stack import ROLES, NativeStack, StackConfig
from tickbridge_dev.devstack.venuechaos import VENUE_SCENARIOS, start_venue_load

console = Console(stderr=True)

#: Recoveries slower than this are called out in the report (not a failure: the oracle decides that).
SLOW_RECOVERY_S = 30.0
#: RAM budget that makes a ~10 s outage spill to the VPS QuestDB at the chaos rate.
SMALL_RAM_BUDGET = 4_000_000
#: What a power cut of the VPS takes down (the exchange, the link and the Brain stay up).
VPS_PROCESSES = ("collector", "forwarder", "forwarder-live", "vps-redis", "vps-questdb")


@dataclass
class ChaosOptions:
    rate: float = 1200.0
    symbols: tuple[str, ...] = ()
    quick: bool = False
    #: Multiplies every fault duration (full mode); e.g. 0.5 halves the run.
    scale: float = 1.0
    #: Run every selected scenario on one stack (oracle after each) instead of a fresh stack each.
    shared: bool = False
    out: Path | None = report.RESULTS_DIR
    seed: int = 7
    warmup: float = 3.0
    recovery_timeout: float = 180.0
    drain_timeout: float = 240.0
    workdir: Path | None = None
    #: Keep every scenario's files and logs, not only the failing ones.
    keep: bool = False
    command: str = ""


@dataclass
class ScenarioResult:
    name: str
    description: str
    ok: bool = False
    faults: list[dict[str, Any]] = field(default_factory=list)
    faults_summary: str = ""
    ticks_sent: int = 0
    lost: int = 0
    duplicated: int = 0
    out_of_order: int = 0
    recovery_s: float | None = None
    duration_s: float = 0.0
    drain_s: float | None = None
    evidence: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    workdir: str = ""


class Ctx:
    """What a scenario's action gets: the stack, timing helpers, the fault log."""

    def __init__(self, stack: NativeStack, opts: ChaosOptions, rng: random.Random) -> None:
        self.stack = stack
        self.opts = opts
        self.rng = rng
        self.events: list[FaultEvent] = []
        self.evidence: list[str] = []
        self.problems: list[str] = []
        self.t0 = time.monotonic()
        self.expected_down: set[str] = set()

    def d(self, full: float, quick: float) -> float:
        """A phase duration: `quick` in quick mode, else `full` times the scale."""
        return quick if self.opts.quick else full * self.opts.scale

    def n(self, full: int, quick: int) -> int:
        return quick if self.opts.quick else full

    def fault(self, what: str, **extra: Any) -> FaultEvent:
        ev = FaultEvent(round(time.monotonic() - self.t0, 2), what, extra=extra)
        self.events.append(ev)
        console.print(f"  [yellow]t={ev.t:6.1f}s[/] {what}")
        return ev

    def recovered(self, ev: FaultEvent) -> None:
        """Measure how long until the Brain holds everything the exchange emitted by now."""
        rec = wait_caught_up(self.stack, self.opts.recovery_timeout, on_poll=self.check_alive)
        ev.recovery_s = None if rec is None else round(rec, 2)
        if rec is None:
            self.problems.append(f"no recovery within {self.opts.recovery_timeout:.0f}s after: {ev.what}")
        elif rec > SLOW_RECOVERY_S:
            self.evidence.append(f"slow recovery ({rec:.1f}s > {SLOW_RECOVERY_S:.0f}s) after: {ev.what}")
        console.print(f"  [green]recovered[/] in {ev.recovery_s}s" if rec is not None else "  [red]NOT recovered")

    def steady(self, seconds: float) -> None:
        """Let the load run; notice any role that died on its own."""
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.check_alive()
            time.sleep(min(0.5, max(0.0, end - time.monotonic())))

    def check_alive(self) -> None:
        """Every process the harness did not stop must be running: one that exited on its own (a role that
        crashed, a server that died) fails the scenario; it is restarted so the run can go on."""
        for name, proc in self.processes().items():
            if name in self.expected_down or proc.proc is None or proc.proc.poll() is None:
                continue
            code = proc.proc.returncode
            self.problems.append(f"{name} exited on its own (code {code}); log: {proc.log_path}")
            console.print(f"  [red]{name} exited on its own (code {code}), restarting")
            restart_process(proc)

    def processes(self) -> dict[str, ManagedProcess]:
        """Every process of the stack by name: roles, servers, the simulator, the proxies."""
        st = self.stack
        procs: dict[str, ManagedProcess] = {
            "vps-redis": st.vps_redis,
            "brain-redis": st.brain_redis,
            "vps-questdb": st.vps_questdb,
            "brain-questdb": st.brain_questdb,
            **st.roles,
        }
        extras = {"sim": st.sim, "toxiproxy": st.toxiproxy, "linkproxy": st.link_proxy}
        procs.update({name: proc for name, proc in extras.items() if proc is not None})
        procs.update({proc.name: proc for proc in st.venue_sims.values()})  # `sim-coinbase`, `sim-kraken`
        return procs

    def process(self, name: str) -> ManagedProcess:
        return self.processes()[name]

    def crash(self, name: str, down_s: float) -> FaultEvent:
        """kill -9 a role or server, keep it down `down_s`, start it again (same ports, same data)."""
        proc = self.process(name)
        self.expected_down.add(name)
        try:
            pid = kill9(proc)
            ev = self.fault(f"kill -9 {name} (pid {pid}), down {down_s:.1f}s, restarted")
            time.sleep(down_s)
            restart_process(proc)
        finally:
            self.expected_down.discard(name)
        return ev

    def power_cut(self, down_s: float) -> FaultEvent:
        """The whole VPS loses power: SIGKILL to every VPS process at once, down `down_s`, then all start again
        together as after a boot (each role retries its servers by itself). The kernel survives a kill -9, so
        what Redis and QuestDB had written (not yet fsynced) is kept, unlike a real power loss."""
        procs = [self.process(name) for name in VPS_PROCESSES]
        self.expected_down.update(VPS_PROCESSES)
        try:
            pids = [p.proc.pid for p in procs if p.proc is not None and p.proc.poll() is None]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            for p in procs:
                if p.proc is not None:
                    p.proc.wait(10)
            ev = self.fault(f"VPS power cut: kill -9 of {', '.join(VPS_PROCESSES)} at once (pids {pids}), "
                            f"down {down_s:.1f}s, all restarted")  # fmt: skip
            time.sleep(down_s)
            t_boot = time.monotonic()
            for p in procs:
                p.spawn()
            for p in procs:
                try:
                    p.wait_ready()
                except Exception as exc:  # a port in TIME_WAIT, a slow JVM: start it again
                    console.print(f"  [yellow]{p.name} did not come back at once ({exc!r}): retrying")
                    restart_process(p)
            ev.what += f" (all up again {time.monotonic() - t_boot:.1f}s after the restart began)"
        finally:
            self.expected_down.difference_update(VPS_PROCESSES)
        return ev

    def link_cut(self, seconds: float, label: str = "") -> FaultEvent:
        ev = self.fault(f"VPS->Brain link cut for {seconds:.1f}s{label}")
        self.stack.set_brain_link(False)
        try:
            self.steady(seconds)
        finally:
            self.stack.set_brain_link(True)
        return ev


# -- scenarios ---------------------------------------------------------------------------------------------
def sc_brain_outage_ram(ctx: Ctx) -> None:
    ev = ctx.link_cut(ctx.d(60, 6))
    backlog = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_backlog_entries")
    ctx.evidence.append(f"forwarder backlog at the end of the cut: {backlog} entries; "
                        f"VPS buffer rows: {vps_buffer_rows(ctx.stack)}")  # fmt: skip
    ctx.recovered(ev)


def sc_brain_outage_spill(ctx: Ctx) -> None:
    seconds = ctx.d(45, 15)
    ev = ctx.fault(f"VPS->Brain link cut for >= {seconds:.0f}s with RAM_BUFFER_BYTES={SMALL_RAM_BUDGET}")
    ctx.stack.set_brain_link(False)
    t_cut = time.monotonic()
    try:
        ctx.steady(seconds)
        # Keep the link down until the spill is under way (the budget check runs every few seconds).
        poll(lambda: bool(role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_spilled_total")), 60.0, 0.5)
        ctx.steady(ctx.d(5, 2))
        spilled = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_spilled_total")
    finally:
        ctx.stack.set_brain_link(True)
    ev.what += f" (link actually down {time.monotonic() - t_cut:.1f}s)"
    ctx.evidence.append(f"entries spilled to the VPS QuestDB buffer during the cut: {spilled}")
    if not spilled:
        ctx.problems.append("the forwarder did not spill to the QuestDB buffer: the scenario did not test the spill")
    ctx.recovered(ev)
    replayed = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_replayed_total")
    ctx.evidence.append(f"replayed from the buffer: {replayed}")


def sc_link_flap(ctx: Ctx) -> None:
    total = ctx.d(40, 10)
    end = time.monotonic() + total
    last: FaultEvent | None = None
    while time.monotonic() < end:
        last = ctx.link_cut(2.0, " (flapping: 2 s down, 3 s up)")
        ctx.steady(3.0)
    if last is not None:
        ctx.recovered(last)


def sc_link_latency(ctx: Ctx) -> None:
    seconds = ctx.d(30, 8)
    ev = ctx.fault(f"VPS->Brain link: +250 ms latency (jitter 100 ms) both ways for {seconds:.0f}s")
    for stream in ("upstream", "downstream"):
        toxic(ctx.stack, f"lat_{stream}", "latency", {"latency": 250, "jitter": 100}, stream)
    try:
        ctx.steady(seconds)
    finally:
        for stream in ("upstream", "downstream"):
            remove_toxic(ctx.stack, f"lat_{stream}")
    ctx.recovered(ev)


def sc_link_bandwidth(ctx: Ctx) -> None:
    seconds = ctx.d(30, 8)
    ev = ctx.fault(f"VPS->Brain link limited to 64 KB/s for {seconds:.0f}s")
    toxic(ctx.stack, "bw", "bandwidth", {"rate": 64}, "upstream")
    try:
        ctx.steady(seconds)
    finally:
        remove_toxic(ctx.stack, "bw")
    ctx.recovered(ev)


def sc_link_reset(ctx: Ctx) -> None:
    """The link as the internet breaks it: resets while it carries traffic, then an outage that first swallows
    everything and then resets every connection and resets or refuses every new one."""
    st = ctx.stack

    def spilled() -> bool:
        return bool(role_metric(st, "forwarder", "tickbridge_forwarder_spilled_total"))

    last: FaultEvent | None = None
    for _ in range(ctx.n(5, 2)):  # an idle connection reset between two batches, a batch reset mid-flight
        ctx.steady(ctx.rng.uniform(1.0, 3.0))
        last = ctx.fault("VPS->Brain link: every connection reset (RST), new ones reset for 1 s")
        st.set_link_proxy("reset", refuse=False)
        try:
            ctx.steady(1.0)
        finally:
            st.set_link_proxy("pass")
    if last is not None:
        ctx.recovered(last)
    swallow, down = ctx.d(15, 3), ctx.d(30, 6)
    ev = ctx.fault(f"VPS->Brain link outage: swallows everything {swallow:.0f}s, then every connection reset and "
                   f"new ones alternately reset or refused (2.5 s each) for >= {down:.0f}s")  # fmt: skip
    t_cut = time.monotonic()
    st.set_link_proxy("swallow")
    try:
        ctx.steady(swallow)
        refuse, end = False, time.monotonic() + down
        # Full mode keeps the link down until the spill is under way (up to a minute more).
        while time.monotonic() < end or (not ctx.opts.quick and not spilled() and time.monotonic() < end + 60):
            st.set_link_proxy("reset", refuse=refuse)
            ctx.steady(min(2.5, max(0.5, end - time.monotonic())))
            refuse = not refuse
    finally:
        st.set_link_proxy("pass")
    ev.what += f" (link actually down {time.monotonic() - t_cut:.1f}s)"
    spilled_n = role_metric(st, "forwarder", "tickbridge_forwarder_spilled_total")
    stats = st.link_proxy_stats()
    ctx.evidence.append(f"entries spilled during the outage: {spilled_n}; connections reset by the link: "
                        f"{stats['reset']}, refused windows: {stats['refused_windows']}")  # fmt: skip
    if not spilled_n and not ctx.opts.quick:
        ctx.problems.append("the forwarder did not spill during the outage: the scenario did not test the spill")
    ctx.recovered(ev)


def _link_loss(loss: float) -> Callable[[Ctx], None]:
    def action(ctx: Ctx) -> None:
        seconds = ctx.d(45, 8)
        ev = ctx.fault(
            f"VPS->Brain link loses {loss:.0%} of its segments both ways for {seconds:.0f}s (emulated: "
            "a lost segment arrives one RTO late, 200 ms doubling per repeat, the bytes behind it wait)"
        )
        ctx.stack.set_link_proxy(loss=loss)
        try:
            ctx.steady(seconds)
            backlog = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_backlog_entries")
        finally:
            ctx.stack.set_link_proxy(loss=0.0)
        stats = ctx.stack.link_proxy_stats()
        ctx.evidence.append(f"chunks delayed by a lost segment: {stats['segments_delayed']}, longest delay "
                            f"{stats['max_delay_s']:.1f}s; forwarder backlog at the end: {backlog}")  # fmt: skip
        ctx.recovered(ev)

    return action


def sc_vps_power_cut(ctx: Ctx) -> None:
    """Every VPS process killed at once and restarted: once under steady flow, once while the Brain link is
    down and the forwarder spills (full mode)."""
    ctx.steady(ctx.rng.uniform(2.0, ctx.d(8.0, 3.0)))
    ctx.recovered(ctx.power_cut(ctx.rng.uniform(2.0, 5.0)))
    if ctx.opts.quick:
        return
    ctx.steady(ctx.rng.uniform(2.0, 5.0))
    ev = ctx.fault("VPS->Brain link cut until the forwarder spills, then a VPS power cut, link back 5 s later")
    ctx.stack.set_brain_link(False)
    try:
        if not poll(lambda: bool(role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_spilled_total")), 60.0,
                    0.5, ctx.check_alive):  # fmt: skip
            ctx.problems.append("no spill before the power cut: the cut hit an idle buffer")
        ctx.steady(2.0)
        ctx.power_cut(ctx.rng.uniform(2.0, 5.0))
        ctx.steady(5.0)
    finally:
        ctx.stack.set_brain_link(True)
    ctx.recovered(ev)


def _kill_role(role: str) -> Callable[[Ctx], None]:
    def action(ctx: Ctx) -> None:
        for _ in range(ctx.n(3, 1)):
            ctx.steady(ctx.rng.uniform(1.0, ctx.d(6.0, 2.0)))
            ev = ctx.crash(role, ctx.rng.uniform(0.5, 3.0))
            ctx.recovered(ev)

    return action


def _crash_server(name: str, down: float) -> Callable[[Ctx], None]:
    def action(ctx: Ctx) -> None:
        for _ in range(ctx.n(2, 1)):
            ctx.steady(ctx.rng.uniform(1.0, ctx.d(5.0, 2.0)))
            ev = ctx.crash(name, down)
            ctx.recovered(ev)

    return action


def sc_vps_questdb_crash(ctx: Ctx) -> None:
    """Crash the VPS QuestDB while the forwarder is spilling into it."""
    ctx.stack.set_brain_link(False)
    ev0 = ctx.fault("VPS->Brain link cut (small RAM budget: the forwarder spills)")
    try:
        spilling = poll(lambda: bool(role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_spilled_total")),
                        ctx.d(40, 25))  # fmt: skip
        if not spilling:
            ctx.problems.append("no spill started before the VPS QuestDB crash: the crash hit an idle buffer")
        ctx.steady(ctx.d(3, 2))
        ctx.crash("vps-questdb", 3.0)
        ctx.steady(ctx.d(5, 3))
    finally:
        ctx.stack.set_brain_link(True)
    spilled = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_spilled_total")
    replayed = role_metric(ctx.stack, "forwarder", "tickbridge_forwarder_replayed_total")
    ctx.evidence.append(f"spilled {spilled}, replayed {replayed}")
    ctx.recovered(ev0)


def sc_exchange_disconnect(ctx: Ctx) -> None:
    for _ in range(ctx.n(3, 1)):
        ctx.steady(ctx.rng.uniform(1.0, 4.0))
        res = ctx.stack.sim_fault("drop_connections")
        ctx.recovered(ctx.fault(f"exchange drops every connection ({res.get('result')})"))


def sc_exchange_update_gap(ctx: Ctx) -> None:
    symbols = ctx.stack.config.symbols or ("BTCUSDT", "ETHUSDT")
    for i in range(ctx.n(3, 1)):
        ctx.steady(ctx.rng.uniform(1.0, 3.0))
        sym = symbols[i % len(symbols)]
        ctx.stack.sim_fault("skip_update_ids", symbol=sym, count=5)
        ctx.recovered(ctx.fault(f"update-ID gap on {sym} (5 IDs skipped)"))
    ctx.evidence.append(f"collector metrics: {_collector_counters(ctx)}")


def sc_exchange_trade_gap(ctx: Ctx) -> None:
    symbols = ctx.stack.config.symbols or ("BTCUSDT", "ETHUSDT")
    for i in range(ctx.n(2, 1)):
        ctx.steady(ctx.rng.uniform(1.0, 3.0))
        sym = symbols[i % len(symbols)]
        ctx.stack.sim_fault("skip_trade_ids", symbol=sym, count=20)
        ctx.recovered(ctx.fault(f"20 trades of {sym} missing on the WebSocket (REST back-fill has them)"))


def sc_exchange_server_shutdown(ctx: Ctx) -> None:
    for _ in range(ctx.n(2, 1)):
        ctx.steady(ctx.rng.uniform(1.0, 4.0))
        ctx.stack.sim_fault("server_shutdown")
        ctx.recovered(ctx.fault("exchange sends serverShutdown, closes 1 s later"))


def sc_exchange_burst_reconnect(ctx: Ctx) -> None:
    burst = int(ctx.d(20_000, 5_000))
    for _ in range(ctx.n(2, 1)):
        ctx.steady(ctx.rng.uniform(1.0, 3.0))
        ctx.stack.sim_fault("drop_connections")
        ctx.stack.sim_fault("burst", count=burst)
        ctx.recovered(ctx.fault(f"exchange drops connections and emits a burst of {burst} trades meanwhile"))


def sc_combined(ctx: Ctx) -> None:
    """Random faults from the list, back to back (sometimes two at once), for several minutes."""
    total = ctx.d(240, 30)
    end = time.monotonic() + total
    kinds = ["kill-collector", "kill-forwarder", "kill-consumer", "kill-writer", "link-cut", "link-latency",
             "vps-redis", "brain-redis", "brain-questdb", "exchange-drop", "exchange-shutdown", "exchange-burst",
             "link-cut+kill-consumer"]  # fmt: skip
    last: FaultEvent | None = None
    while time.monotonic() < end:
        ctx.steady(ctx.rng.uniform(0.5, 3.0))
        kind = ctx.rng.choice(kinds)
        if kind.startswith("kill-"):
            last = ctx.crash(kind.removeprefix("kill-"), ctx.rng.uniform(0.2, 2.0))
        elif kind == "link-cut":
            last = ctx.link_cut(ctx.rng.uniform(1.0, 6.0))
        elif kind == "link-latency":
            last = ctx.fault("link latency +200 ms for 4 s")
            toxic(ctx.stack, "lat", "latency", {"latency": 200, "jitter": 50}, "upstream")
            try:
                ctx.steady(4.0)
            finally:
                remove_toxic(ctx.stack, "lat")
        elif kind in ("vps-redis", "brain-redis", "brain-questdb"):
            last = ctx.crash(kind, 2.0)
        elif kind == "exchange-drop":
            ctx.stack.sim_fault("drop_connections")
            last = ctx.fault("exchange drops every connection")
        elif kind == "exchange-shutdown":
            ctx.stack.sim_fault("server_shutdown")
            last = ctx.fault("exchange serverShutdown")
        elif kind == "exchange-burst":
            ctx.stack.sim_fault("drop_connections")
            ctx.stack.sim_fault("burst", count=3000)
            last = ctx.fault("exchange drop + burst of 3000 trades")
        elif kind == "link-cut+kill-consumer":
            last = ctx.fault("link cut 3 s while the consumer is killed")
            ctx.stack.set_brain_link(False)
            try:
                ctx.crash("consumer", 1.0)
                ctx.steady(2.0)
            finally:
                ctx.stack.set_brain_link(True)
    if last is not None:
        ctx.recovered(last)


def _collector_counters(ctx: Ctx) -> str:
    proc = ctx.stack.roles.get("collector")
    if proc is None:
        return "n/a"
    from tickbridge_dev.devstack.faults import scrape_metrics

    with contextlib.suppress(Exception):
        m = scrape_metrics(proc.metrics_port)
        picked = {k: v for k, v in m.items() if any(w in k for w in ("resync", "gap", "backfill", "reconnect"))}
        return ", ".join(f"{k}={v:g}" for k, v in sorted(picked.items())) or "no resync/gap counters exported"
    return "unavailable"


@dataclass
class Scenario:
    name: str
    description: str
    action: Callable[[Ctx], None]
    ram_buffer_bytes: int | None = None
    #: Put `LinkProxy` in front of the VPS->Brain link (resets, refused connects, segment loss).
    link_proxy: bool = False
    #: Exchanges beside Binance this scenario's stack runs (issue 18), each with its simulator and own roles.
    venues: tuple[str, ...] = ()


SCENARIOS: list[Scenario] = [
    Scenario("brain_outage_ram", "Brain unreachable (VPS->Brain link cut) for 1 minute: the backlog stays in "
             "VPS Redis and is forwarded after the link returns.", sc_brain_outage_ram),
    Scenario("brain_outage_spill", "Brain unreachable long enough to exceed a small RAM budget "
             f"(RAM_BUFFER_BYTES={SMALL_RAM_BUDGET}): the forwarder spills to the VPS QuestDB and replays.",
             sc_brain_outage_spill, ram_buffer_bytes=SMALL_RAM_BUDGET),
    Scenario("link_flap", "Flapping link: cut for 2 s every 5 s.", sc_link_flap),
    Scenario("link_latency", "High latency between VPS and Brain (toxiproxy latency toxic).", sc_link_latency),
    Scenario("link_bandwidth", "Low bandwidth between VPS and Brain (toxiproxy bandwidth toxic).", sc_link_bandwidth),
    Scenario("kill_collector", "kill -9 of the collector at random instants, restarted.", _kill_role("collector")),
    Scenario("kill_forwarder", "kill -9 of the forwarder at random instants, restarted.", _kill_role("forwarder")),
    Scenario("kill_consumer", "kill -9 of the consumer at random instants, restarted.", _kill_role("consumer")),
    Scenario("kill_writer", "kill -9 of the writer at random instants, restarted.", _kill_role("writer")),
    Scenario("vps_redis_crash", "VPS Redis kill -9, restarted from its AOF (everysec).",
             _crash_server("vps-redis", 2.0)),
    Scenario("brain_redis_crash", "Brain Redis kill -9, restarted from its AOF (everysec).",
             _crash_server("brain-redis", 2.0)),
    Scenario("brain_questdb_crash", "Brain QuestDB kill -9, restarted.", _crash_server("brain-questdb", 3.0)),
    Scenario("vps_questdb_crash", "VPS QuestDB kill -9 while the forwarder is spilling into it, restarted.",
             sc_vps_questdb_crash, ram_buffer_bytes=SMALL_RAM_BUDGET),
    Scenario("exchange_disconnect", "Exchange drops every WebSocket connection.", sc_exchange_disconnect),
    Scenario("exchange_update_gap", "Exchange skips order-book update IDs (the collector must resync the book; "
             "trades unaffected).", sc_exchange_update_gap),
    Scenario("exchange_trade_gap", "Exchange leaves trades out of the WebSocket stream (REST still has them).",
             sc_exchange_trade_gap),
    Scenario("exchange_server_shutdown", "Exchange sends `serverShutdown` and closes.", sc_exchange_server_shutdown),
    Scenario("exchange_burst_reconnect", "A trade burst while the collector reconnects.", sc_exchange_burst_reconnect),
    Scenario("link_reset", "The link resets (TCP RST) every connection a few times under load; then an outage "
             "that swallows everything (15 s), then resets every connection and resets or refuses every new one "
             f"(30 s), with RAM_BUFFER_BYTES={SMALL_RAM_BUDGET} so the forwarder spills. No role may exit.",
             sc_link_reset, ram_buffer_bytes=SMALL_RAM_BUDGET, link_proxy=True),
    *[Scenario(f"link_loss_{pct}", f"{pct} % segment loss on the link both ways for 45 s, emulated by the link "
               "proxy (netem is unavailable): a lost 1448-byte segment arrives one retransmission timeout later "
               "(200 ms, doubled each time it is lost again, as TCP's RTO backoff) and every byte behind it waits.",
               _link_loss(pct / 100), link_proxy=True) for pct in (1, 5, 10)],
    Scenario("vps_power_cut", "Whole-VPS power cut: collector, forwarder, VPS Redis and VPS QuestDB kill -9 at once "
             "(the exchange and the Brain stay up), all restarted together; once in steady flow, once while the "
             "link is down and the forwarder spills.", sc_vps_power_cut, ram_buffer_bytes=SMALL_RAM_BUDGET),
    Scenario("brain_outage_fastforward", "Issue 16: the link is cut (exchange at 8,000 trades/s meanwhile) until "
             "the forwarder holds >= 500,000 entries, part spilled; then back at the chaos rate. From 5 s after the "
             "return until the catch-up ends, recent(symbol, 1) for every symbol every 0.5 s must be fresh "
             "(p99 <= 1 s behind the live flow).", sc_brain_outage_fastforward, ram_buffer_bytes=FF_RAM_BUDGET),
    Scenario("brain_outage_fastforward_kills", "brain_outage_fastforward with kill -9 of the forwarder (the "
             "replaying process) and then of the consumer once each during the catch-up; fresh over all samples.",
             sc_brain_outage_fastforward_kills, ram_buffer_bytes=FF_RAM_BUDGET),
    Scenario("brain_outage_fastforward_cut", "brain_outage_fastforward with kill -9 of the live-lane process "
             "(its gap reported), then a 3 s link cut during the catch-up; fresh outside those windows.",
             sc_brain_outage_fastforward_cut, ram_buffer_bytes=FF_RAM_BUDGET),
    *[Scenario(name, desc, action, venues=venues) for name, desc, action, venues in VENUE_SCENARIOS],
    Scenario("combined", "Random process kills, server crashes, link cuts and latency, and exchange faults, back "
             "to back (sometimes two at once), for several minutes.", sc_combined),
]  # fmt: skip
BY_NAME = {s.name: s for s in SCENARIOS}


# -- running -------------------------------------------------------------------------------------------------
def _stack_config(opts: ChaosOptions, ram_buffer_bytes: int | None, workdir: Path,
                  link_proxy: bool = False, venues: tuple[str, ...] = ()) -> StackConfig:  # fmt: skip
    return StackConfig(source="sim", rate=0.0, symbols=opts.symbols, seed=opts.seed, with_prometheus=False,
                       with_toxiproxy=True, with_link_proxy=link_proxy, ram_buffer_bytes=ram_buffer_bytes,
                       workdir=workdir, venues=venues, venue_rate=0.0)  # fmt: skip


def _drain_and_check(stack: NativeStack, opts: ChaosOptions, on_poll: Callable[[], None] | None = None
                     ) -> tuple[oracle.OracleReport, float | None, int]:  # fmt: skip
    """Pause every exchange, wait until the Brain holds every trade, run the oracle per exchange: one report,
    a venue's symbols named `<exchange>:<SYMBOL>`."""
    t = time.monotonic()
    expected: dict[str, dict[str, tuple[int, int]]] = {}
    for exchange in stack.exchanges:
        _retry(functools.partial(stack.sim_fault, "pause", exchange))
    for exchange in stack.exchanges:
        stats: dict[str, Any] = _retry(functools.partial(stack.sim_stats, exchange))
        expected[exchange] = oracle.expected_from_sim_stats(stats)
    total = sum(last - first + 1 for exp in expected.values() for first, last in exp.values())
    drained = poll(lambda: oracle.count_trades(stack.brain_questdb.url) >= total, opts.drain_timeout, 0.5, on_poll)
    drain_s = time.monotonic() - t if drained else None
    symbols: list[oracle.SymbolResult] = []
    for exchange, exp in expected.items():
        rep: oracle.OracleReport = _retry(
            functools.partial(oracle.check_trades, stack.brain_questdb.url, exp, exchange=exchange)
        )
        if exchange != keys.EXCHANGE:
            for s in rep.symbols:
                s.symbol = f"{exchange}:{s.symbol}"
        symbols += rep.symbols
    return oracle.OracleReport(symbols), drain_s, total


def _per_exchange(rep: oracle.OracleReport) -> str:
    """The oracle's figures per exchange, for the evidence of a scenario with venues."""
    parts = []
    for exchange in keys.EXCHANGES:
        mine = [s for s in rep.symbols if (s.symbol.partition(":")[0] if ":" in s.symbol else keys.EXCHANGE)
                == exchange]  # fmt: skip
        if mine:
            r = oracle.OracleReport(mine)
            parts.append(f"{exchange} {r.expected} trades: lost {r.lost}, duplicated {r.duplicated}, "
                         f"out of order {r.out_of_order}")  # fmt: skip
    return "oracle per exchange: " + "; ".join(parts)


def _retry(call: Callable[[], Any], attempts: int = 8) -> Any:
    """The oracle's HTTP reads, retried on transient answers (a 429 or 5xx once ended an oracle run)."""
    for i in range(attempts):
        try:
            return call()
        except urllib.error.HTTPError as exc:
            if i == attempts - 1 or not (exc.code == 429 or exc.code >= 500):
                raise RuntimeError(f"HTTP {exc.code} from {exc.url}") from exc
            console.print(f"  [yellow]HTTP {exc.code} from {exc.url}: retrying")
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if i == attempts - 1:
                raise
        time.sleep(min(10.0, 0.5 * 2**i))
    raise AssertionError("unreachable")


def run_scenario(sc: Scenario, stack: NativeStack, opts: ChaosOptions, rng: random.Random,
                 before: tuple[int, int, int, int]) -> tuple[ScenarioResult, tuple[int, int, int, int]]:  # fmt: skip
    """Run one scenario on a started, loaded stack; `before` = cumulative (sent, lost, dup, ooo) so far."""
    res = ScenarioResult(sc.name, sc.description, workdir=str(stack.workdir))
    ctx = Ctx(stack, opts, rng)
    console.rule(f"[bold]{sc.name}")
    started = time.monotonic()
    try:
        ctx.steady(opts.warmup)
        sc.action(ctx)
        ctx.steady(1.0)
    except Exception as exc:
        ctx.problems.append(f"harness error: {exc!r}")
        console.print(traceback.format_exc())
    res.duration_s = round(time.monotonic() - started, 1)
    try:
        rep, drain_s, total = _drain_and_check(stack, opts, ctx.check_alive)
        res.drain_s = None if drain_s is None else round(drain_s, 2)
        if drain_s is None:
            ctx.problems.append(f"the Brain did not hold all {total} trades within {opts.drain_timeout:.0f}s")
        failing = [s for s in rep.symbols if not s.ok]
        for s in failing[:5]:
            ctx.problems.append(f"{s.symbol}: expected {s.expected}, rows {s.rows}, missing {s.missing}, "
                                f"duplicates {s.duplicates}, out of order {s.out_of_order}")  # fmt: skip
        now = (rep.expected, rep.lost, rep.duplicated, rep.out_of_order)
        if stack.config.venues:
            ctx.evidence.append(_per_exchange(rep))
    except Exception as exc:
        ctx.problems.append(f"oracle error: {exc!r}")
        now = before
    try:
        ctx.check_alive()  # a process that died during the drain fails the scenario too
    except Exception as exc:
        ctx.problems.append(f"harness error: {exc!r}")
    res.ticks_sent = now[0] - before[0]
    res.lost, res.duplicated, res.out_of_order = now[1] - before[1], now[2] - before[2], now[3] - before[3]
    res.faults = [asdict(e) for e in ctx.events]
    res.faults_summary = _summarize(ctx.events)
    recs = [e.recovery_s for e in ctx.events if e.recovery_s is not None]
    res.recovery_s = max(recs) if recs else None
    res.evidence, res.problems = ctx.evidence, ctx.problems
    res.ok = not ctx.problems and res.lost == 0 and res.duplicated == 0 and res.out_of_order == 0
    colour = "green" if res.ok else "red"
    console.print(f"[{colour}]{sc.name}: {'PASS' if res.ok else 'FAIL'}[/] sent={res.ticks_sent} lost={res.lost} "
                  f"dup={res.duplicated} ooo={res.out_of_order} recovery={res.recovery_s}s")  # fmt: skip
    for p in ctx.problems:
        console.print(f"  [red]problem:[/] {p}")
    return res, now


def _summarize(events: list[FaultEvent]) -> str:
    if not events:
        return "none"
    kinds: dict[str, int] = {}
    for e in events:
        key = e.what.split(" (")[0].split(",")[0]
        kinds[key] = kinds.get(key, 0) + 1
    return "; ".join(f"{n}× {k}" if n > 1 else k for k, n in kinds.items())


def _start(stack: NativeStack, opts: ChaosOptions) -> None:
    stack.start(ROLES)
    start_load(stack, opts.rate)
    for venue in stack.config.venues:  # each venue at the same rate, once its collector is connected
        start_venue_load(stack, venue, opts.rate)


def run(names: list[str], opts: ChaosOptions) -> dict[str, Any]:
    """Run the named scenarios; returns the report document (also written under `opts.out`)."""
    rng = random.Random(opts.seed)
    base = opts.workdir or Path(tempfile.mkdtemp(prefix="tickbridge-chaos-"))
    base.mkdir(parents=True, exist_ok=True)
    results: list[ScenarioResult] = []
    scenarios = [BY_NAME[n] for n in names]
    t_all = time.monotonic()
    machine = report.machine_info()  # at the start: the load average before this run
    if opts.shared:
        budget = next((s.ram_buffer_bytes for s in scenarios if s.ram_buffer_bytes), None)
        venues = tuple(dict.fromkeys(v for s in scenarios for v in s.venues))
        stack = NativeStack(_stack_config(opts, budget, base / "shared", any(s.link_proxy for s in scenarios),
                                          venues))  # fmt: skip
        try:
            _start(stack, opts)
            before = (0, 0, 0, 0)
            for sc in scenarios:
                res, before = run_scenario(sc, stack, opts, rng, before)
                results.append(res)
                for exchange in stack.exchanges:
                    stack.sim_fault("resume", exchange)
        finally:
            stack.stop()
    else:
        for sc in scenarios:
            workdir = base / sc.name
            stack = NativeStack(_stack_config(opts, sc.ram_buffer_bytes, workdir, sc.link_proxy, sc.venues))
            try:
                _start(stack, opts)
                res, _ = run_scenario(sc, stack, opts, rng, (0, 0, 0, 0))
            except Exception as exc:
                res = ScenarioResult(sc.name, sc.description, problems=[f"stack error: {exc!r}"],
                                     workdir=str(workdir))  # fmt: skip
                console.print(f"[red]{sc.name}: stack error {exc!r}")
            finally:
                stack.stop()
            results.append(res)
            if res.ok and not opts.keep:
                shutil.rmtree(workdir, ignore_errors=True)
    doc: dict[str, Any] = {
        "kind": "chaos",
        "machine": machine,
        "rate": opts.rate,
        "n_symbols": len(opts.symbols) or 50,
        "mode": ("quick" if opts.quick else f"full, durations x{opts.scale:g}") + (", shared stack" if opts.shared
                                                                                  else ", fresh stack per scenario"),
        "command": opts.command,
        "total_s": round(time.monotonic() - t_all, 1),
        "scenarios": [asdict(r) for r in results],
        "ok": bool(results) and all(r.ok for r in results),
        "workdir": str(base),
    }  # fmt: skip
    if opts.out is not None:
        paths = report.write_chaos_report(doc, opts.out)
        console.print(f"report: {paths['md']}")
    if doc["ok"] and opts.workdir is None and not opts.keep:
        shutil.rmtree(base, ignore_errors=True)
    return doc


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make chaos-test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--scenario", action="append", choices=list(BY_NAME), help="run only these (repeatable)")
    parser.add_argument("--quick", action="store_true", help="short fault phases")
    parser.add_argument("--shared", action="store_true", help="one stack for all scenarios")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the full fault durations")
    parser.add_argument("--rate", type=float, default=1200.0, help="steady load, trades/s")
    parser.add_argument("--symbols", help="comma-separated symbols (default: the 50 USDT pairs)")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="results folder")
    parser.add_argument("--workdir", type=Path, help="keep the stacks' files (logs) here")
    parser.add_argument("--keep", action="store_true", help="keep the logs of passing scenarios too")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--list", action="store_true", help="list the scenarios and exit")
    args = parser.parse_args(argv)
    stop_on_signals()
    if args.list:
        for sc in SCENARIOS:
            print(f"{sc.name:<26} {sc.description}")
        return
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",")) if args.symbols else ()
    opts = ChaosOptions(rate=args.rate, symbols=symbols, quick=args.quick, scale=args.scale, shared=args.shared,
                        out=args.out, seed=args.seed, workdir=args.workdir, keep=args.keep,
                        command="python -m tickbridge_dev.devstack.chaos " + shlex.join(
                            sys.argv[1:] if argv is None else argv))  # fmt: skip
    doc = run(args.scenario or [s.name for s in SCENARIOS], opts)
    for r in doc["scenarios"]:
        console.print(f"{'PASS' if r['ok'] else 'FAIL'}  {r['name']}")
    sys.exit(0 if doc["ok"] else 1)


if __name__ == "__main__":
    main()
