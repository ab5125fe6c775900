"""Chaos scenarios of issue 16 (fast-forward): `brain_outage_fastforward` and `brain_outage_fastforward_kills`.

The link is cut while the exchange runs faster than usual, until the forwarder holds a backlog of at least
500,000 entries (part of it spilled to the VPS QuestDB, by a RAM budget of `FF_RAM_BUDGET`); then the rate goes
back to the chaos rate and the link returns. From 5 s after the return until the catch-up ends, every 0.5 s,
a `TieredMarketData` embedded here (as trading code would) answers `recent(symbol, 1)` for every symbol:

- **age**: now minus the exchange time of the tick it returns (what the issue measures; a symbol that trades
  rarely has old newest ticks by nature: at 1,200 trades/s zipf-spread over 50 symbols the quietest trades
  ~5 times a second);
- **lag behind the VPS**: the newest trade time in the VPS WARM (the collector's) minus the returned one
  (how far the Brain's view is behind the live flow itself).

The catch-up ends when `catch_up()` reports it inactive (the forwarder's backlog and the consumer group's lag
are both small). The stack runs the live lane as a process of its own (`forwarder-live`, FORWARDER_LANE=live)
beside the replaying forwarder (FORWARDER_LANE=ordered). Variants, each followed by the usual oracle:

- `_kills`: kill -9 of the forwarder (the replaying process) and then of the consumer once each during the
  catch-up (each restarted at once); freshness is gated over ALL samples (the lane does not depend on either);
- `_cut`: kill -9 of the live-lane process (restarted at once: the gap until it is on again is reported), then
  a 3 s link cut during the catch-up; freshness is gated outside those two windows (during a cut nothing can
  reach the Brain, and the lane's own restart is its gap).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry

from tickbridge.brain.catchup import CatchUp
from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import now_us
from tickbridge_dev.devstack.faults import poll, role_metric, scrape_metrics
from tickbridge_dev.loadgen.fastforward import percentile

if TYPE_CHECKING:
    from tickbridge_dev.devstack.chaos import Ctx

#: RAM budget of these scenarios: ~250,000 entries stay in VPS Redis, the rest of the backlog spills.
FF_RAM_BUDGET = 30_000_000
#: Exchange rate during the cut (trades/s; the issue allows raising it to keep the run short).
CUT_RATE = 8_000.0
BACKLOG_TARGET = 500_000
FRESH_P99_S = 1.0
#: A Brain book counts as current while its last applied update is younger than this (the sampler's books line).
BOOK_CURRENT_S = 2.0


@dataclass
class FreshnessSampler:
    """`recent(symbol, 1)` for every symbol every `interval` while `measuring`, in a thread with its own loop."""

    brain_redis_url: str
    brain_questdb_url: str
    vps_redis_url: str
    symbols: tuple[str, ...]
    interval: float = 0.5
    ages: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    #: (monotonic time, age, lag) of every sample, to leave out the windows of a kill -9 (`outside`).
    timed: list[tuple[float, float, float | None]] = field(default_factory=list)
    states: list[CatchUp] = field(default_factory=list)
    #: Set by the scenario when the link returns: from then on every sample also reads every order book.
    returned_at: float | None = None
    #: (seconds after the return, books valid, books valid and current) per sample (issue 17 beside issue 16).
    books: list[tuple[float, int, int]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    measuring: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), name="ff-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(30)

    @property
    def state(self) -> CatchUp | None:
        return self.states[-1] if self.states else None

    async def _main(self) -> None:
        settings = Settings(brain_redis_url=self.brain_redis_url, brain_questdb_url=self.brain_questdb_url,
                            symbols=self.symbols)  # fmt: skip
        vps = make_client(self.vps_redis_url)
        try:
            async with TieredMarketData(settings, self.symbols, CollectorRegistry()) as md:
                while not self._stop.is_set():
                    try:
                        await self._sample(md, vps)
                    except Exception as exc:  # a sampler reports, it does not stop the run
                        self.errors.append(repr(exc))
                    await asyncio.sleep(self.interval)
        finally:
            await vps.aclose()

    async def _sample(self, md: TieredMarketData, vps: Any) -> None:
        self.states.append(await md.catch_up())
        if self.returned_at is not None:
            await self._sample_books(md)
        if not self.measuring:
            return
        warm = await execute_packed(vps, [["ZRANGE", keys.warm_key(s), -1, -1, "WITHSCORES"] for s in self.symbols])
        now = now_us()
        for sym, reply in zip(self.symbols, warm, strict=True):
            answer = await md.recent(sym, 1)
            if not answer.rows:
                continue
            newest = answer.rows[-1].timestamp
            age, lag = max(0.0, (now - newest) / 1e6), None
            self.ages.append(age)
            if reply and not isinstance(reply, BaseException):
                score = reply[0][1] if isinstance(reply[0], list) else reply[1]
                lag = max(0.0, (float(score) - newest) / 1e6)
                self.lags.append(lag)
            self.timed.append((time.monotonic(), age, lag))

    async def _sample_books(self, md: TieredMarketData) -> None:
        """How many books are valid, and valid with a last update under `BOOK_CURRENT_S` old."""
        assert self.returned_at is not None
        at, now = time.monotonic() - self.returned_at, now_us()
        valid = current = 0
        for sym in self.symbols:
            book = await md.book(sym, 1)
            if book.valid:
                valid += 1
                current += (now - book.timestamp) / 1e6 < BOOK_CURRENT_S
        self.books.append((at, valid, current))

    def books_summary(self) -> str:
        """When every book was valid and current for good after the return (the last sample that was not)."""
        n = len(self.symbols)
        if not self.books:
            return "order books: not sampled"
        bad = [b for b in self.books if b[2] < n]
        worst = min(self.books, key=lambda b: b[2])
        if not bad:
            return f"order books: all {n} valid and current (< {BOOK_CURRENT_S:.0f}s) at every sample after the return"
        last_bad = bad[-1][0]
        return (f"order books: all {n} valid and current (last update < {BOOK_CURRENT_S:.0f}s old) from "
                f"{last_bad:.1f}s after the return on (worst sample at {worst[0]:.1f}s: {worst[1]} valid, "
                f"{worst[2]} current; {len(bad)} of {len(self.books)} samples short)")  # fmt: skip

    def outside(self, windows: list[tuple[float, float]]) -> tuple[list[float], list[float]]:
        """Ages and lags of the samples taken outside `windows` (monotonic start, end)."""
        kept = [(a, lag) for t, a, lag in self.timed if not any(lo <= t <= hi for lo, hi in windows)]
        return [a for a, _ in kept], [lag for _, lag in kept if lag is not None]

    def summary(self) -> str:
        return f"{len(self.ages)} samples; age {dist(self.ages)}; lag behind the VPS {dist(self.lags)}"

    def stale_spans(self, limit_s: float = FRESH_P99_S) -> str:
        """When samples were older than `limit_s`: spans in seconds after the return (where to look in the logs)."""
        t0 = self.returned_at or 0.0
        spans: list[list[float]] = []
        for t, age, _ in self.timed:
            if age <= limit_s:
                continue
            at = t - t0
            if spans and at - spans[-1][1] <= 1.5:
                spans[-1][1], spans[-1][2] = at, max(spans[-1][2], age)
                spans[-1][3] += 1
            else:
                spans.append([at, at, age, 1])
        if not spans:
            return f"no sample older than {limit_s:.0f}s"
        shown = ", ".join(f"{a:.1f}-{b:.1f}s (worst {w:.1f}s, {n:.0f} samples)" for a, b, w, n in spans[:8])
        return f"samples older than {limit_s:.0f}s, after the return: {shown}" + (" ..." if len(spans) > 8 else "")


def dist(values: list[float]) -> str:
    return (f"p50 {percentile(values, 0.5):.3f}s p99 {percentile(values, 0.99):.3f}s "
            f"max {max(values, default=float('nan')):.3f}s")  # fmt: skip


def _labelled(stack: Any, role: str, name: str) -> float | None:
    proc = stack.roles.get(role)
    if proc is None:
        return None
    try:
        return scrape_metrics(proc.metrics_port).get(name)
    except Exception:
        return None


#: Faults during the catch-up per variant: (fault, seconds after the return); a fault in WINDOWED leaves its
#: samples out of the gate (from the fault until 2 s after it ended).
FAULTS: dict[str, tuple[tuple[str, float], ...]] = {
    "plain": (),
    "kills": (("forwarder", 8), ("consumer", 16)),
    "cut": (("forwarder-live", 8), ("link", 16)),
}
WINDOWED = ("forwarder-live", "link")


def outage(ctx: Ctx, variant: str) -> None:
    """The scenario (see the module docstring)."""
    stack = ctx.stack
    symbols = tuple(stack.config.symbols) or Settings().symbols
    sampler = FreshnessSampler(stack.brain_redis.url, stack.brain_questdb.url, stack.vps_redis.url, symbols)
    sampler.start()
    windows: list[tuple[float, float]] = []
    try:
        _run(ctx, sampler, FAULTS[variant], windows)
    finally:
        sampler.stop()
    ctx.evidence.append(f"recent(symbol, 1) from 5 s after the return until the catch-up ended: {sampler.summary()}")
    ctx.evidence.append(sampler.stale_spans())
    if sampler.errors:
        ctx.evidence.append(f"sampler errors: {len(sampler.errors)}, first {sampler.errors[0]}")
    ages, lags = sampler.ages, sampler.lags
    if windows:
        # During a link cut nothing reaches the Brain, live or not; a killed lane is its own reported gap.
        ages, lags = sampler.outside(windows)
        ctx.evidence.append(f"outside the live lane's kill window and the link cut (each until 2 s after the end): "
                            f"{len(ages)} samples; age {dist(ages)}; lag behind the VPS {dist(lags)}")  # fmt: skip
    if not sampler.ages:
        ctx.problems.append("no freshness samples: the catch-up ended before 5 s after the return")
        return
    gates = [("lag behind the VPS", lags)]
    if variant == "kills":  # the acceptance line: recent()'s age over ALL samples, the kills included
        gates.append(("age", ages))
    for what, values in gates:
        p99 = percentile(values, 0.99)
        if not p99 <= FRESH_P99_S:
            ctx.problems.append(f"live ticks not fresh during the catch-up: {what} p99 {p99:.3f}s > "
                                f"{FRESH_P99_S}s")  # fmt: skip


def _fault(ctx: Ctx, fault: str, windows: list[tuple[float, float]], t_back: float) -> None:
    """One fault during the catch-up; a windowed one's window goes to `windows`."""
    t_fault = time.monotonic()
    ctx.evidence.append(f"{fault} fault {t_fault - t_back:.1f}s after the return")
    if fault == "link":
        ctx.link_cut(3.0, " during the catch-up")
    else:
        ctx.crash(fault, 0.5)
    if fault == "forwarder-live":

        def lane_on() -> bool:
            return role_metric(ctx.stack, "forwarder-live", "tickbridge_forwarder_live_active") == 1

        on = poll(lane_on, 30, 0.05)
        gap = time.monotonic() - t_fault
        ctx.evidence.append(f"kill -9 of the live lane: on again {gap:.2f}s after the kill (0.5 s down, then its "
                            f"start and re-prime){'' if on else ' (NOT on after 30 s)'}")  # fmt: skip
        if not on:
            ctx.problems.append("the live lane did not come back after its kill -9")
    if fault in WINDOWED:
        windows.append((t_fault, time.monotonic() + 2.0))


def _run(ctx: Ctx, sampler: FreshnessSampler, faults: tuple[tuple[str, float], ...],
         windows: list[tuple[float, float]]) -> None:  # fmt: skip
    """The cut, the return, the catch-up with `faults` (windows of the WINDOWED ones appended to `windows`)."""
    stack, opts = ctx.stack, ctx.opts
    target = ctx.n(BACKLOG_TARGET, 60_000)
    ev = ctx.fault(f"VPS->Brain link cut until the forwarder holds >= {target} entries (exchange at "
                   f"{CUT_RATE:.0f}/s during the cut, RAM_BUFFER_BYTES={FF_RAM_BUDGET})")  # fmt: skip
    stack.set_brain_link(False)
    t_cut = time.monotonic()
    try:
        stack.sim_request("POST", "/_sim/rate", {"rate": CUT_RATE})

        def backlog_built() -> bool:
            return (role_metric(stack, "forwarder", "tickbridge_forwarder_backlog_entries") or 0) >= target

        if not poll(backlog_built, ctx.d(600, 120), 0.5, ctx.check_alive):
            ctx.problems.append(f"the backlog did not reach {target} entries during the cut")
        stack.sim_request("POST", "/_sim/rate", {"rate": opts.rate})
        backlog = role_metric(stack, "forwarder", "tickbridge_forwarder_backlog_entries")
        spilled = role_metric(stack, "forwarder", "tickbridge_forwarder_spilled_total")
    finally:
        stack.set_brain_link(True)
    t_back = sampler.returned_at = time.monotonic()
    ev.what += f" (link down {t_back - t_cut:.1f}s)"
    ctx.evidence.append(f"backlog at the return: {backlog} entries, {spilled} spilled to the VPS QuestDB")
    if not spilled:
        ctx.problems.append("nothing spilled to the VPS QuestDB: the scenario did not test the buffer replay")

    def connected() -> bool:
        return _labelled(stack, "forwarder", "tickbridge_forwarder_connected{target=brain}") == 1

    if poll(connected, 30, 0.05):
        ctx.evidence.append(f"forwarder reconnected {time.monotonic() - t_back:.2f}s after the link returned")
    done = {fault: False for fault, _ in faults}
    lane_lags: list[float] = []  # the lane's own delay (`forwarder_live_lag_seconds` while it is on)
    vps_done: float | None = None  # when the forwarder's backlog fell under the live lane's threshold
    try:
        while time.monotonic() - t_back < ctx.d(900, 300):
            ctx.check_alive()
            sampler.measuring = time.monotonic() - t_back >= 5.0
            if sampler.measuring and role_metric(stack, "forwarder-live", "tickbridge_forwarder_live_active") == 1:
                lane_lags.append(role_metric(stack, "forwarder-live", "tickbridge_forwarder_live_lag_seconds") or 0.0)
            if vps_done is None and (role_metric(stack, "forwarder", "tickbridge_forwarder_backlog_entries")
                                     or 1e9) < 5_000:  # fmt: skip
                vps_done = time.monotonic() - t_back
            state = sampler.state
            if state is not None and not state.active and (state.vps_age_s or 99) < 3 and all(done.values()):
                break
            for fault, after in faults:
                if not done[fault] and time.monotonic() - t_back > after:
                    done[fault] = True
                    if state is not None and not state.active:
                        ctx.problems.append(f"the catch-up ended before the {fault} fault: it was not tested")
                    _fault(ctx, fault, windows, t_back)
            time.sleep(0.25)
        else:
            ctx.problems.append("the catch-up did not end")
    finally:
        sampler.measuring = False
    took = time.monotonic() - t_back
    ctx.evidence.append(f"catch-up ended {took:.1f}s after the link returned (catch_up() inactive: the forwarder's "
                        "backlog and the consumer group's lag both under 5,000)")  # fmt: skip
    if vps_done is not None and backlog:
        ctx.evidence.append(f"the forwarder's backlog was under 5,000 entries {vps_done:.1f}s after the return: "
                            f"{backlog / vps_done:,.0f} entries/s of backlog with the live flow on (reconnect "
                            "included)")  # fmt: skip
    ctx.evidence.append(f"the live lane's own delay (newest entry it sent, scraped every 0.25 s while on): "
                        f"{len(lane_lags)} samples, {dist(lane_lags)}")  # fmt: skip
    spilled_end = role_metric(stack, "forwarder", "tickbridge_forwarder_spilled_total")
    ctx.evidence.append(f"spilled in all: {spilled_end} (at the return: {spilled})")
    ctx.evidence.append(sampler.books_summary())
    ctx.recovered(ev)


def sc_brain_outage_fastforward(ctx: Ctx) -> None:
    outage(ctx, "plain")


def sc_brain_outage_fastforward_kills(ctx: Ctx) -> None:
    outage(ctx, "kills")


def sc_brain_outage_fastforward_cut(ctx: Ctx) -> None:
    outage(ctx, "cut")
