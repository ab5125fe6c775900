"""`make demo`: the whole VPS + Brain pipeline on this machine with a live status in the terminal.

Fed by the bundled simulator (or the real exchange with `--source binance`). Ctrl-C stops every
process cleanly (roles drain and flush first); nothing is left running. With `--duration N --check`
it runs unattended, then pauses the simulator, waits for the pipeline to drain and runs the
contract's check query against the Brain's QuestDB.
"""

from __future__ import annotations

import argparse
import sys
import time

from rich.console import Console
from rich.table import Table

from tickbridge.core import keys
from tickbridge.core.settings import DEFAULT_SYMBOLS
from tickbridge.ops.status import Endpoints, watch
from tickbridge_dev.devstack import oracle
from tickbridge_dev.devstack.servers import stop_on_signals
from tickbridge_dev.devstack.stack import NativeStack, StackConfig

console = Console()


def check_query_table(stack: NativeStack) -> Table:
    """The contract's zero-loss/zero-duplicate query (per exchange and symbol), as a table."""
    rows = stack.brain_sql(
        "SELECT exchange, symbol, count(), count_distinct(trade_id), max(trade_id) - min(trade_id) + 1 FROM trades "
        "GROUP BY exchange, symbol ORDER BY exchange, symbol"
    )
    table = Table(title="SELECT exchange, symbol, count(), count_distinct(trade_id), max(trade_id) - min(trade_id) + 1")
    for col in ("exchange", "symbol", "count", "distinct", "span", "equal"):
        table.add_column(col, justify="right")
    for exchange, symbol, count, distinct, span in rows:
        equal = "yes" if count == distinct == span else "NO"
        table.add_row(exchange, symbol, str(count), str(distinct), str(span), equal)
    return table


def drain_and_check(stack: NativeStack, timeout: float = 120.0) -> oracle.OracleReport:
    """Pause the exchange, wait until the Brain holds everything, then run the oracle (Binance's)."""
    return drain_and_check_all(stack, timeout)[keys.EXCHANGE]


def drain_and_check_all(stack: NativeStack, timeout: float = 120.0) -> dict[str, oracle.OracleReport]:
    """Pause every exchange's simulator, wait until the Brain holds all they sent, then the oracle per exchange."""
    for exchange in stack.exchanges:
        stack.sim_fault("pause", exchange)
    reports = {}
    for exchange in stack.exchanges:
        expected = oracle.expected_from_sim_stats(stack.sim_stats(exchange))
        total = sum(last - first + 1 for first, last in expected.values())
        url = stack.brain_questdb.url
        try:
            stack.wait_for(lambda: oracle.count_trades(url, exchange=exchange) >= total, timeout,  # noqa: B023
                           f"{total} {exchange} trades in QuestDB")  # fmt: skip
        except TimeoutError as exc:  # the oracle says what is missing
            console.print(f"[red]{exc}[/]")
        reports[exchange] = oracle.check_trades(url, expected, exchange=exchange)
    return reports


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make demo", description=__doc__)
    parser.add_argument("--source", choices=("sim", "binance"), default="sim")
    parser.add_argument("--rate", type=float, default=1200.0, help="simulator trades/s across all symbols")
    parser.add_argument("--symbols", help="comma-separated symbols (default: the 50 USDT pairs)")
    parser.add_argument("--duration", type=float, help="run this many seconds, then stop (default: until Ctrl-C)")
    parser.add_argument("--check", action="store_true", help="at the end, drain and verify no loss/duplicates")
    parser.add_argument("--venues", default="",
                        help="exchanges beside Binance, e.g. coinbase,kraken: each gets its simulator, collector, "
                        "forwarder and consumer (SOURCE=sim only)")  # fmt: skip
    parser.add_argument("--venue-rate", type=float, help="trades/s of each venue simulator (default: --rate)")
    args = parser.parse_args(argv)
    stop_on_signals()

    symbols = tuple(s.strip().upper() for s in args.symbols.split(",")) if args.symbols else ()
    venues = tuple(v.strip() for v in args.venues.split(",") if v.strip() and v.strip() != keys.EXCHANGE)
    unknown = [v for v in venues if v not in keys.EXCHANGES]
    if unknown or (venues and args.source != "sim"):
        parser.error(f"--venues: {', '.join(unknown) or 'SOURCE=sim only'} (known: {', '.join(keys.EXCHANGES)})")
    stack = NativeStack(StackConfig(source=args.source, rate=args.rate, symbols=symbols, with_reader=True,
                                    venues=venues, venue_rate=args.venue_rate))  # fmt: skip
    ok = True
    try:
        with console.status("starting Redis x2, QuestDB x2, simulator, collector, forwarder (+ live lane), consumer, "
                            "writer, Prometheus ..."):  # fmt: skip
            t0 = time.monotonic()
            stack.start()
        console.print(f"[green]pipeline up in {time.monotonic() - t0:.1f}s[/] — workdir {stack.workdir}")
        console.print(f"  VPS Redis {stack.vps_redis.url}  Brain Redis {stack.brain_redis.url}")
        console.print(f"  VPS QuestDB {stack.vps_questdb.url}  Brain QuestDB {stack.brain_questdb.url}")
        if stack.prometheus is not None:
            console.print(f"  Prometheus {stack.prometheus.url}")
        if stack.alertmanager is not None:
            console.print(f"  Alertmanager {stack.alertmanager.url}")
        procs = {name: proc for name, proc in stack.roles.items()}
        if stack.sim is not None:
            procs = {"sim": stack.sim, **stack.venue_sims, **procs}
        endpoints = Endpoints(
            vps_redis_url=stack.vps_redis.url, brain_redis_url=stack.brain_redis.url,
            vps_questdb_url=stack.vps_questdb.url, brain_questdb_url=stack.brain_questdb.url,
            sim_url=f"http://127.0.0.1:{stack.sim_port}" if stack.sim is not None else None,
            prometheus_url=stack.prometheus.url if stack.prometheus is not None else None, processes=procs,
            symbols=symbols or DEFAULT_SYMBOLS, exchanges=stack.exchanges if venues else (),
        )  # fmt: skip
        try:
            watch(endpoints, title=f"tickbridge demo ({args.source})", duration=args.duration)
        except KeyboardInterrupt:
            console.print("stopping ...")
        if args.check and stack.sim is not None:
            reports = drain_and_check_all(stack)
            console.print(check_query_table(stack))
            for exchange, report in reports.items():
                console.print(f"oracle {exchange}: {report.summary()}")
            ok = all(report.ok for report in reports.values())
    except KeyboardInterrupt:
        console.print("stopping ...")
    finally:
        stack.cleanup()
        console.print("all processes stopped")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
