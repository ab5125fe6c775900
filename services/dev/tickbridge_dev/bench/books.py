"""Order books (issue 17): what they cost, on the real captures (data/binance, ETHUSDT).

`python -m tickbridge_dev.bench.books` prints:
- VPS Redis memory per depth update (MEMORY USAGE of a stream holding the capture's ticks as the collector
  appends them), beside the whole-book entries' size;
- the collector's CPU to build a whole-book entry (sort + encode) from its 1,000-level book;
- cryptofeed's Redis backend (`BookStream`, default `numeric_type=float`) side by side: the same diffs as it
  stores them, in a stream of the same server, per VPS stream-node config (node size 4 KB Redis default vs
  redis/vps.conf), with the XADD/XREAD CPU of each config and the bytes per trade;
- Redis time per depth diff in the Brain's ingest call with the book kept (record 'q') and without it (record
  'p', the pre-issue-17 path): `INFO commandstats` usec of FCALL over the capture's 6,470 diffs, 100 per call.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import redis

from tickbridge.brain.books import book_record
from tickbridge.brain.common import INGEST_FUNCTION, lua_source
from tickbridge.collector.book import DepthSync
from tickbridge.collector.book_publish import book_entry
from tickbridge.collector.parser import parse_frame
from tickbridge.core import keys
from tickbridge.core.tick import BookSnapshot, DepthDiff, Trade
from tickbridge.core.wire import encode_book, encode_depth, encode_payload, encode_tick
from tickbridge_dev.devstack.servers import REPO_ROOT, RedisServer
from tickbridge_dev.sim.replay import load_capture

FILES = (REPO_ROOT / "data/binance/ethusdt_20240808.gz", REPO_ROOT / "data/binance/ethusdt_20240809.gz")
STREAM = "s"
GROUP = "g"


def capture() -> tuple[list[Trade | DepthDiff], dict[str, Any]]:
    """The capture's trades and depth diffs as the collector parses them, and its REST snapshot."""
    ticks: list[Trade | DepthDiff] = []
    snapshot: dict[str, Any] = {}
    for line in load_capture(FILES):
        if line.stream is None:
            snapshot = line.data
        elif "bookTicker" not in line.stream:
            ev = parse_frame(line.text, line.recv_ns // 1000)
            if isinstance(ev, Trade | DepthDiff):
                ticks.append(ev)
    return ticks, snapshot


def collector_book(ticks: list[Trade | DepthDiff], snapshot: dict[str, Any]) -> DepthSync:
    sync = DepthSync("ETHUSDT")
    for t in ticks:
        if isinstance(t, DepthDiff):
            sync.on_event(t)
            if sync.needs_snapshot() and t.last_update_id >= snapshot["lastUpdateId"]:
                sync.on_snapshot(snapshot["lastUpdateId"], snapshot["bids"], snapshot["asks"])
    return sync


def stream_bytes(client: Any, entries: list[list[str | int]]) -> float:
    client.delete(STREAM)
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.execute_command("XADD", STREAM, "*", *fields)
    pipe.execute()
    return float(client.memory_usage(STREAM, samples=0) or 0) / len(entries)


def ingest_usec(client: Any, diffs: list[DepthDiff], book: BookSnapshot | None) -> float:
    """Redis µs per diff of the ingest function ('q' with the book when `book` is given, else 'p')."""
    client.flushall()
    client.execute_command("FUNCTION", "LOAD", "REPLACE", lua_source())
    client.xgroup_create(STREAM, GROUP, "0", mkstream=True)
    entries = ([encode_book(book)] if book is not None else []) + [encode_depth(d) for d in diffs]
    ids = [client.execute_command("XADD", STREAM, "*", *e) for e in entries]
    items: list[DepthDiff | BookSnapshot] = ([book] if book is not None else []) + list(diffs)
    client.xreadgroup(GROUP, "c", {STREAM: ">"}, count=len(ids))
    client.config_resetstat()
    book_keys = [*keys.book_keys("ETHUSDT"), keys.BOOK_WANTED]
    for start in range(0, len(ids), 100):
        args: list[Any] = []
        for entry_id, fields, item in zip(
            ids[start : start + 100], entries[start : start + 100], items[start : start + 100], strict=True
        ):
            if book is not None:
                args += book_record(entry_id, 2, 3, item)
            else:
                args += ["p", entry_id, 2, len(fields), *fields]
        client.execute_command("FCALL", INGEST_FUNCTION, 7, STREAM, keys.depth_key("ETHUSDT"), *book_keys,
                               GROUP, 300_000_000, 0, *args)  # fmt: skip
    stats = client.info("commandstats")["cmdstat_fcall"]
    return float(stats["usec"]) / len(entries)


KINDS: tuple[type[Trade], type[DepthDiff]] = (Trade, DepthDiff)


def _mean(ticks: list[Trade | DepthDiff], kind: type[Trade | DepthDiff], size: Callable[[Any], int]) -> float:
    return statistics.mean(size(t) for t in ticks if isinstance(t, kind))


def _resp_bytes(cmd: list[Any]) -> int:
    parts = [str(x).encode() for x in cmd]
    return len(f"*{len(parts)}\r\n") + sum(len(f"${len(p)}\r\n") + len(p) + 2 for p in parts)


def _strip(x: str) -> str:
    return x.rstrip("0").rstrip(".") if "." in x else x


def _compact_depth(d: DepthDiff) -> list[str | int]:
    fields = encode_depth(d)
    fields[13] = ",".join(f"{_strip(p)}:{_strip(q)}" for p, q in d.bids)
    fields[15] = ",".join(f"{_strip(p)}:{_strip(q)}" for p, q in d.asks)
    return fields


def cryptofeed_delta(d: DepthDiff) -> list[str | int]:
    """What cryptofeed's `BookStream` XADDs per Binance book delta (bmoscon/cryptofeed, backends/redis.py).

    `OrderBook.to_dict(delta=True, numeric_type=float)` gives exchange, symbol, delta (`{"bid": [[price, size],
    …], "ask": …}` as floats, JSON-dumped by the writer), timestamp (exchange time, float seconds), and the backend
    adds receipt_timestamp; redis-py sends floats as `repr()`. No update IDs, and the exact strings are lost.
    """
    delta = {"bid": [[float(p), float(q)] for p, q in d.bids], "ask": [[float(p), float(q)] for p, q in d.asks]}
    return [
        "exchange", "BINANCE", "symbol", "ETH-USDT", "delta", orjson.dumps(delta).decode(),
        "timestamp", repr(d.timestamp / 1e6), "receipt_timestamp", repr(d.recv_ts / 1e6),
    ]  # fmt: skip


def vps_node_config() -> tuple[int, int]:
    """redis/vps.conf's (stream-node-max-bytes, stream-node-max-entries), Redis's defaults where unset."""
    conf = dict(line.split(None, 1) for line in (REPO_ROOT / "redis/vps.conf").read_text().splitlines()
                if line.strip() and not line.startswith("#"))  # fmt: skip
    return int(conf.get("stream-node-max-bytes", 4096)), int(conf.get("stream-node-max-entries", 100))


#: (stream-node-max-bytes, stream-node-max-entries): Redis's default, then redis/vps.conf's.
NODE_CONFIGS = ((4096, 100), vps_node_config())


def stream_cpu(client: Any, entries: list[list[str | int]], batch: int) -> tuple[float, float, float]:
    """Redis µs per XADD, per entry read by XREAD COUNT `batch` walking the stream (the forwarder's read), and
    per XRANGE of one entry by its ID (a seek inside a node: the forwarder's checks of one entry)."""
    client.delete(STREAM)
    client.config_resetstat()
    pipe = client.pipeline(transaction=False)
    for fields in entries:
        pipe.execute_command("XADD", STREAM, "*", *fields)
    pipe.execute()
    cursor, read, ids = "0-0", 0, []
    while read < len(entries):
        page = client.execute_command("XREAD", "COUNT", batch, "STREAMS", STREAM, cursor)[0][1]
        cursor, read = page[-1][0], read + len(page)
        ids.append(page[len(page) // 2][0])
    for entry_id in ids:
        client.execute_command("XRANGE", STREAM, entry_id, entry_id)
    stats = client.info("commandstats")
    calls = {"xadd": len(entries), "xread": read, "xrange": len(ids)}
    per = {c: float(stats[f"cmdstat_{c}"]["usec"]) / n for c, n in calls.items()}
    return per["xadd"], per["xread"], per["xrange"]


def _values(entries: list[list[str | int]]) -> float:
    return statistics.mean(sum(len(str(v)) for v in e[1::2]) for e in entries)


def compare_cryptofeed(client: Any, ticks: list[Trade | DepthDiff]) -> None:
    """Print ours beside cryptofeed's per node config, and where the difference comes from."""
    diffs = [t for t in ticks if isinstance(t, DepthDiff)]
    layouts = {
        "depth (ours)": [encode_depth(d) for d in diffs],
        "depth (cryptofeed)": [cryptofeed_delta(d) for d in diffs],
        "depth (ours, padding stripped)": [_stripped_json(d) for d in diffs],
        "depth (compact 'p:q,' levels, a contract change)": [_compact_depth(d) for d in diffs],
        "trade (ours)": [encode_tick(t) for t in ticks if isinstance(t, Trade)],
        "tick, trades and depth interleaved (ours)": [encode_tick(t) for t in ticks],
    }
    for name, entries in layouts.items():
        print(f"  {name}: {_values(entries):,.0f} B of values per entry")
    for node_bytes, node_entries in NODE_CONFIGS:
        client.config_set("stream-node-max-bytes", node_bytes)
        client.config_set("stream-node-max-entries", node_entries)
        print(f"VPS Redis, stream-node-max-bytes {node_bytes} / -entries {node_entries}:")
        for name, entries in layouts.items():
            xadd, xread, seek = stream_cpu(client, entries, 100)
            print(f"  {name}: {stream_bytes(client, entries):,.0f} B per entry; Redis CPU {xadd:.1f} µs per XADD, "
                  f"{xread:.2f} µs per entry read (XREAD COUNT 100), {seek:.1f} µs per XRANGE of one ID")  # fmt: skip
    client.config_set("stream-node-max-bytes", 4096)
    client.config_set("stream-node-max-entries", 100)


def _stripped_json(d: DepthDiff) -> list[str | int]:
    """Inside the contract's words (JSON arrays of [price, qty] strings), the 8-decimal padding stripped."""
    fields = encode_depth(d)
    fields[13] = orjson.dumps([[_strip(p), _strip(q)] for p, q in d.bids]).decode()
    fields[15] = orjson.dumps([[_strip(p), _strip(q)] for p, q in d.asks]).decode()
    return fields


def main() -> None:
    ticks, snapshot = capture()
    diffs = [t for t in ticks if isinstance(t, DepthDiff)]
    sync = collector_book(ticks, snapshot)
    times = []
    for _ in range(20):
        t0 = time.process_time()
        entry = book_entry(sync)
        fields = encode_book(entry)
        times.append(time.process_time() - t0)
    book_bytes = sum(len(str(f)) for f in fields)
    print(
        f"collector book: {len(sync.book.bids)} bids, {len(sync.book.asks)} asks; whole-book entry "
        f"{book_bytes:,} B of fields, built in {statistics.median(times) * 1000:.2f} ms CPU (median of 20)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(workdir=Path(tmp))
        server.start()
        try:
            client: Any = redis.Redis(port=server.port)
            per_depth = stream_bytes(client, [encode_depth(d) for d in diffs])
            per_tick = stream_bytes(client, [encode_tick(t) for t in ticks])
            per_book = stream_bytes(client, [encode_book(entry)] * 20)
            print(
                f"VPS Redis: {per_depth:,.0f} B per depth update (a stream of the capture's {len(diffs):,} diffs), "
                f"{per_tick:,.0f} B per tick with its trades interleaved, {per_book:,.0f} B per whole-book entry"
            )
            compact = stream_bytes(client, [_compact_depth(d) for d in diffs])
            print(
                f"  a lossless compact layout (zero padding stripped, restored from the 8-decimal scale; 'p:q,' "
                f"levels) would take {compact:,.0f} B per depth update (not adopted: the contract fixes the JSON)"
            )
            link = {k: _mean(ticks, k, lambda t: _resp_bytes(["XADD", STREAM, "1-1", *encode_tick(t)])) for k in KINDS}
            buffer = {k: _mean(ticks, k, lambda t: len(encode_payload([str(x).encode() for x in encode_tick(t)])))
                      for k in KINDS}  # fmt: skip
            book_link = _resp_bytes(["XADD", STREAM, "1-1", *fields])
            book_buffer = len(encode_payload([str(x).encode() for x in fields]))
            print(f"link (RESP of the forwarder's XADD): trade {link[Trade]:,.0f} B, depth update "
                  f"{link[DepthDiff]:,.0f} B, whole book {book_link:,} B; VPS buffer payload: trade "
                  f"{buffer[Trade]:,.0f} B, depth update {buffer[DepthDiff]:,.0f} B, "
                  f"whole book {book_buffer:,} B")  # fmt: skip
            compare_cryptofeed(client, ticks)
            without = ingest_usec(client, diffs, None)
            with_book = ingest_usec(
                client,
                diffs,
                BookSnapshot(
                    "ETHUSDT", entry.timestamp, diffs[0].first_update_id - 1, entry.bids, entry.asks, entry.recv_ts
                ),
            )
            print(
                f"Brain ingest: {without:.1f} µs of Redis per depth diff without the book, {with_book:.1f} µs with it"
            )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
