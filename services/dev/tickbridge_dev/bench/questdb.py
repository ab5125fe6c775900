"""`python -m tickbridge_dev.bench.questdb`: QuestDB's own CPU on this machine, idle and per ILP row, with the
committed worker settings (`servers.QUESTDB_TUNING`) against QuestDB's defaults, alternated (A, B, A, B).

Per round: a fresh server; its CPU (utime + stime of every thread, `/proc/<pid>/stat`) over `--idle` seconds
with nothing connected; then the Brain's `trades` table (DDL, DEDUP) and `--rows` rows by ILP over HTTP at
`--rate` rows/s in batches of `--batch` (the writer's shape), until every row is applied (WAL writer txn =
sequencer txn, `count()` = rows). Printed: idle % of a core, core-µs per row under load, apply lag after
the last flush, with the 1-min load average next to each round (a shared machine drifts).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time
from pathlib import Path

from questdb.ingress import Sender, TimestampMicros

from tickbridge.core.questdb_io import QuestDBHttp, ilp_conf
from tickbridge.core.wire import TRADES_DDL
from tickbridge_dev.devstack.servers import QUESTDB_TUNING, QuestDBServer

_TICK_S = os.sysconf("SC_CLK_TCK")
SYMBOLS = [f"S{i:02d}USDT" for i in range(50)]


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of a process, all threads."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK_S


async def _applied(http: QuestDBHttp, rows: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        res = await http.exec("SELECT count() FROM trades")
        if res["dataset"][0][0] >= rows:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"trades did not reach {rows} rows in {timeout:.0f}s")


async def one_round(conf: dict[str, str], *, idle_s: float, rows: int, rate: float, batch: int) -> dict[str, float]:
    """Idle CPU %, core-µs per row and apply lag (ms) of one fresh server with `conf` on top of the base."""
    server = QuestDBServer(extra_conf=conf, tuned=False)
    server.start()
    try:
        await asyncio.sleep(3.0)  # start-up work (tables, caches) is not idle cost
        c0, t0 = cpu_s(server.pid), time.monotonic()
        await asyncio.sleep(idle_s)
        idle_pct = (cpu_s(server.pid) - c0) / (time.monotonic() - t0) * 100
        http = QuestDBHttp(server.url)
        await http.exec(TRADES_DDL)
        now = time.time_ns() // 1000
        c0 = cpu_s(server.pid)
        start = time.monotonic()
        with Sender.from_conf(ilp_conf(server.url)) as sender:
            for i in range(0, rows, batch):
                for j in range(i, min(rows, i + batch)):
                    sym = SYMBOLS[j % len(SYMBOLS)]
                    sender.row(
                        "trades", symbols={"exchange": "binance_spot", "symbol": sym, "side": "BUY"},
                        columns={"price": 100.0 + j % 7, "volume": 0.5, "trade_id": j,
                                 "recv_ts": TimestampMicros(now + j)},
                        at=TimestampMicros(now + j),
                    )  # fmt: skip
                sender.flush()
                ahead = start + (i + batch) / rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        flushed = time.monotonic()
        await _applied(http, rows)
        lag_ms = (time.monotonic() - flushed) * 1000
        per_row = (cpu_s(server.pid) - c0) / rows * 1e6
        await http.close()
        return {"idle_pct": idle_pct, "us_per_row": per_row, "apply_lag_ms": lag_ms}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="A/B pairs")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle measurement")
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=10_000.0, help="ILP rows/s")
    parser.add_argument("--batch", type=int, default=1000)
    opts = parser.parse_args(argv)
    variants = {"defaults": {}, "tuned": dict(QUESTDB_TUNING)}
    print(f"{'variant':<9} {'idle % core':>11} {'core-µs/row':>11} {'apply lag ms':>12} {'load1':>6}")
    for _ in range(opts.rounds):
        for name, conf in variants.items():
            r = asyncio.run(one_round(conf, idle_s=opts.idle, rows=opts.rows, rate=opts.rate, batch=opts.batch))
            print(f"{name:<9} {r['idle_pct']:>11.1f} {r['us_per_row']:>11.2f} {r['apply_lag_ms']:>12.0f} "
                  f"{os.getloadavg()[0]:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
