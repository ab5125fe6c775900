"""`make bench-collector`: ticks/s one collector process sustains from the simulator into the stream,
and its CPU% at about 1,200 ticks/s, each next to a ceiling measured in the same run.

Three processes on this machine: redis-server, the simulator (`tickbridge sim`) and the collector
(`tickbridge collector`), 50 default symbols. Ticks/s = growth of the stream (trades + depth diffs).
- Max rate: the collector is paused (SIGSTOP) while the simulator keeps producing, then resumed; the
  best 1-second rate at which it drains the backlog is what it sustains (the simulator alone cannot
  out-produce it on this machine).
- Replay burst: a second simulator replays the real ETHUSDT captures as fast as it can into a second
  collector; rate = ticks / (last - first stream entry time).
- Blaster: a minimal WebSocket server sends pre-formatted trade frames (50 symbols, contiguous IDs) as
  fast as it can; this is the collector's own ceiling, free of the simulator's generation cost.
- Ceiling: `redis-benchmark` pipelined (-P 128) XADD of a 9-field trade entry on the same redis-server.
- Hop: during the steady phase a follower blocks in `XREAD ... $` and stamps the first entry that wakes it
  against its `recv_ts` (µs, as `devstack/hopwatch.py` does in the load test): collector receive -> visible to a
  reader of the stream, beside the same follower's floor (a pinger's own XADDs on the same server).
CPU figures are core-µs per tick (CPU seconds of the collector process / ticks appended): with the load
average printed beside them, since this machine is shared.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import psutil  # type: ignore[import-untyped]
import redis

from tickbridge.core import keys
from tickbridge.core.keys import DEFAULT_STREAM_KEY
from tickbridge.core.wire import parse_stream_id
from tickbridge_dev.devstack.servers import RedisServer, free_port

ENTRY = [
    "symbol", "BTCUSDT", "exchange", "binance_spot", "type", "TRADE", "price", "61837.63000000",
    "volume", "0.02000000", "side", "SELL", "timestamp", "1723161255342000", "trade_id", "3735683259",
    "recv_ts", "1723161255343123",
]  # fmt: skip


def redis_benchmark_xadd(port: int, pipeline: int = 128, n: int = 300_000) -> float:
    exe = shutil.which("redis-benchmark")
    if exe is None:
        return float("nan")
    out = subprocess.run(
        [exe, "-p", str(port), "-P", str(pipeline), "-n", str(n), "-c", "1", "-q",
         "XADD", "bench:ceiling", "*", *ENTRY],
        capture_output=True, text=True, check=False, timeout=120,
    ).stdout  # fmt: skip
    rates = re.findall(r"([\d.]+) requests per second", out)
    return float(rates[-1]) if rates else float("nan")


def sim_post_rate(port: int, rate: float) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/_sim/rate", data=orjson.dumps({"rate": rate}), method="POST",
        headers={"Content-Type": "application/json"},
    )  # fmt: skip
    urllib.request.urlopen(req, timeout=5).read()


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v3/ping", timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"simulator not up on port {port}")


def replay_burst(py: str, env: dict[str, str], workdir: Path, redis_url: str, client: redis.Redis) -> tuple[int, float]:
    """Ticks and ticks/s of a full-speed replay of the real captures through a fresh collector."""
    data = Path(__file__).resolve().parents[4] / "data" / "binance"  # the repository's captures
    files = sorted(data.glob("*.gz"))
    if not files:
        return 0, float("nan")
    port = free_port()
    replay_args = [a for f in files for a in ("--replay", str(f))]
    sim = subprocess.Popen(
        [py, "-m", "tickbridge", "sim", "--port", str(port), "--mode", "replay", "--speed", "0",
         "--symbols", "ETHUSDT", "--metrics-port", "0", *replay_args],
        env=env, cwd=workdir,
    )  # fmt: skip
    collector: subprocess.Popen[bytes] | None = None
    key = "bench:replay"
    client.delete(key, keys.COLLECTOR_LAST_TRADE_IDS, keys.warm_key("ETHUSDT"))  # a fresh collector
    try:
        wait_port(port)
        collector = subprocess.Popen(
            [py, "-m", "tickbridge", "collector"], cwd=workdir,
            env={**env, "BINANCE_WS_URL": f"ws://127.0.0.1:{port}", "BINANCE_REST_URL": f"http://127.0.0.1:{port}",
                 "VPS_REDIS_URL": redis_url, "SYMBOLS": "ETHUSDT", "STREAM_KEY": key},
        )  # fmt: skip
        last, stable = -1, 0
        deadline = time.monotonic() + 120
        while stable < 10 and time.monotonic() < deadline:  # 2 s without growth: the replay is over
            time.sleep(0.2)
            n = client.xlen(key)
            stable = stable + 1 if n == last and n > 0 else 0
            last = n
        first: Any = client.xrange(key, count=1)
        final: Any = client.xrevrange(key, count=1)
        span_ms = parse_stream_id(final[0][0])[0] - parse_stream_id(first[0][0])[0]
        return last, last / max(span_ms / 1000, 0.001)
    finally:
        for proc in (collector, sim):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


async def _blast(port: int, total: int) -> None:
    """Serve one connection: `total` trade frames round-robin over the default symbols, then idle."""
    import asyncio

    from websockets.asyncio.server import ServerConnection, serve

    from tickbridge.core.settings import DEFAULT_SYMBOLS

    done = asyncio.Event()

    async def handler(ws: ServerConnection) -> None:
        templates = [
            (b'{"stream":"%s@trade","data":{"e":"trade","E":%%d,"s":"%s","t":%%d,"p":"61837.63000000",'
             b'"q":"0.02000000","T":%%d,"m":%%s,"M":true}}') % (s.lower().encode(), s.encode())
            for s in DEFAULT_SYMBOLS
        ]  # fmt: skip
        n_sym = len(templates)
        now_ms = time.time_ns() // 1_000_000
        for i in range(total):
            ts = now_ms + i // 1000
            await ws.send(templates[i % n_sym] % (ts, 1 + i // n_sym, ts, b"true" if i & 1 else b"false"))
        done.set()
        await ws.wait_closed()

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):
        await asyncio.sleep(3600)


def blaster_rate(
    py: str, env: dict[str, str], workdir: Path, redis_url: str, client: redis.Redis, total: int
) -> tuple[float, float]:
    """Ticks/s one collector appends from the blaster (first to last stream entry), and per CPU-second."""
    port = free_port()
    key = "bench:blast"
    client.delete(key, keys.COLLECTOR_LAST_TRADE_IDS)
    blaster = subprocess.Popen(
        [py, "-m", "tickbridge_dev.bench.collector", "--blaster", str(port), str(total)], cwd=workdir
    )
    collector: subprocess.Popen[bytes] | None = None
    try:
        time.sleep(1.0)
        collector = subprocess.Popen(
            [py, "-m", "tickbridge", "collector"], cwd=workdir,
            env={**env, "BINANCE_WS_URL": f"ws://127.0.0.1:{port}", "BINANCE_REST_URL": f"http://127.0.0.1:{port}",
                 "VPS_REDIS_URL": redis_url, "STREAM_KEY": key},
        )  # fmt: skip
        ps = psutil.Process(collector.pid)
        deadline = time.monotonic() + 180
        cpu_start: float | None = None
        while client.xlen(key) < total and time.monotonic() < deadline:
            if cpu_start is None and client.xlen(key) > 0:
                times = ps.cpu_times()
                cpu_start = times.user + times.system  # startup (imports, connect) excluded
            time.sleep(0.05)
        times = ps.cpu_times()
        cpu_s = times.user + times.system - (cpu_start or 0.0)
        first: Any = client.xrange(key, count=1)
        final: Any = client.xrevrange(key, count=1)
        if not first:
            return float("nan"), float("nan")
        span_ms = parse_stream_id(final[0][0])[0] - parse_stream_id(first[0][0])[0]
        n = int(client.xlen(key))
        return n / max(span_ms / 1000, 0.001), n / max(cpu_s, 0.001)
    finally:
        for proc in (collector, blaster):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


def follow_hop(port: int, stream: str, field: bytes, stop: threading.Event, pace_s: float = 0.01) -> list[int]:
    """µs from each sampled entry's `field` (a µs wall-clock stamp) to its read by a blocked `XREAD ... $`."""
    client = redis.Redis(port=port, socket_timeout=10)
    samples: list[int] = []
    while not stop.is_set():
        reply: Any = client.execute_command(  # type: ignore[no-untyped-call]
            "XREAD", "COUNT", 1, "BLOCK", 200, "STREAMS", stream, "$"
        )
        now = time.time_ns() // 1000
        if reply:
            fields = reply[0][1][0][1] if isinstance(reply, list) else next(iter(reply.values()))[0][0][1]
            flat = fields if isinstance(fields, list) else [x for kv in fields.items() for x in kv]
            for i in range(0, len(flat) - 1, 2):
                if flat[i] == field:
                    samples.append(now - int(flat[i + 1]))
        time.sleep(pace_s)
    return samples


def ping_floor(port: int, stop: threading.Event, interval_s: float = 0.01) -> None:
    """XADD the own µs clock to `bench:floor` every `interval_s` (the floor follower reads it)."""
    client = redis.Redis(port=port, socket_timeout=10)
    while not stop.is_set():
        client.execute_command(  # type: ignore[no-untyped-call]
            "XADD", "bench:floor", "MAXLEN", "~", 1000, "*", "t", time.time_ns() // 1000
        )
        time.sleep(interval_s)


def quantiles_us(samples: list[int]) -> str:
    if len(samples) < 20:
        return f"{len(samples)} samples (too few)"
    q = statistics.quantiles(samples, n=100)
    return f"p50 {q[49]:,.0f} / p99 {q[98]:,.0f} µs ({len(samples)} samples)"


def rate_over(client: redis.Redis, seconds: float) -> float:
    start_n, start_t = client.xlen(DEFAULT_STREAM_KEY), time.monotonic()
    time.sleep(seconds)
    return (client.xlen(DEFAULT_STREAM_KEY) - start_n) / (time.monotonic() - start_t)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tickbridge_dev.bench.collector", description=__doc__)
    p.add_argument("--seconds", type=float, default=10.0, help="measurement window per phase")
    p.add_argument("--max-rate", type=float, default=30_000.0, help="simulator trades/s during the max phase")
    p.add_argument("--pause", type=float, default=10.0, help="seconds the collector is stopped to build a backlog")
    p.add_argument("--blast-ticks", type=int, default=200_000, help="trades sent by the blaster")
    p.add_argument("--blaster", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.blaster:
        import asyncio

        asyncio.run(_blast(*args.blaster))
        return
    workdir = Path(tempfile.mkdtemp(prefix="tb-bench-collector-"))
    redis_server = RedisServer(workdir=workdir / "redis")
    redis_server.start()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        ceiling = redis_benchmark_xadd(redis_server.port)
        client = redis.Redis(port=redis_server.port)
        client.delete("bench:ceiling")
        sim_port = free_port()
        env = {**os.environ, "METRICS_PORT": "0", "LOG_LEVEL": "WARNING"}
        py = sys.executable
        procs.append(subprocess.Popen(
            [py, "-m", "tickbridge", "sim", "--port", str(sim_port), "--rate", "1000", "--metrics-port", "0"],
            env=env, cwd=workdir,
        ))  # fmt: skip
        wait_port(sim_port)
        coll_env = {
            **env, "BINANCE_WS_URL": f"ws://127.0.0.1:{sim_port}", "BINANCE_REST_URL": f"http://127.0.0.1:{sim_port}",
            "VPS_REDIS_URL": redis_server.url,
        }  # fmt: skip
        collector = subprocess.Popen([py, "-m", "tickbridge", "collector"], env=coll_env, cwd=workdir)
        procs.append(collector)
        proc = psutil.Process(collector.pid)
        time.sleep(4.0)  # connect, 50 snapshots, warm-up
        # Phase 1: about 1,200 ticks/s (trades + depth diffs), calibrated once.
        measured = rate_over(client, 3.0)
        depth_share = max(measured - 1000.0, 0.0)
        sim_post_rate(sim_port, max(1200.0 - depth_share, 100.0))
        time.sleep(2.0)
        stop_hop = threading.Event()
        hop: dict[str, list[int]] = {}

        def run_follower(name: str, stream: str, field: bytes) -> None:
            hop[name] = follow_hop(redis_server.port, stream, field, stop_hop)

        threads = [
            threading.Thread(target=run_follower, args=("hop", DEFAULT_STREAM_KEY, b"recv_ts")),
            threading.Thread(target=run_follower, args=("floor", "bench:floor", b"t")),
            threading.Thread(target=ping_floor, args=(redis_server.port, stop_hop)),
        ]
        for t in threads:
            t.start()
        proc.cpu_percent(None)
        steady_cpu0 = sum(proc.cpu_times()[:2])
        steady_n0 = client.xlen(DEFAULT_STREAM_KEY)
        steady_load = os.getloadavg()[0]
        steady = rate_over(client, args.seconds)
        cpu = proc.cpu_percent(None)
        steady_us = (
            (sum(proc.cpu_times()[:2]) - steady_cpu0) * 1e6 / max(client.xlen(DEFAULT_STREAM_KEY) - steady_n0, 1)
        )
        stop_hop.set()
        for t in threads:
            t.join(5)
        # Phase 2: max. Pause the collector while the simulator keeps producing, then let it drain.
        sim_post_rate(sim_port, args.max_rate)
        time.sleep(1.0)
        produced = rate_over(client, 3.0)
        collector.send_signal(signal.SIGSTOP)
        time.sleep(args.pause)
        backlog_start = client.xlen(DEFAULT_STREAM_KEY)
        collector.send_signal(signal.SIGCONT)
        proc.cpu_percent(None)
        samples = [(time.monotonic(), backlog_start)]
        for _ in range(int(args.seconds / 0.25)):
            time.sleep(0.25)
            samples.append((time.monotonic(), client.xlen(DEFAULT_STREAM_KEY)))
        drain_cpu = proc.cpu_percent(None)
        # Best 1-second window while the backlog drains: the collector's own ceiling.
        drain = max((n2 - n1) / (t2 - t1) for (t1, n1), (t2, n2) in zip(samples, samples[4:], strict=False))
        alive = collector.poll() is None
        # A stop writes what the collector holds in its queues first (up to 20,000 frames and 64 batches): on a
        # loaded host that takes seconds. Compose gives it 60 s (`stop_grace_period`); so does the bench.
        stop_t0 = time.monotonic()
        collector.terminate()
        collector.wait(60)
        stop_s = time.monotonic() - stop_t0
        procs[0].terminate()
        procs[0].wait(10)
        replay_ticks, replay_rate = replay_burst(py, env, workdir, redis_server.url, client)
        blast_load = os.getloadavg()[0]
        blast, blast_per_cpu = blaster_rate(py, env, workdir, redis_server.url, client, args.blast_ticks)
        print("collector benchmark (50 symbols, simulator -> collector -> redis-server, one 2-vCPU machine)")
        print(f"  ceiling  redis-benchmark XADD 9-field entry, 1 conn, pipeline 128: {ceiling:,.0f} ops/s")
        print(f"  steady   {steady:,.0f} ticks/s appended, collector CPU {cpu:.1f}% of a core "
              f"(aim < 10% at 1,200 ticks/s): {steady_us:.1f} core-µs per tick (load1 {steady_load:.2f})")  # fmt: skip
        print(f"  hop      collector receive -> visible to a reader of the stream: {quantiles_us(hop.get('hop', []))}; "
              f"floor (one XADD to a reader, same server): {quantiles_us(hop.get('floor', []))}")  # fmt: skip
        print(f"  max      {drain:,.0f} ticks/s sustained draining a backlog (CPU {drain_cpu:.0f}% over the window), "
              f"= {drain / ceiling:.1%} of the XADD ceiling (aim >= 20,000 ticks/s)")  # fmt: skip
        print(f"           the simulator alone produced {produced:,.0f} ticks/s at --rate {args.max_rate:,.0f}")
        print(f"  replay   {replay_rate:,.0f} ticks/s: {replay_ticks:,} ticks of the real captures replayed at full "
              f"speed, = {replay_rate / ceiling:.1%} of the XADD ceiling")  # fmt: skip
        print(f"  blaster  {blast:,.0f} ticks/s: {args.blast_ticks:,} trades from a minimal WebSocket server, "
              f"= {blast / ceiling:.1%} of the XADD ceiling (aim >= 20,000 ticks/s)")  # fmt: skip
        print(f"           {blast_per_cpu:,.0f} ticks per collector CPU-second in that run (its rate if it had a "
              f"whole core; the machine is shared): {1e6 / blast_per_cpu:.1f} core-µs per tick "
              f"(load1 {blast_load:.2f})")  # fmt: skip
        print(f"  per core {steady / max(cpu / 100, 1e-9):,.0f} ticks per CPU-second at the steady rate "
              "(what one fully busy core would carry at that batching)")  # fmt: skip
        print(
            f"  collector survived the SIGSTOP/SIGCONT backlog: {alive}; its stop after the drain took {stop_s:.1f} s"
        )
    finally:
        for proc_ in reversed(procs):
            if proc_.poll() is None:
                proc_.send_signal(signal.SIGCONT)
                proc_.terminate()
                try:
                    proc_.wait(10)
                except subprocess.TimeoutExpired:
                    proc_.kill()
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
