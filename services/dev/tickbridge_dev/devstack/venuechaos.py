"""Issue 18: the Coinbase and Kraken chaos scenarios of `make chaos-test` (registered in `chaos.SCENARIOS`).

Each runs the chaos stack with the venue beside Binance (its own simulator, collector, forwarder and consumer,
`StackConfig.venues`), every exchange at the chaos rate, and ends with the same oracle as the Binance
scenarios, per exchange: every trade each simulator emitted is in the Brain's QuestDB once, in ID order per
symbol. Per venue: a disconnect, its book fault (Coinbase: a `level2` `sequence_num` gap, every book of the
connection resyncs; Kraken: a CRC32 checksum mismatch, that book resyncs) and missed trades (Coinbase:
back-filled by trade ID over REST; Kraken: back-filled by time, kept by trade ID; the trades REST no longer
holds would be counted in `lost_trades_total` and alerted by `TradesLost`, which this oracle would see as
lost: the simulator here keeps 100,000 per symbol, so all are back-filled). `venue_down_kraken`: Kraken's
simulator stopped for a minute while Binance and Coinbase flow: their QuestDB rate and end-to-end latency
during it are compared with before it.
"""

from __future__ import annotations

import os
import signal
import statistics
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tickbridge_dev.devstack import oracle
from tickbridge_dev.devstack.faults import poll, role_metric, scrape_metrics, sim_trades_total
from tickbridge_dev.devstack.stack import NativeStack, role_name

if TYPE_CHECKING:
    from tickbridge_dev.devstack.chaos import Ctx

#: Missed trades per fault (as `tests/test_venues_pipeline.py`).
MISSED = 40
#: During the outage the others' QuestDB rate must stay above this share of their rate before it ...
MIN_RATE_SHARE = 0.8
#: ... and their p90 end-to-end latency under this many times the one before it (or `LATENCY_FLOOR_S`).
MAX_LATENCY_FACTOR = 2.0
LATENCY_FLOOR_S = 3.0


def start_venue_load(stack: NativeStack, venue: str, rate: float, timeout: float = 120.0) -> None:
    """Once the venue's collector is connected, set its simulator's rate (it starts at 0: steady state only)."""
    if not poll(lambda: int(stack.sim_stats(venue).get("connections", 0)) >= 1, timeout):
        raise TimeoutError(f"the {venue} collector did not connect to its simulator within {timeout:.0f}s")
    stack.sim_request("POST", "/_sim/rate", {"rate": rate}, venue)


def collector_metric(ctx: Ctx, venue: str, name: str) -> float:
    return role_metric(ctx.stack, role_name("collector", venue), name) or 0.0


def _symbols(ctx: Ctx) -> tuple[str, ...]:
    return ctx.stack.config.symbols or ("BTCUSDT", "ETHUSDT", "BNBUSDT")


def _venue_counters(ctx: Ctx, venue: str) -> str:
    proc = ctx.stack.roles.get(role_name("collector", venue))
    if proc is None:
        return "n/a"
    words = ("resync", "gap", "backfill", "lost", "reconnect", "book_valid")
    try:
        m = scrape_metrics(proc.metrics_port)
    except Exception as exc:
        return f"unavailable ({exc!r})"
    sums: dict[str, float] = {}
    for k, v in m.items():
        name = k.split("{")[0]
        if any(w in name for w in words):
            sums[name] = sums.get(name, 0.0) + v
    return ", ".join(f"{k}={v:g}" for k, v in sorted(sums.items()))


def _disconnect(venue: str) -> Callable[[Ctx], None]:
    def action(ctx: Ctx) -> None:
        for _ in range(ctx.n(3, 1)):
            ctx.steady(ctx.rng.uniform(1.0, 4.0))
            res = ctx.stack.sim_fault("drop_connections", venue)
            ctx.recovered(ctx.fault(f"{venue} drops every connection ({res.get('result')})"))
        reconnects = collector_metric(ctx, venue, "tickbridge_collector_reconnects_total")
        ctx.evidence.append(f"{venue} collector: {_venue_counters(ctx, venue)}")
        if reconnects < 1:
            ctx.problems.append(f"the {venue} collector counted no reconnect: the disconnect was not seen")

    return action


def _book_fault(venue: str) -> Callable[[Ctx], None]:
    """Coinbase: `skip_sequence` (2 `l2_data` frames lost per connection: a `sequence_num` gap, every book of the
    connection resubscribes `level2`); Kraken: `corrupt_checksum` on one symbol (a CRC32 mismatch, that book
    resubscribes). Each time the resyncs must rise and every book be valid again."""

    def action(ctx: Ctx) -> None:
        symbols = _symbols(ctx)
        valid = "tickbridge_collector_book_valid"
        books = len(symbols) if ctx.stack.config.symbols else 50
        if not poll(lambda: collector_metric(ctx, venue, valid) >= books, 60.0, 0.5, ctx.check_alive):
            ctx.problems.append(f"{venue}: not every book valid before the fault "
                                f"({collector_metric(ctx, venue, valid):g} of {books})")  # fmt: skip
        for i in range(ctx.n(3, 1)):
            ctx.steady(ctx.rng.uniform(1.0, 3.0))
            before = collector_metric(ctx, venue, "tickbridge_collector_resyncs_total")
            if venue == "coinbase":
                ctx.stack.sim_fault("skip_sequence", venue, count=2)
                ev = ctx.fault("coinbase loses 2 level2 frames of every connection (a sequence_num gap)")
            else:
                sym = symbols[i % len(symbols)]
                ctx.stack.sim_fault("corrupt_checksum", venue, symbol=sym, count=1)
                ev = ctx.fault(f"kraken sends one {sym} book message with a wrong CRC32 checksum")
            resynced = poll(lambda b=before: collector_metric(ctx, venue, "tickbridge_collector_resyncs_total") > b,  # type: ignore[misc]
                            30.0, 0.25, ctx.check_alive)  # fmt: skip
            whole = poll(lambda: collector_metric(ctx, venue, valid) >= books, 60.0, 0.25, ctx.check_alive)
            if not resynced:
                ctx.problems.append(f"{venue}: no book resync after: {ev.what}")
            if not whole:
                ctx.problems.append(f"{venue}: books not all valid again within 60 s after: {ev.what}")
            ctx.recovered(ev)
        ctx.evidence.append(f"{venue} collector: {_venue_counters(ctx, venue)}")

    return action


def _missed_trades(venue: str) -> Callable[[Ctx], None]:
    how = "by trade ID (REST `after=`)" if venue == "coinbase" else "by time (REST `Trades?since=`), kept by ID"

    def action(ctx: Ctx) -> None:
        symbols = _symbols(ctx)
        times = ctx.n(2, 1)
        for i in range(times):
            ctx.steady(ctx.rng.uniform(1.0, 3.0))
            sym = symbols[i % len(symbols)]
            ctx.stack.sim_fault("skip_trades", venue, symbol=sym, count=MISSED)
            ctx.recovered(ctx.fault(f"{MISSED} {venue} trades of {sym} missing on the WebSocket (back-filled {how})"))
        # `ctx.recovered` waits for the Binance trades only (`wait_caught_up`), and the collector sees a hole when
        # the symbol's next trade arrives, then back-fills: wait for its count to get there (read at once, it raced
        # the back-fill: 40 of 80 in one run, 80 a moment later; the oracle had every trade exactly once).
        expected = MISSED * times
        poll(lambda: collector_metric(ctx, venue, "tickbridge_collector_backfilled_trades_total") >= expected,
             60.0, 0.25, ctx.check_alive)  # fmt: skip
        backfilled = collector_metric(ctx, venue, "tickbridge_collector_backfilled_trades_total")
        lost = collector_metric(ctx, venue, "tickbridge_collector_lost_trades_total")
        ctx.evidence.append(f"{venue} collector: {_venue_counters(ctx, venue)}")
        if backfilled < expected:
            ctx.problems.append(f"{venue}: {backfilled:g} trades back-filled within 60 s, expected >= {expected}")
        if lost:
            ctx.problems.append(f"{venue}: {lost:g} trades counted lost (REST should hold them all here)")

    return action


def _sample(stack: NativeStack, exchanges: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """(emitted, rows in the Brain's QuestDB) per exchange, now."""
    out = {}
    for e in exchanges:
        emitted = sim_trades_total(stack.sim_stats(e))
        out[e] = (emitted, oracle.count_trades(stack.brain_questdb.url, exchange=e))
    return out


def _window(series: list[tuple[float, int, int]], start: float, end: float) -> dict[str, float | None]:
    """Rows/s visible in QuestDB and end-to-end latency (from a count of trades emitted until that many rows are
    visible: exchange -> ... -> QuestDB, at the sampling step) over [start, end)."""
    pts = [p for p in series if start <= p[0] < end]
    rate = (pts[-1][2] - pts[0][2]) / (pts[-1][0] - pts[0][0]) if len(pts) >= 2 and pts[-1][0] > pts[0][0] else None
    lat = []
    for t, emitted, _ in pts:
        later = next((t2 for t2, _, rows in series if t2 >= t and rows >= emitted), None)
        if later is not None:
            lat.append(later - t)
    p90 = statistics.quantiles(lat, n=10)[-1] if len(lat) >= 2 else (lat[0] if lat else None)
    return {"rows_per_s": rate, "latency_p50_s": statistics.median(lat) if lat else None, "latency_p90_s": p90,
            "latency_max_s": max(lat) if lat else None, "samples": len(pts)}  # fmt: skip


def _fmt_window(w: dict[str, float | None]) -> str:
    def f(x: float | None, spec: str) -> str:
        return "?" if x is None else format(x, spec)

    return (f"{f(w['rows_per_s'], ',.0f')} rows/s, latency p50 {f(w['latency_p50_s'], '.2f')} s, "
            f"p90 {f(w['latency_p90_s'], '.2f')} s, max {f(w['latency_max_s'], '.2f')} s")  # fmt: skip


def venue_down(down: str) -> Callable[[Ctx], None]:
    """`down`'s simulator stopped (SIGSTOP: its connections and REST hang, as a venue that stopped answering)
    for a minute; the others' rows/s and latency sampled every 0.5 s before and during it. The baseline is the
    last 15 s of 30 before the outage (the stack has settled from its start by then)."""

    def action(ctx: Ctx) -> None:
        st = ctx.stack
        others = tuple(e for e in st.exchanges if e != down)
        series: dict[str, list[tuple[float, int, int]]] = {e: [] for e in others}
        t0 = time.monotonic()
        load: list[float] = []

        def run(seconds: float) -> None:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                ctx.check_alive()
                for e, (emitted, rows) in _sample(st, others).items():
                    series[e].append((time.monotonic() - t0, emitted, rows))
                load.append(os.getloadavg()[0])
                time.sleep(0.5)

        before_s, baseline_s, down_s = ctx.d(30, 8), ctx.d(15, 5), ctx.d(60, 15)
        run(before_s)
        t_down = time.monotonic() - t0
        sim = st.venue_sims[down]
        ev = ctx.fault(f"{down} down: its simulator stopped (SIGSTOP) for {down_s:.0f}s while {', '.join(others)} flow")
        ctx.expected_down.add(sim.name)
        os.kill(sim.pid, signal.SIGSTOP)
        try:
            run(down_s)
        finally:
            os.kill(sim.pid, signal.SIGCONT)
            ctx.expected_down.discard(sim.name)
        t_up = time.monotonic() - t0
        run(ctx.d(10, 5))  # the latency of the last samples of the outage needs the rows after it
        figures: dict[str, Any] = {}
        for e in others:
            before = _window(series[e], t_down - baseline_s, t_down)
            during = _window(series[e], t_down + 5.0, t_up)  # from 5 s in, as venueload
            figures[e] = {"before": before, "during": during}
            ctx.evidence.append(f"{e} before the outage: {_fmt_window(before)}; during it: {_fmt_window(during)}")
            rate_b, rate_d = before["rows_per_s"], during["rows_per_s"]
            if rate_b is None or rate_d is None or rate_d < MIN_RATE_SHARE * rate_b:
                ctx.problems.append(f"{e}: rows/s during the {down} outage {rate_d} < {MIN_RATE_SHARE:.0%} of "
                                    f"before ({rate_b})")  # fmt: skip
            lat_b, lat_d = before["latency_p90_s"], during["latency_p90_s"]
            limit = max(LATENCY_FLOOR_S, MAX_LATENCY_FACTOR * (lat_b or 0.0))
            if lat_d is None or lat_d > limit:
                ctx.problems.append(f"{e}: latency p90 during the {down} outage {lat_d} s > {limit:.2f} s "
                                    f"(before: {lat_b} s)")  # fmt: skip
        ctx.evidence.append(f"load average (1 min) during the samples: max {max(load):.2f}, "
                            f"mean {statistics.fmean(load):.2f}")  # fmt: skip
        ctx.evidence.append(f"{down} collector after the outage: {_venue_counters(ctx, down)}")
        ctx.recovered(ev)

    return action


#: (name, description, action, venues) of each scenario; `chaos.SCENARIOS` makes them `Scenario`s.
VENUE_SCENARIOS: list[tuple[str, str, Callable[[Ctx], None], tuple[str, ...]]] = [
    ("coinbase_disconnect", "Coinbase drops every WebSocket connection (3 times): the collector reconnects, "
     "resubscribes; the market_trades snapshot and the back-fill by ID close the hole.",
     _disconnect("coinbase"), ("coinbase",)),
    ("coinbase_sequence_gap", "Coinbase loses 2 level2 frames of every connection (a sequence_num gap, 3 times): "
     "every book of the connection resubscribes level2 and is valid again; trades unaffected.",
     _book_fault("coinbase"), ("coinbase",)),
    ("coinbase_missed_trades", f"{MISSED} Coinbase trades of a symbol left out of market_trades (twice): back-filled "
     "by trade ID over the Exchange REST API, nothing counted lost.", _missed_trades("coinbase"), ("coinbase",)),
    ("kraken_disconnect", "Kraken drops every WebSocket connection (3 times): the collector reconnects, "
     "resubscribes; the trade snapshot (50) and the back-fill by time close the hole.",
     _disconnect("kraken"), ("kraken",)),
    ("kraken_checksum_mismatch", "Kraken sends a book message with a wrong CRC32 checksum (3 times, one symbol each): "
     "that book resubscribes and is valid again; trades unaffected.", _book_fault("kraken"), ("kraken",)),
    ("kraken_missed_trades", f"{MISSED} Kraken trades of a symbol left out of the trade channel (twice): back-filled "
     "by time (REST Trades since the last trade seen, kept by trade ID). Trades REST no longer holds would be "
     "counted in lost_trades_total and alerted (TradesLost): not here, the simulator keeps 100,000 per symbol.",
     _missed_trades("kraken"), ("kraken",)),
    ("venue_down_kraken", "Three exchanges at the chaos rate each; Kraken's simulator stopped (SIGSTOP) for a minute: "
     f"Binance's and Coinbase's QuestDB rows/s stay >= {MIN_RATE_SHARE:.0%} of the 15 s before and their p90 "
     f"end-to-end latency <= max({LATENCY_FLOOR_S:g} s, {MAX_LATENCY_FACTOR:g} x before); then 0 lost / 0 dup / "
     "order for all three.", venue_down("kraken"), ("coinbase", "kraken")),
]  # fmt: skip
