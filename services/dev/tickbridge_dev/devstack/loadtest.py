"""`make load-test RATE=10000 DURATION=60`: the real pipeline under a given trade rate, measured.

Starts the whole native stack (Redis x2 with AOF, QuestDB x2, the simulator as the exchange, collector,
forwarder, consumer, writer), drives the simulator at RATE trades/s across the symbols for DURATION seconds
and samples, without disturbing the run much: the rate at each hop (stream counters, QuestDB row count),
end-to-end latency per trade (exchange time vs the Brain entry's arrival ID), the live path in µs per hop
from the collector's receive time with each hop's share and the one-Redis-hop floor (`hopwatch.py`,
after the warm-up), QuestDB visibility, CPU% and RSS per process, Redis memory. Then it pauses the
exchange, waits for the Brain to hold everything and runs
the oracle (loss, duplicates, order by trade ID). Writes `load-<rate>.md/.json/.png` to the results folder.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil  # type: ignore[import-untyped]
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from tickbridge.core.settings import DEFAULT_SYMBOLS
from tickbridge_dev.devstack import oracle, report
from tickbridge_dev.devstack.faults import LatencySample, Probe, scrape_metrics, sim_trades_total, start_load
from tickbridge_dev.devstack.hopwatch import HOPS as WATCHED_HOPS
from tickbridge_dev.devstack.hopwatch import HopWatch
from tickbridge_dev.devstack.servers import stop_on_signals
from tickbridge_dev.devstack.stack import NativeStack, StackConfig

console = Console(stderr=True)
HOPS = ("exchange", "vps_stream", "brain_stream", "brain_trades", "questdb")


@dataclass
class LoadOptions:
    rate: float
    duration: float
    out: Path = report.RESULTS_DIR
    symbols: tuple[str, ...] = ()
    #: Seconds excluded from the rate and latency figures (connections, snapshots, JIT warm-up).
    warmup: float = 5.0
    sample_interval: float = 0.5
    drain_timeout: float = 300.0
    #: Acceptance: achieved rate at the exchange and at the Brain's QuestDB within this of RATE.
    tolerance: float = 0.01
    progress: bool = True
    workdir: Path | None = None
    seed: int = 1
    command: str = ""


def _latency_values(samples: list[LatencySample]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {"exchange_to_collector": [], "exchange_to_vps_stream": [],
                                   "exchange_to_brain_redis": []}  # fmt: skip
    for s in samples:
        out["exchange_to_collector"].append(s.collector_ms - s.exchange_ms)
        if not math.isnan(s.vps_ms):
            out["exchange_to_vps_stream"].append(s.vps_ms - s.exchange_ms)
        out["exchange_to_brain_redis"].append(s.brain_ms - s.exchange_ms)
    return out


def _rate_stats(series: list[tuple[float, int | None]], target: float, start: float, end: float) -> dict[str, Any]:
    """Mean rate over [start, end] from (t, cumulative count) points, plus the best 1-s window."""
    pts = [(t, c) for t, c in series if c is not None and start <= t <= end]
    if len(pts) < 2:
        return {"mean": None, "max_1s": None, "ratio": None}
    (t0, c0), (t1, c1) = pts[0], pts[-1]
    mean = (c1 - c0) / (t1 - t0) if t1 > t0 else None
    # Points are ~1 s apart: the best consecutive pair is the best 1-s window.
    best = max(((b[1] - a[1]) / (b[0] - a[0]) for a, b in itertools.pairwise(pts) if b[0] > a[0]), default=0.0)
    return {"mean": mean, "max_1s": best or None, "ratio": (mean / target) if mean is not None else None}


def run(opts: LoadOptions) -> dict[str, Any]:
    """One load run; returns the report document (also written to `opts.out`)."""
    machine = report.machine_info()
    # The simulator starts at rate 0 and gets RATE once the collector is connected (see `start_load`).
    # Logs are kept when the run fails (each process logs to <workdir>/<name>/<name>.log).
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix=f"tickbridge-load-{int(opts.rate)}-"))
    cfg = StackConfig(source="sim", rate=0.0, symbols=opts.symbols, seed=opts.seed, with_prometheus=False,
                      workdir=workdir)  # fmt: skip
    stack = NativeStack(cfg)
    notes: list[str] = []
    doc: dict[str, Any] = {}
    try:
        console.print(f"starting the stack (RATE={opts.rate:g}/s) in {stack.workdir} ...")
        t_start = time.monotonic()
        stack.start()
        start_load(stack, opts.rate)
        console.print(f"stack up and loaded in {time.monotonic() - t_start:.1f}s")
        probe = Probe(stack)
        doc = _measure(stack, probe, opts, notes)
        doc["role_metrics"] = _role_metrics(stack)
        probe.close()
    finally:
        stack.cleanup()
    if doc.get("pass") and opts.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not doc.get("pass"):
        notes.append(f"stack files and logs kept in {workdir}")
    doc.update({"kind": "load", "machine": machine, "notes": notes, "command": opts.command,
                "symbols": list(opts.symbols or DEFAULT_SYMBOLS)})  # fmt: skip
    paths = report.write_load_report(doc, opts.out)
    console.print(f"report: {paths['md']}")
    return doc


def _kept_metric(name: str) -> bool:
    """Counters, and histogram sums/counts (their ratio is the mean, e.g. a batch round trip)."""
    return "_total" in name or name.split("{")[0].endswith(("_sum", "_count"))


def _role_metrics(stack: NativeStack) -> dict[str, dict[str, float]]:
    """Every role's counters at the end (evidence: reconnects, back-fills, retries, drops)."""
    out: dict[str, dict[str, float]] = {}
    for name, proc in stack.roles.items():
        with contextlib.suppress(Exception):
            out[name] = {k: v for k, v in scrape_metrics(proc.metrics_port).items() if _kept_metric(k)}
    if stack.sim is not None:
        with contextlib.suppress(Exception):
            out["sim"] = {k: v for k, v in scrape_metrics(stack.sim.metrics_port).items() if _kept_metric(k)}
    return out


@dataclass
class Resources:
    """Per-second resource series: CPU, run-queue wait and RSS per process, the machine, Redis memory."""

    cpu: dict[str, list[float]] = field(default_factory=dict)
    waits: dict[str, list[float]] = field(default_factory=dict)
    rss: dict[str, float] = field(default_factory=dict)
    sys_cpu: list[float] = field(default_factory=list)
    other_cpu: list[float] = field(default_factory=list)
    loadavg: list[float] = field(default_factory=list)
    redis_mem: dict[str, list[float]] = field(default_factory=dict)

    def prime(self, probe: Probe) -> None:
        psutil.cpu_percent(None)
        probe.resources()  # the first call has no interval
        probe.runqueue_wait()

    def sample(self, probe: Probe, row: dict[str, Any]) -> None:
        for name, (c, r) in probe.resources().items():
            self.cpu.setdefault(name, []).append(c)
            self.rss[name] = max(self.rss.get(name, 0.0), r)
            row["cpu"][name] = round(c, 1)
        for name, w in probe.runqueue_wait().items():
            self.waits.setdefault(name, []).append(w)
        self.sys_cpu.append(psutil.cpu_percent(None))
        # CPU the rest of the machine (other work, not this stack) took, in % of one core.
        ours = sum(row["cpu"].values())
        self.other_cpu.append(max(0.0, self.sys_cpu[-1] * (psutil.cpu_count() or 1) - ours))
        self.loadavg.append(os.getloadavg()[0])
        for name, mb in probe.redis_memory_mb().items():
            if mb is not None:
                self.redis_mem.setdefault(name, []).append(mb)


def _measure(stack: NativeStack, probe: Probe, opts: LoadOptions, notes: list[str]) -> dict[str, Any]:
    series: dict[str, list[tuple[float, int | None]]] = {hop: [] for hop in HOPS}
    samples: list[LatencySample] = []
    qdb_lag: list[tuple[float, float]] = []
    timeline: list[dict[str, Any]] = []
    res = Resources()
    res.prime(probe)
    t0 = time.monotonic()
    wall0 = time.time()
    next_full = t0
    prev_counts: dict[str, Any] | None = None
    prev_t = t0
    watch: HopWatch | None = None
    redis_from: tuple[dict[str, dict[str, tuple[int, int]]], int | None] = ({}, None)
    warm_at = min(opts.warmup, opts.duration / 4)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                        console=console, disable=not opts.progress)  # fmt: skip
    with progress:
        task = progress.add_task(f"RATE={opts.rate:g}/s", total=opts.duration)
        while True:
            now = time.monotonic()
            elapsed = now - t0
            if elapsed >= opts.duration:
                break
            if watch is None and elapsed >= warm_at:
                # µs per hop from here to the end of the load window (after the warm-up, like every figure).
                watch = HopWatch(stack.vps_redis.url, stack.brain_redis.url, list(probe.symbols),
                                 stack.workdir / "hopwatch", questdb_url=stack.brain_questdb.url)  # fmt: skip
                probe.harness_pids = watch.pids()
                redis_from = (probe.commandstats(), probe.sim_trades())
            new = probe.latency_samples()
            samples += new
            if now >= next_full:
                next_full += 1.0
                counts = probe.counts()
                for hop in HOPS:
                    series[hop].append((elapsed, counts[hop]))
                if counts["questdb_newest"] is not None:
                    qdb_lag.append((elapsed, (time.time() - counts["questdb_newest"]) * 1000))
                row: dict[str, Any] = {"t": round(elapsed, 2), "rate": {}, "cpu": {}, "latency": {}}
                if prev_counts is not None and now > prev_t:
                    for hop in HOPS:
                        a, b = prev_counts.get(hop), counts.get(hop)
                        row["rate"][hop] = (b - a) / (now - prev_t) if a is not None and b is not None else None
                prev_counts, prev_t = counts, now
                res.sample(probe, row)
                window = [s for s in samples if s.brain_ms / 1000 - wall0 > elapsed - 1.0]
                lat = _latency_values(window)
                row["latency"]["exchange_to_brain_redis"] = {
                    k: v for k, v in report.percentiles(lat["exchange_to_brain_redis"]).items() if k in ("p50", "p99")
                }
                if qdb_lag:
                    row["latency"]["exchange_to_questdb"] = {"p50": qdb_lag[-1][1]}
                timeline.append(row)
                r_ex = row["rate"].get("exchange")
                r_q = row["rate"].get("questdb")
                p99 = row["latency"]["exchange_to_brain_redis"].get("p99")
                progress.update(task, completed=elapsed, description=(
                    f"RATE={opts.rate:g}/s  sim {r_ex or 0:,.0f}/s  QuestDB {r_q or 0:,.0f}/s  "
                    f"Brain p99 {0 if p99 is None or math.isnan(p99) else p99:,.0f} ms"))  # fmt: skip
            else:
                progress.update(task, completed=elapsed)
            time.sleep(max(0.0, min(opts.sample_interval, next_full - time.monotonic())))
        progress.update(task, completed=opts.duration)
    end_elapsed = time.monotonic() - t0
    redis_time = redis_command_time(redis_from, (probe.commandstats(), probe.sim_trades())) if watch else {}
    hop_samples = watch.stop() if watch is not None else {}

    # Drain: stop the exchange, wait for the Brain to hold everything, run the oracle.
    t_pause = time.monotonic()
    stack.sim_fault("pause")
    stats = stack.sim_stats()
    expected = oracle.expected_from_sim_stats(stats)
    total = sim_trades_total(stats)
    drain_s: float | None = None
    with console.status(f"draining: waiting for {total:,} trades in the Brain's QuestDB ..."):
        deadline = t_pause + opts.drain_timeout
        while time.monotonic() < deadline:
            qcount, _ = probe.questdb_count_and_newest()
            if qcount is not None and qcount >= total:
                drain_s = time.monotonic() - t_pause
                break
            time.sleep(0.25)
    if drain_s is None:
        notes.append(f"the Brain's QuestDB did not reach {total} trades within {opts.drain_timeout:.0f}s of pausing")
    result = oracle.check_trades(stack.brain_questdb.url, expected)
    console.print(f"oracle: {result.summary()}")

    warm = min(opts.warmup, end_elapsed / 4)
    rates = {hop: _rate_stats(series[hop], opts.rate, warm, end_elapsed) for hop in HOPS}
    steady = [s for s in samples if s.brain_ms / 1000 - wall0 >= warm]
    lat_values = _latency_values(steady)
    latency = {k: report.percentiles(v) for k, v in lat_values.items()}
    latency["exchange_to_questdb"] = report.percentiles([v for t, v in qdb_lag if t >= warm])
    processes = {
        name: {
            "cpu_mean": sum(v) / len(v),
            "cpu_max": max(v),
            "rss_max_mb": res.rss.get(name),
            "runqueue_wait_mean": _mean(res.waits.get(name, [])),
        }
        for name, v in sorted(res.cpu.items())
        if v
    }
    redis_memory = {
        name: {"start_mb": v[0], "max_mb": max(v), "end_mb": v[-1]} for name, v in res.redis_mem.items() if v
    }
    checks = {
        "zero loss, zero duplicates, order kept (oracle)": result.ok,
        f"simulator achieved RATE within {opts.tolerance:.0%}": _within(rates["exchange"]["ratio"], opts.tolerance),
        f"Brain QuestDB ingest rate within {opts.tolerance:.0%} of RATE": _within(
            rates["questdb"]["ratio"], opts.tolerance
        ),
        "latency percentiles measured": latency["exchange_to_brain_redis"]["n"] > 0,
        "drained after the exchange paused": drain_s is not None,
    }
    shortfall = int(stats.get("shortfall_trades") or 0)
    return {
        "verdict": verdict(checks, rates["exchange"]["ratio"], opts.tolerance, shortfall),
        "sim_shortfall_trades": shortfall,
        "rate_target": opts.rate,
        "duration_s": opts.duration,
        "warmup_s": warm,
        "rates": rates,
        "latency_ms": latency,
        "hops_us": hop_table(hop_samples),
        "processes": processes,
        "system_cpu": {
            "mean": _mean(res.sys_cpu),
            "max": max(res.sys_cpu, default=None),
            "other_work_mean_pct_of_core": _mean(res.other_cpu),
            "loadavg1_mean": _mean(res.loadavg),
        },
        "redis_memory": redis_memory,
        "redis_commands": redis_time,
        "drain_s": drain_s,
        "oracle": {
            "expected": result.expected,
            "rows": result.rows,
            "lost": result.lost,
            "duplicated": result.duplicated,
            "out_of_order": result.out_of_order,
            "ok": result.ok,
            "symbols_failing": [
                {
                    "symbol": s.symbol,
                    "expected": s.expected,
                    "rows": s.rows,
                    "missing": s.missing,
                    "duplicates": s.duplicates,
                    "out_of_order": s.out_of_order,
                }
                for s in result.symbols
                if not s.ok
            ],
        },
        "checks": checks,
        "pass": all(checks.values()),
        "timeline": timeline,
        "workdir": str(stack.workdir),
    }


def redis_command_time(
    start: tuple[dict[str, dict[str, tuple[int, int]]], int | None],
    end: tuple[dict[str, dict[str, tuple[int, int]]], int | None],
) -> dict[str, Any]:
    """Where each Redis server spent its command time over the measured window (after the warm-up): per command,
    calls and µs per trade the simulator sent in that window, and µs per call. Harness reads (hopwatch followers,
    the probe) are in it too: `INFO commandstats` is per server, so they cannot be told apart (on the Brain they
    are more than half the XREAD calls)."""
    (stats0, trades0), (stats1, trades1) = start, end
    if trades0 is None or trades1 is None or trades1 <= trades0:
        return {}
    trades = trades1 - trades0
    out: dict[str, Any] = {}
    for server, after in stats1.items():
        before = stats0.get(server, {})
        rows = {}
        for cmd, (calls, usec) in after.items():
            calls0, usec0 = before.get(cmd, (0, 0))
            if calls > calls0:
                rows[cmd] = {
                    "calls_per_1000_trades": (calls - calls0) * 1000 / trades,
                    "us_per_trade": (usec - usec0) / trades,
                    "us_per_call": (usec - usec0) / (calls - calls0),
                }
        ordered = dict(sorted(rows.items(), key=lambda kv: -kv[1]["us_per_trade"]))
        # No total: a Lua function's or a transaction's time includes the commands it runs, counted again.
        out[server] = {"trades": trades, "commands": ordered}
    return out


def verdict(checks: dict[str, bool], sim_ratio: float | None, tolerance: float, shortfall: int) -> str:
    """One line: PASS, or whom a FAIL is about. The simulator short of RATE means the machine could not even
    make the load (its generator loop ran late and skipped trades): the relay was not tried at RATE."""
    if all(checks.values()):
        return "PASS"
    failed = [name for name, ok in checks.items() if not ok and not name.startswith("simulator")]
    if not _within(sim_ratio, tolerance) or shortfall:
        return (f"FAIL: machine too slow: the simulator itself made {(sim_ratio or 0) * 100:.1f} % of RATE "
                f"({shortfall:,} trades skipped by its late loop), so this run does not measure the relay at RATE"
                + (f"; also failed: {'; '.join(failed)}" if failed else ""))  # fmt: skip
    return "FAIL: relay: " + "; ".join(failed)


def hop_table(samples: dict[str, list[int]]) -> dict[str, Any]:
    """Percentiles (µs) of "collector receive -> visible to a reader" at each hop, each hop's share of the p50
    and p99 (the difference to the hop before it), and the one-hop floor measured beside them."""
    out: dict[str, Any] = {}
    prev: dict[str, float] = {"p50": 0.0, "p99": 0.0}
    for name, _label in WATCHED_HOPS:
        stats = report.percentiles(samples.get(name, []))
        for q in ("p50", "p99"):
            share = stats[q] - prev[q]
            stats[f"share_{q}"] = share if math.isnan(share) else int(share)
        out[name] = stats
        prev = stats
    out["floor"] = report.percentiles(samples.get("floor", []))
    return out


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _within(ratio: float | None, tolerance: float) -> bool:
    return ratio is not None and abs(ratio - 1.0) <= tolerance


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="make load-test", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--rate", type=float, default=10000.0, help="trades/s across all symbols")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="results folder")
    parser.add_argument("--symbols", help="comma-separated symbols (default: the 50 USDT pairs)")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds left out of the figures")
    parser.add_argument("--workdir", type=Path, help="keep the stack's files (logs) here")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    stop_on_signals()
    symbols = tuple(s.strip().upper() for s in args.symbols.split(",")) if args.symbols else ()
    opts = LoadOptions(rate=args.rate, duration=args.duration, out=args.out, symbols=symbols, warmup=args.warmup,
                       workdir=args.workdir, progress=not args.no_progress,
                       command="python -m tickbridge_dev.devstack.loadtest " + shlex.join(
                           sys.argv[1:] if argv is None else argv))  # fmt: skip
    doc = run(opts)
    ok = bool(doc.get("pass"))
    console.print(doc.get("verdict", ""))
    console.print(("[green]PASS[/]" if ok else "[red]FAIL[/]") + " — " + ", ".join(
        f"{k}: {'ok' if v else 'FAILED'}" for k, v in doc.get("checks", {}).items()))  # fmt: skip
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
