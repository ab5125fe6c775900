"""`python -m tickbridge.bench.hops`: the CPU per tick the per-hop latency histograms add to each role's live
path (issue 19), measured on the roles' own code (min of several runs of 100,000 ticks, one process, no I/O).

- collector: `observe_us` of exchange -> collector (in `_emit_trade`) and of -> VPS stream (per batch in
  `StreamPublisher._write`), next to what it replaced (`Histogram.observe` of one trade in 8).
- forwarder: `_observe_latency` over a batch of XADD commands (symbol and recv_ts read from the fields).
- consumer: the `recv_ts` slices `_build` keeps per symbol and `observe_since` after the ingest call.
- writer: the `recv_ts` list per stream `_add` keeps and `observe_since` after QuestDB confirmed.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Histogram

from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.writer import BrainWriter, TableBatch
from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.core import keys
from tickbridge.core.metrics import LATENCY_BUCKETS
from tickbridge.core.redis_io import Command
from tickbridge.core.settings import Settings
from tickbridge.core.wire import now_us
from tickbridge.forwarder.service import Forwarder

N = 100_000
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


def per_tick_us(work: Callable[[], object], reps: int = 7) -> float:
    best = float("inf")
    for _ in range(reps):
        started = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - started)
    return best / N * 1e6


def trade_fields(i: int, now: int) -> list[bytes]:
    return [
        b"symbol", SYMBOLS[i % 3].encode(), b"exchange", b"binance_spot", b"type", b"TRADE", b"price", b"64000.10",
        b"volume", b"0.001", b"side", b"BUY", b"timestamp", str(now - 5000).encode(), b"trade_id", str(i).encode(),
        b"recv_ts", str(now - 2000 - i % 1000).encode(),
    ]  # fmt: skip


def bench_collector(now: int, symbols: list[str], recv: list[int]) -> None:
    exch = [now - 5000] * N
    cm = CollectorMetrics(CollectorRegistry())
    cm.export_symbols(SYMBOLS)
    to_collector = {s: cm.latency.child(s, "TRADE") for s in SYMBOLS}
    to_vps = {s: cm.vps_stream_latency.child(s) for s in SYMBOLS}

    def collector() -> None:
        for s, r, t in zip(symbols, recv, exch, strict=True):
            to_collector[s].observe_us(r - t)
        for s, r in zip(symbols, recv, strict=True):
            to_vps[s].observe_us(now - r)

    old = Histogram("old_seconds", "", ("type",), buckets=LATENCY_BUCKETS, registry=CollectorRegistry()).labels("T")

    def collector_before() -> None:
        for i, (r, t) in enumerate(zip(recv, exch, strict=True)):
            if not i & 7:
                old.observe(max(r - t, 0) / 1e6)

    def baseline() -> None:
        for _s, _r, _t in zip(symbols, recv, exch, strict=True):
            pass

    def baseline_before() -> None:
        for i, (_r, _t) in enumerate(zip(recv, exch, strict=True)):
            if not i & 7:
                pass

    now_us = per_tick_us(collector) - per_tick_us(baseline)
    before = per_tick_us(collector_before) - per_tick_us(baseline_before)
    print(f"collector   {now_us:.3f} µs/tick (2 hops; before: {before:.3f} for 1 trade in 8 via Histogram.observe)")


def bench_consumer(settings: Settings, entries: list[tuple[bytes, list[bytes]]], now: int) -> None:
    bc = BrainConsumer(settings, CollectorRegistry())
    runs: dict[bytes, list[bytes]] = {}
    for eid, fields in entries:
        runs.setdefault(fields[1], []).extend((eid, *fields[7::2]))

    def consumer() -> None:
        stamps = [(symbol, run[6::7]) for symbol, run in runs.items()]  # kept by _build
        for symbol, values in stamps:  # observed by _call
            bc._latency[symbol].observe_since(now, map(int, values))

    print(f"consumer    {per_tick_us(consumer):.3f} µs/tick")


def bench_writer(settings: Settings, symbols: list[str], recv: list[int], now: int) -> None:
    bw = BrainWriter(settings, CollectorRegistry())
    streams = [keys.trades_key(s).encode() for s in symbols]

    def writer() -> None:
        batch = TableBatch(keys.TRADES_TABLE, bw._new_buffer())
        for stream, r in zip(streams, recv, strict=True):  # kept by _add
            batch.recv.setdefault(stream, []).append(r)
        for stream, values in batch.recv.items():  # observed by _flush_table
            child = bw._latency_of(stream)
            if child is not None:
                child.observe_since(now, values)

    def baseline() -> None:
        for _stream, _r in zip(streams, recv, strict=True):
            pass

    print(f"writer      {per_tick_us(writer) - per_tick_us(baseline):.3f} µs/tick")


def main(argv: list[str] | None = None) -> None:
    now = now_us()
    settings = Settings(symbols=SYMBOLS)
    entries = [(f"{now // 1000}-{i}".encode(), trade_fields(i, now)) for i in range(N)]
    symbols = [SYMBOLS[i % 3] for i in range(N)]
    recv = [now - 2000 - i % 1000 for i in range(N)]
    bench_collector(now, symbols, recv)
    fw = Forwarder(settings, CollectorRegistry())
    cmds: list[Command] = [(b"XADD", settings.stream_key, e[0], *e[1]) for e in entries]
    print(f"forwarder   {per_tick_us(lambda: fw._observe_latency(cmds, 0, N, now)):.3f} µs/tick")
    bench_consumer(settings, entries, now)
    bench_writer(settings, symbols, recv, now)
    ref = Histogram("ref_seconds", "", buckets=LATENCY_BUCKETS, registry=CollectorRegistry())

    def observe_all() -> None:
        for _ in recv:
            ref.observe(0.002)

    cost = per_tick_us(observe_all)
    print(f"(reference: one prometheus_client Histogram.observe costs {cost:.3f} µs)")


if __name__ == "__main__":
    main()
