"""Microsecond latency of every live hop, and the floor, for `make load-test` (issue 20).

Each follower is its own small process, so no two wake-ups share an event loop or a GIL:

- `follow`: blocks in `XREAD ... BLOCK ... STREAMS <keys> $ ...` and, when an entry arrives, stamps the wall clock
  in µs against the entry's `recv_ts` (the collector's receive time, µs). Then it waits `--pace-ms` and blocks
  again from `$`, so the entries it samples arrived while it was already waiting: their figure is "collector
  receive -> visible to a reader of that stream", what a trading reader would see, whatever the rate, at a
  bounded cost (at most 1,000 / pace-ms wake-ups a second).
- `visible`: the trade's last hop, into the Brain's QuestDB. Like `follow` it takes the first trade that arrives
  in a per-symbol stream, then asks QuestDB every `--step-ms` (10) whether that row is in `trades` (by its
  designated timestamp, symbol and trade ID: an interval scan, no table scan) and stamps the first answer that
  says yes against the trade's `recv_ts`: "collector receive -> visible to a QuestDB reader", per trade, at most
  one step late. Then it waits `--pace-ms` (1,000: ~10 small queries a second on the Brain's QuestDB, which
  costs it ~6 % of a core: `VISIBLE_PACE_MS`) and takes the next trade.
- `ping` + `follow --field t`: the floor. One process XADDs `t=<now µs>` every `--interval-ms` to a key of its
  own on the same Redis under the same load, another follows it. That is one Redis hop to a Python reader:
  what the relay cannot beat on this machine at this moment, so a reader can tell the relay from the machine.

The load test runs one follower per hop (VPS stream, Brain stream, the Brain per-symbol trade streams) and the
floor pair, stops them with SIGTERM after the load window, and reads the samples each wrote as JSON
(`{"stream": ..., "us": [...]}`). The share of a hop is the difference between the medians of consecutive hops.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import redis

from tickbridge.core import keys

#: Pause after each sample: 100 samples a second per hop are plenty for p99 over a minute, and 4 followers plus
#: the pinger at 2 ms cost the machine ~2,500 Redis round trips a second (taken from the stack it measures).
PACE_MS = 10.0
#: Pause after each QuestDB visibility sample. Its polls are queries QuestDB pays for, and dearly: ~6 core-ms
#: each on the 2-core host, idle or not (35 a second took 21-23 % of a core): at 1 s and a 10 ms step a
#: sample costs ~10 queries, ~6 % of a core, and gives ~50 samples a minute.
VISIBLE_PACE_MS = 1000.0
#: Poll step of the QuestDB visibility follower: its samples are at most this late.
VISIBLE_STEP_MS = 10.0
#: A trade still not visible after this long is counted at this value (a lower bound) and the follower moves on.
VISIBLE_TIMEOUT_S = 30.0
#: The key the floor pinger writes (never read by the roles; capped).
FLOOR_KEY = "tickbridge:hopwatch:floor"


class _Stop:
    def __init__(self) -> None:
        self.stop = False
        signal.signal(signal.SIGTERM, self._set)
        signal.signal(signal.SIGINT, self._set)

    def _set(self, *_: Any) -> None:
        self.stop = True


def _field(fields: list[bytes] | dict[bytes, bytes], name: bytes) -> bytes | None:
    """Field `name` of an entry (redis-py answers a dict, a raw reply a flat list)."""
    if isinstance(fields, dict):
        return fields.get(name)
    for i in range(0, len(fields) - 1, 2):
        if fields[i] == name:
            return fields[i + 1]
    return None


def _stamp(fields: list[bytes] | dict[bytes, bytes], name: bytes) -> int | None:
    """The integer value of field `name`, or None."""
    value = _field(fields, name)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _Newest:
    """`XREAD COUNT 1 BLOCK 500 ... $`: the first entry that arrives after the call, of the first stream that
    answered, as `(arrival µs, fields)`; None after a timeout or a connection error (waits 0.1 s then)."""

    def __init__(self, url: str, streams: list[str], out: Path) -> None:
        self.client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
        self.args: list[Any] = ["XREAD", "COUNT", 1, "BLOCK", 500, "STREAMS", *streams, *(["$"] * len(streams))]
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.client.ping()
        out.with_suffix(".ready").touch()  # `HopWatch.wait_ready`: a loaded host takes seconds to start Python

    def wait(self) -> tuple[int, list[bytes] | dict[bytes, bytes]] | None:
        try:
            reply = self.client.execute_command(*self.args)  # type: ignore[no-untyped-call]
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.1)
            return None
        arrived = time.time_ns() // 1000
        pairs = list(reply.items() if isinstance(reply, dict) else reply or [])
        entries = pairs[0][1] if pairs else []
        return (arrived, entries[0][1]) if entries else None


def follow(url: str, streams: list[str], field: str, out: Path, pace_ms: float, only_type: str | None) -> None:
    """Sample "`field` -> visible to a reader" in µs until SIGTERM, then write the samples to `out`."""
    stopper = _Stop()
    newest = _Newest(url, streams, out)
    name, kind = field.encode(), only_type.encode() if only_type else None
    samples: list[int] = []
    while not stopper.stop:
        got = newest.wait()
        if got is None:
            continue
        arrived, fields = got
        if kind is None or _field(fields, b"type") == kind:
            sent = _stamp(fields, name)
            if sent is not None:
                samples.append(arrived - sent)
        if pace_ms:
            time.sleep(pace_ms / 1000)
    out.write_text(json.dumps({"streams": streams, "field": field, "us": samples}))


class _QuestDB:
    """`SELECT count()` over one kept-alive HTTP connection (reconnects once per failed request)."""

    def __init__(self, url: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 9000
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)

    def count(self, sql: str) -> int | None:
        try:
            self.conn.request("GET", "/exec?" + urllib.parse.urlencode({"query": sql}))
            doc = json.loads(self.conn.getresponse().read())
            return int(doc["dataset"][0][0])
        except (OSError, http.client.HTTPException, ValueError, KeyError, IndexError, TypeError):
            self.conn.close()
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
            return None


def _trade_row_sql(fields: list[bytes] | dict[bytes, bytes]) -> str | None:
    """The query that finds the `trades` row of a per-symbol trade entry, or None if the entry is not one."""
    symbol, ts, trade_id = _field(fields, b"symbol"), _stamp(fields, b"timestamp"), _stamp(fields, b"trade_id")
    if _field(fields, b"type") != b"TRADE" or symbol is None or ts is None or trade_id is None:
        return None
    if not symbol.isalnum():  # validated upstream; never quote anything else into SQL
        return None
    return (f"SELECT count() FROM trades WHERE timestamp = {ts}::timestamp AND symbol = '{symbol.decode()}' "
            f"AND trade_id = {trade_id}")  # fmt: skip


def visible(
    redis_url: str,
    questdb_url: str,
    streams: list[str],
    out: Path,
    pace_ms: float,
    step_ms: float,
    timeout_s: float = VISIBLE_TIMEOUT_S,
) -> None:
    """Sample "recv_ts -> visible in QuestDB `trades`" in µs, one trade at a time, until SIGTERM; write to `out`.
    A trade not visible within `timeout_s` is counted at that point (a lower bound; `timed_out` in `out`)."""
    stopper = _Stop()
    newest = _Newest(redis_url, streams, out)
    qdb = _QuestDB(questdb_url)
    samples: list[int] = []
    timed_out = 0
    while not stopper.stop:
        got = newest.wait()
        sql = _trade_row_sql(got[1]) if got else None
        recv = _stamp(got[1], b"recv_ts") if got else None
        if sql is None or recv is None:
            continue
        deadline = time.monotonic() + timeout_s
        seen = False
        while not (seen or stopper.stop) and time.monotonic() < deadline:
            seen = (qdb.count(sql) or 0) > 0
            if not seen:
                time.sleep(step_ms / 1000)
        if seen or not stopper.stop:
            # Not seen by the deadline: counted at the time given up (a lower bound), so a stalled writer raises
            # the percentiles instead of leaving them out.
            samples.append(time.time_ns() // 1000 - recv)
            timed_out += not seen
        time.sleep(pace_ms / 1000)
    out.write_text(json.dumps({"streams": streams, "field": "recv_ts", "us": samples, "timed_out": timed_out}))


def ping(url: str, key: str, interval_ms: float) -> None:
    """XADD `t=<now µs>` to `key` every `interval_ms` until SIGTERM (capped at 10,000 entries)."""
    stopper = _Stop()
    client = redis.Redis.from_url(url, socket_timeout=10, socket_connect_timeout=5)
    while not stopper.stop:
        try:
            client.execute_command(  # type: ignore[no-untyped-call]
                "XADD", key, "MAXLEN", "~", 10_000, "*", "t", time.time_ns() // 1000
            )
        except (redis.ConnectionError, redis.TimeoutError):
            time.sleep(0.1)
        time.sleep(interval_ms / 1000)
    client.delete(key)


#: The hops in path order: (name, label). `floor` is not on the path: it is the machine's one-hop floor.
HOPS = (
    ("vps_stream", "collector receive → VPS stream `market:vps:stream` (collector)"),
    ("brain_stream", "→ Brain stream `market:vps:stream` (forwarder)"),
    ("symbol_stream", "→ Brain per-symbol trade stream (consumer)"),
    ("questdb", "→ visible in Brain QuestDB `trades` (writer + WAL apply)"),
)

#: How the table was measured, for the load report.
METHOD = (
    "Method (`devstack/hopwatch.py`): one follower process per Redis hop blocks in `XREAD ... $` and stamps the "
    f"first entry that wakes it against its `recv_ts` (µs, same host clock), then pauses {PACE_MS:g} ms "
    "(`hopwatch.PACE_MS`); a hop's share is the difference to the hop before. QuestDB: a follower takes the first "
    f"trade that arrives in a per-symbol stream and asks the Brain QuestDB every {VISIBLE_STEP_MS:g} ms whether "
    "that row is in `trades` (timestamp, symbol, trade ID), stamping the first yes against its `recv_ts` (at most "
    f"one step late), then pauses {VISIBLE_PACE_MS:g} ms; a trade not visible within {VISIBLE_TIMEOUT_S:g} s "
    "counts at that value (a lower bound). The floor: a pinger XADDs its own µs time every "
    f"{PACE_MS:g} ms to a key on the Brain Redis and a follower reads it the same way. Their CPU counts as the "
    "harness's (QuestDB's answers to the visibility queries count as QuestDB's)."
)


class HopWatch:
    """The followers and the floor pinger of one load run, as child processes of the harness."""

    def __init__(
        self,
        vps_url: str,
        brain_url: str,
        symbols: list[str],
        workdir: Path,
        pace_ms: float = PACE_MS,
        *,
        questdb_url: str | None = None,
        visible_pace_ms: float = VISIBLE_PACE_MS,
        visible_timeout_s: float = VISIBLE_TIMEOUT_S,
    ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        me = [sys.executable, "-m", "tickbridge_dev.devstack.hopwatch"]
        stream = keys.DEFAULT_STREAM_KEY
        per_symbol = ",".join(keys.trades_key(s) for s in symbols)
        names = ["vps_stream", "brain_stream", "symbol_stream", "floor"] + (["questdb"] if questdb_url else [])
        self.outs = {name: workdir / f"{name}.json" for name in names}
        specs = {
            "vps_stream": [*me, "follow", "--url", vps_url, "--streams", stream],
            "brain_stream": [*me, "follow", "--url", brain_url, "--streams", stream],
            "symbol_stream": [*me, "follow", "--url", brain_url, "--streams", per_symbol],
            "floor": [*me, "follow", "--url", brain_url, "--streams", FLOOR_KEY, "--field", "t", "--type", ""],
        }
        for path in self.outs.values():
            path.with_suffix(".ready").unlink(missing_ok=True)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, cmd in specs.items():
            cmd += ["--out", str(self.outs[name]), "--pace-ms", str(pace_ms)]
            self.procs[name] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL)
        if questdb_url:
            self.procs["questdb"] = subprocess.Popen(
                [*me, "visible", "--url", brain_url, "--questdb-url", questdb_url, "--streams", per_symbol,
                 "--out", str(self.outs["questdb"]), "--pace-ms", str(visible_pace_ms),
                 "--timeout-s", str(visible_timeout_s)],
                stdout=subprocess.DEVNULL)  # fmt: skip
        self.procs["ping"] = subprocess.Popen([*me, "ping", "--url", brain_url, "--interval-ms", str(pace_ms)])
        # A harness stopped by SIGTERM or an error before `stop()` must not leave them running (they outlived an
        # interrupted load test once, polling a Redis that was gone): killed when the harness exits.
        atexit.register(self._kill)

    def _kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def wait_ready(self, timeout: float = 60.0) -> bool:
        """Wait until every follower is connected (True), or `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(path.with_suffix(".ready").exists() for path in self.outs.values()):
                return True
            time.sleep(0.05)
        return False

    def pids(self) -> list[int]:
        """Every process of the watch (the load test counts their CPU as the harness's)."""
        return [proc.pid for proc in self.procs.values()]

    def stop(self) -> dict[str, list[int]]:
        """Stop every process and return the samples (µs) per hop name and `floor`."""
        atexit.unregister(self._kill)
        for proc in self.procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out: dict[str, list[int]] = {}
        for name, path in self.outs.items():
            try:
                out[name] = json.loads(path.read_text())["us"]
            except (OSError, ValueError, KeyError):
                out[name] = []
        return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tickbridge_dev.devstack.hopwatch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("follow", help="sample field -> visible to a reader, in µs")
    f.add_argument("--url", required=True)
    f.add_argument("--streams", required=True, help="comma-separated stream keys")
    f.add_argument("--field", default="recv_ts")
    f.add_argument("--type", dest="only_type", default="TRADE", help="only entries of this `type` ('' = any)")
    f.add_argument("--out", type=Path, required=True)
    f.add_argument("--pace-ms", type=float, default=PACE_MS)
    v = sub.add_parser("visible", help="sample recv_ts -> visible in QuestDB `trades`, in µs")
    v.add_argument("--url", required=True, help="the Brain Redis")
    v.add_argument("--questdb-url", required=True, help="the Brain QuestDB's HTTP URL")
    v.add_argument("--streams", required=True, help="comma-separated per-symbol trade streams")
    v.add_argument("--out", type=Path, required=True)
    v.add_argument("--pace-ms", type=float, default=VISIBLE_PACE_MS)
    v.add_argument("--step-ms", type=float, default=VISIBLE_STEP_MS)
    v.add_argument("--timeout-s", type=float, default=VISIBLE_TIMEOUT_S, help="count a trade not visible by then")
    g = sub.add_parser("ping", help="the floor's writer")
    g.add_argument("--url", required=True)
    g.add_argument("--key", default=FLOOR_KEY)
    g.add_argument("--interval-ms", type=float, default=PACE_MS)
    args = p.parse_args(argv)
    if args.cmd == "follow":
        follow(args.url, args.streams.split(","), args.field, args.out, args.pace_ms, args.only_type or None)
    elif args.cmd == "visible":
        visible(
            args.url, args.questdb_url, args.streams.split(","), args.out, args.pace_ms, args.step_ms, args.timeout_s
        )
    else:
        ping(args.url, args.key, args.interval_ms)


if __name__ == "__main__":
    main(sys.argv[1:])
