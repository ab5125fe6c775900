"""`python -m tickbridge_dev.bench.writer_cadence`: what the writer's flush interval costs QuestDB, and how
soon a committed row is visible (issue 20, WRITER_FLUSH_INTERVAL_S).

One QuestDB server with the committed tuning (`servers.QUESTDB_TUNING`). Per case (rate, interval): the
Brain's `trades` table afresh (DDL, DEDUP), then `--seconds` of rows at `rate` rows/s, one ILP-over-HTTP
transaction every `interval` (the writer's shape when its reads come back short), built and flushed the way
the writer does (a thread for the blocking flush). Once a second the harness follows one commit until
`count()` shows it: "commit -> visible" is QuestDB's WAL apply (plus the probe's poll step, 5 ms); the
probe's queries are the same few per second in every case. Printed per case: commits/s, rows per commit,
QuestDB core-µs per row (all its threads), this process's core-µs per row (building + flushing), the flush
round trip and commit -> visible (ms), with the 1-min load average. The cases run in order, then in reverse
order (A, B, C, C, B, A), so a drifting shared host weighs on every case alike.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import time

from questdb.ingress import Sender, TimestampMicros

from tickbridge.core.questdb_io import QuestDBHttp, ilp_conf
from tickbridge.core.wire import TRADES_DDL
from tickbridge_dev.bench.questdb import SYMBOLS, cpu_s
from tickbridge_dev.devstack.servers import QuestDBServer

#: Poll step of the visibility probe.
PROBE_STEP_S = 0.005


async def _visible_after(http: QuestDBHttp, rows: int, committed: float, timeout: float = 10.0) -> float | None:
    """Seconds from `committed` (monotonic) until `count()` reaches `rows`, or None on timeout."""
    while time.monotonic() - committed < timeout:
        if await http.scalar("SELECT count() FROM trades") >= rows:
            return time.monotonic() - committed
        await asyncio.sleep(PROBE_STEP_S)
    return None


async def one_case(server: QuestDBServer, http: QuestDBHttp, *, rate: float, interval: float, seconds: float
                   ) -> dict[str, float]:  # fmt: skip
    """Flush `rate * interval` rows every `interval` for `seconds`; see the module docstring."""
    await http.exec("DROP TABLE IF EXISTS trades")
    await http.exec(TRADES_DDL)
    await asyncio.sleep(1.0)
    per_flush = max(1, round(rate * interval))
    flush_s: list[float] = []
    visible_s: list[float] = []
    probes: list[asyncio.Task[float | None]] = []
    sent = commits = 0
    base_us = time.time_ns() // 1000
    with Sender.from_conf(ilp_conf(server.url)) as sender:
        q0, c0, start = cpu_s(server.pid), time.process_time(), time.monotonic()
        next_probe = start
        buf = sender.new_buffer()
        while (now := time.monotonic()) - start < seconds:
            for j in range(sent, sent + per_flush):
                ts = TimestampMicros(base_us + j)
                buf.row(
                    "trades", symbols={"exchange": "binance_spot", "symbol": SYMBOLS[j % len(SYMBOLS)], "side": "BUY"},
                    columns={"price": 100.0 + j % 7, "volume": 0.5, "trade_id": j, "recv_ts": ts}, at=ts,
                )  # fmt: skip
            t = time.perf_counter()
            await asyncio.to_thread(sender.flush, buf, clear=True, transactional=True)
            flush_s.append(time.perf_counter() - t)
            sent += per_flush
            commits += 1
            if now >= next_probe:
                next_probe += 1.0
                probes.append(asyncio.create_task(_visible_after(http, sent, time.monotonic())))
            ahead = start + commits * interval - time.monotonic()
            if ahead > 0:
                await asyncio.sleep(ahead)
        elapsed = time.monotonic() - start
        for got in await asyncio.gather(*probes):
            if got is not None:
                visible_s.append(got)
        q_cpu, c_cpu = cpu_s(server.pid) - q0, time.process_time() - c0
    return {
        "commits_per_s": commits / elapsed,
        "rows_per_commit": per_flush,
        "questdb_us_per_row": q_cpu / sent * 1e6,
        "client_us_per_row": c_cpu / sent * 1e6,
        "flush_ms_p50": statistics.median(flush_s) * 1000,
        "visible_ms_p50": statistics.median(visible_s) * 1000 if visible_s else float("nan"),
        "visible_ms_max": max(visible_s) * 1000 if visible_s else float("nan"),
        "probes": len(visible_s),
    }


async def run(rates: list[float], intervals: list[float], seconds: float, rounds: int, conf: dict[str, str]) -> None:
    server = QuestDBServer(extra_conf=conf)
    server.start()
    http = QuestDBHttp(server.url)
    try:
        await asyncio.sleep(3.0)  # start-up work is not the cases' cost
        cases = [(r, i) for r in rates for i in intervals]
        print(f"{'rate/s':>7} {'interval s':>10} {'commits/s':>9} {'rows/commit':>11} {'QuestDB µs/row':>14} "
              f"{'writer µs/row':>13} {'flush ms p50':>12} {'visible ms p50':>14} {'max':>6} {'load1':>6}")  # fmt: skip
        for n in range(rounds):
            for rate, interval in cases if n % 2 == 0 else reversed(cases):
                r = await one_case(server, http, rate=rate, interval=interval, seconds=seconds)
                print(f"{rate:>7.0f} {interval:>10.3f} {r['commits_per_s']:>9.1f} {r['rows_per_commit']:>11.0f} "
                      f"{r['questdb_us_per_row']:>14.2f} {r['client_us_per_row']:>13.2f} {r['flush_ms_p50']:>12.1f} "
                      f"{r['visible_ms_p50']:>14.1f} {r['visible_ms_max']:>6.0f} {os.getloadavg()[0]:>6.2f}",
                      flush=True)  # fmt: skip
    finally:
        await http.close()
        server.stop()


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rates", type=_floats, default=[1200.0, 10_000.0], help="rows/s, comma-separated")
    parser.add_argument("--intervals", type=_floats, default=[0.05, 0.1, 0.2, 0.5], help="seconds, comma-separated")
    parser.add_argument("--seconds", type=float, default=20.0, help="per case")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the cases, alternating their order")
    parser.add_argument("--conf", action="append", default=[], metavar="KEY=VALUE",
                        help="server.conf setting on top of the committed tuning (repeatable)")  # fmt: skip
    opts = parser.parse_args(argv)
    conf = dict(item.split("=", 1) for item in opts.conf)
    asyncio.run(run(opts.rates, opts.intervals, opts.seconds, opts.rounds, conf))


if __name__ == "__main__":
    main()
