"""`make load-test EXCHANGES=3 SYMBOLS=150 RATE=1200 DURATION=60`: several exchanges at once (issue 18).

Starts the native stack with Binance and the venues (`coinbase`, `kraken`): one simulator per exchange, each
exchange with its own collector, forwarder and consumer (its own stream on both hosts), one writer for all.
Once every collector is connected, each chosen exchange's simulator runs at RATE trades/s over SYMBOLS symbols
for DURATION seconds. Sampled each second: trades each simulator emitted and each exchange's rows in the Brain's
QuestDB `trades`, and the host's load average. Then every simulator pauses, the Brain drains, and the oracle runs
per exchange (every trade emitted in QuestDB exactly once, in trade-ID order per symbol). Writes
`venues-load-<n>x<rate>.md/.json` to the results folder.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from rich.console import Console

from tickbridge.core import keys
from tickbridge.core.settings import DEFAULT_SYMBOLS
from tickbridge_dev.devstack import oracle, report
from tickbridge_dev.devstack.demo import drain_and_check_all
from tickbridge_dev.devstack.faults import poll
from tickbridge_dev.devstack.servers import stop_on_signals
from tickbridge_dev.devstack.stack import NativeStack, StackConfig

console = Console(stderr=True)


def symbols_for(spec: str | None) -> tuple[str, ...]:
    """`150`: the 50 default pairs and synthetic `S001USDT`... up to that many; a list: those symbols."""
    if not spec:
        return DEFAULT_SYMBOLS
    if spec.strip().isdigit():
        n = int(spec)
        extra = tuple(f"S{i:03d}USDT" for i in range(1, max(n - len(DEFAULT_SYMBOLS), 0) + 1))
        return (DEFAULT_SYMBOLS + extra)[:n]
    return tuple(s.strip().upper() for s in spec.split(",") if s.strip())


def exchanges_for(spec: str) -> tuple[str, ...]:
    """`3`: every exchange; `2`: Binance and Coinbase; a list: those (known names only)."""
    if spec.strip().isdigit():
        return keys.EXCHANGES[: max(1, min(int(spec), len(keys.EXCHANGES)))]
    chosen = tuple(e.strip() for e in spec.split(",") if e.strip())
    unknown = [e for e in chosen if e not in keys.EXCHANGES]
    if unknown or not chosen:
        raise SystemExit(f"--exchanges: unknown {', '.join(unknown) or '(none)'} (known: {', '.join(keys.EXCHANGES)})")
    return chosen


def rows_per_exchange(stack: NativeStack) -> dict[str, int]:
    rows = oracle.export_csv(stack.brain_questdb.url, "SELECT exchange, count() FROM trades GROUP BY exchange")
    return {r[0]: int(r[1]) for r in rows}


def delivered(brain: redis.Redis, exchange: str) -> int:
    """Entries ever added to the exchange's Brain stream (the forwarder's deliveries; trimming does not lower it)."""
    try:
        info: dict[str, Any] = brain.xinfo_stream(keys.stream_key_for(exchange))
    except redis.ResponseError:  # no stream yet
        return 0
    return int(info.get("entries-added", info.get("length", 0)))


def emitted(stack: NativeStack, exchange: str) -> int:
    return int(stack.sim_stats(exchange)["totals"]["trades"])


def _rate(series: list[tuple[float, int]], start: float, end: float) -> float | None:
    pts = [(t, c) for t, c in series if start <= t <= end]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return None
    return (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0])


@dataclass(frozen=True)
class Outage:
    """One exchange down (its simulator stopped with SIGSTOP: connections and REST hang, as a venue that stopped
    answering) from `at` for `seconds` while the others keep flowing."""

    exchange: str
    at: float = 15.0
    seconds: float = 60.0

    def active(self, t: float) -> bool:
        return self.at <= t < self.at + self.seconds


def run(exchanges: tuple[str, ...], symbols: tuple[str, ...], rate: float, duration: float, warmup: float,
        out: Path, workdir: Path | None, command: str, outage: Outage | None = None) -> dict[str, Any]:  # fmt: skip
    machine = report.machine_info()
    work = workdir or Path(tempfile.mkdtemp(prefix="tickbridge-venueload-"))
    venues = tuple(e for e in exchanges if e != keys.EXCHANGE)
    cfg = StackConfig(source="sim", rate=0.0, venue_rate=0.0, symbols=symbols, venues=venues, with_prometheus=False,
                      workdir=work)  # fmt: skip
    stack = NativeStack(cfg)
    doc: dict[str, Any] = {"kind": "venues-load", "exchanges": list(exchanges), "symbols": len(symbols),
                           "rate_per_exchange": rate, "duration_s": duration, "command": command,
                           "machine": machine, "loadavg_before": os.getloadavg()}  # fmt: skip
    try:
        t0 = time.monotonic()
        stack.start()
        for exchange in exchanges:  # every trade is made while the pipeline is up: steady state, not cold start
            if not poll(lambda e=exchange: int(stack.sim_stats(e).get("connections", 0)) >= 1, 120):  # type: ignore[misc]
                raise TimeoutError(f"the {exchange} collector did not connect within 120 s")
        time.sleep(1.0)
        console.print(f"stack up in {time.monotonic() - t0:.1f}s: {', '.join(exchanges)} x {len(symbols)} symbols")
        for exchange in exchanges:
            stack.sim_request("POST", "/_sim/rate", {"rate": rate}, exchange)
        series: dict[str, list[tuple[float, int]]] = {e: [] for e in exchanges}
        rows: dict[str, list[tuple[float, int]]] = {e: [] for e in exchanges}
        brain_series: dict[str, list[tuple[float, int]]] = {e: [] for e in exchanges}
        brain = redis.Redis.from_url(stack.brain_redis.url)
        load: list[tuple[float, float]] = []
        start = time.monotonic()
        down = False
        while (now := time.monotonic() - start) < duration:
            if outage is not None and outage.active(now) != down:
                down = not down
                sim = stack.sim if outage.exchange == keys.EXCHANGE else stack.venue_sims[outage.exchange]
                assert sim is not None
                os.kill(sim.pid, signal.SIGSTOP if down else signal.SIGCONT)
                console.print(f"{now:.0f}s: {outage.exchange} {'down' if down else 'back'}")
            for exchange in exchanges:
                if not (down and outage is not None and exchange == outage.exchange):  # a stopped sim answers nothing
                    series[exchange].append((now, emitted(stack, exchange)))
                brain_series[exchange].append((time.monotonic() - start, delivered(brain, exchange)))
            counts = rows_per_exchange(stack)
            for exchange in exchanges:
                rows[exchange].append((time.monotonic() - start, counts.get(exchange, 0)))
            load.append((now, os.getloadavg()[0]))
            time.sleep(max(0.0, 1.0 - (time.monotonic() - start - now)))
        doc["loadavg_during"] = {"max_1m": max(v for _, v in load), "last_1m": load[-1][1]} if load else {}
        t_drain = time.monotonic()
        reports = drain_and_check_all(stack, timeout=600.0)
        doc["drain_s"] = round(time.monotonic() - t_drain, 1)
        per: dict[str, Any] = {}
        for exchange in exchanges:
            r = reports[exchange]
            per[exchange] = {
                "exchange_rate": _rate(series[exchange], warmup, duration),
                "brain_stream_rate": _rate(brain_series[exchange], warmup, duration),
                "questdb_rate": _rate(rows[exchange], warmup, duration),
                "expected": r.expected, "rows": r.rows, "lost": r.lost, "duplicated": r.duplicated,
                "out_of_order": r.out_of_order, "ok": r.ok,
            }  # fmt: skip
        if outage is not None:  # the others during the outage, against their own rate before it
            doc["outage"] = {"exchange": outage.exchange, "at_s": outage.at, "seconds": outage.seconds}
            for exchange in exchanges:
                before = _rate(brain_series[exchange], warmup, outage.at)
                during = _rate(brain_series[exchange], outage.at + 5, outage.at + outage.seconds)
                per[exchange]["brain_stream_rate_before_outage"] = before
                per[exchange]["brain_stream_rate_during_outage"] = during
        doc["per_exchange"] = per
        brain.close()
        doc["pass"] = all(p["ok"] for p in per.values())
        doc["loadavg_after"] = os.getloadavg()
    finally:
        stack.cleanup()
    if doc.get("pass") and workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    elif not doc.get("pass"):
        doc["notes"] = [f"stack files and logs kept in {work}"]
    write(doc, out)
    return doc


def _n(x: float | None) -> str:
    return "?" if x is None else f"{x:,.0f}"


def write(doc: dict[str, Any], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    name = f"venues-load-{len(doc['exchanges'])}x{int(doc['rate_per_exchange'])}"
    if "outage" in doc:
        name += f"-{doc['outage']['exchange']}-down"
    (out / f"{name}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    lines = [f"# Load test: {len(doc['exchanges'])} exchanges x {doc['symbols']} symbols x "
             f"{doc['rate_per_exchange']:g} trades/s each, {doc['duration_s']:g} s", "",
             f"`{doc['command']}` — {'PASS' if doc.get('pass') else 'FAIL'}", "",
             "Rates over the run after the warm-up: trades the exchange emitted, entries the forwarder added to the "
             "exchange's Brain stream (Binance's also carry depth diffs and whole books; the venues' trades only), "
             "rows visible in QuestDB `trades` (WAL applied: lags under load, then drains). The oracle runs after the "
             "drain.",
             "",
             "| exchange | emitted /s | Brain stream /s | QuestDB visible /s | expected | rows | lost | duplicated | "
             "out of order |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for exchange, p in doc.get("per_exchange", {}).items():
        lines.append(f"| {exchange} | {_n(p['exchange_rate'])} | {_n(p.get('brain_stream_rate'))} | "
                     f"{_n(p['questdb_rate'])} | {p['expected']:,} | "
                     f"{p['rows']:,} | {p['lost']} | {p['duplicated']} | {p['out_of_order']} |")  # fmt: skip
    if "outage" in doc:
        o = doc["outage"]
        lines += ["", f"Outage: {o['exchange']} down (simulator stopped) from {o['at_s']:g} s for {o['seconds']:g} s. "
                  "Brain stream entries/s of each exchange before it and during it (from 5 s in):", "",
                  "| exchange | before /s | during /s |", "|---|---|---|"]  # fmt: skip
        for exchange, p in doc["per_exchange"].items():
            lines.append(f"| {exchange} | {_n(p['brain_stream_rate_before_outage'])} | "
                         f"{_n(p['brain_stream_rate_during_outage'])} |")  # fmt: skip
    m = doc["machine"]
    lines += ["", f"Load average (1 min) before {doc['loadavg_before'][0]:.2f}, during max "
              f"{doc.get('loadavg_during', {}).get('max_1m', float('nan')):.2f}, drain {doc.get('drain_s')} s; "
              f"{m.get('nproc', '?')} vCPU, {m.get('cpu_model', '?')}, commit {m.get('git_commit', '?')}."]  # fmt: skip
    lines += [f"- {note}" for note in doc.get("notes", [])]
    path = out / f"{name}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make load-test EXCHANGES=3", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--exchanges", default="3", help="a count (3: binance_spot,coinbase,kraken) or a list")
    parser.add_argument("--rate", type=float, default=1200.0, help="trades/s of each exchange")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--symbols", help="a count (150: the 50 default pairs + S001USDT...) or a list")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds left out of the rates")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="results folder")
    parser.add_argument("--workdir", type=Path, help="keep the stack's files (logs) here")
    parser.add_argument("--outage", help="an exchange to take down for --outage-s from --outage-at (chaos)")
    parser.add_argument("--outage-at", type=float, default=15.0)
    parser.add_argument("--outage-s", type=float, default=60.0)
    args = parser.parse_args(argv)
    outage = Outage(args.outage, args.outage_at, args.outage_s) if args.outage else None
    if outage is not None and outage.at + outage.seconds + 5 > args.duration:
        parser.error("--duration must outlast the outage by 5 s at least")
    stop_on_signals()
    command = "python -m tickbridge_dev.devstack.venueload " + shlex.join(sys.argv[1:] if argv is None else argv)
    doc = run(exchanges_for(args.exchanges), symbols_for(args.symbols), args.rate, args.duration, args.warmup,
              args.out, args.workdir, command, outage)  # fmt: skip
    for exchange, p in doc.get("per_exchange", {}).items():
        console.print(f"{exchange}: emitted {p['exchange_rate'] or 0:,.0f}/s, Brain stream "
                      f"{p['brain_stream_rate'] or 0:,.0f}/s, QuestDB {p['questdb_rate'] or 0:,.0f}/s, "
                      f"lost {p['lost']}, duplicated {p['duplicated']}, out of order {p['out_of_order']}")  # fmt: skip
    console.print("[green]PASS[/]" if doc.get("pass") else "[red]FAIL[/]")
    sys.exit(0 if doc.get("pass") else 1)


if __name__ == "__main__":
    main()
