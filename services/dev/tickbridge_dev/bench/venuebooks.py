"""Issue 18: each venue adapter's book against an independent reference rebuild, over a simulated hour with faults.

`python -m tickbridge_dev.bench.venuebooks [--venue coinbase|kraken|both] [--minutes 60] [--checkpoints 240]`

Time-compressed: no sockets and no wall clock. The simulator's venue server (`CoinbaseSim`, `KrakenSim`) runs
in-process at rate 0 and is stepped one generation tick at a time (`--tick-s` of simulated time, `--rate` trades/s
spread over the symbols as the simulator spreads them), its frames captured per connection. One client
connection reads them through the adapter (`parse_frame`, `ConnectionState`, the adapter's `VenueBook`) the way
the collector's session does: a Coinbase `sequence_num` gap resyncs every book of the connection, a Kraken
checksum mismatch that book, both with the adapter's `resync_messages`; a dropped connection is replaced by a
new one subscribed with `subscribe_messages`.

Beside it, `Reference` rebuilds the same connection's books from the raw frames with its own few lines of the
venue's documented rules (JSON parsed here, decimals kept as sent, nothing imported from the adapter or the
simulator): Coinbase `l2_data` snapshot then absolute `new_quantity` (0 removes), one `sequence_num` counter per
connection, a jump invalidating every book until its next snapshot; Kraken `book` snapshot then updates,
truncated to the subscribed depth, the CRC32 of the top 10 asks and bids (`.` and leading zeros removed) checked
on every message.

Faults across the hour, from the simulator: Coinbase lost `l2_data` frames (`skip_sequence`) and disconnects;
Kraken lost book messages (`drop_book_update`), corrupted checksums (`corrupt_checksum`) and disconnects; missed
trades on both (they do not touch books). At each checkpoint (evenly spread) every book of the adapter equals
the reference's and the simulator's own (Coinbase: the whole book; Kraken: the view at the depth). Kraken: the
reference's checksum agrees with every message except the corrupted ones and those after a lost one (until
the resubscription's snapshot), and the adapter's verdict equals the reference's on every message.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

from tickbridge.collector.parser import Rejected
from tickbridge.collector.venues import base
from tickbridge.collector.venues.base import BookOutcome, ConnectionState, SeqOutcome
from tickbridge.collector.venues.coinbase import CoinbaseAdapter
from tickbridge.collector.venues.kraken import KrakenAdapter
from tickbridge_dev.sim import SimConfig
from tickbridge_dev.sim.venues import CoinbaseSim, KrakenSim, VenueServer
from tickbridge_dev.sim.venues.common import VenueConn

#: Ten symbols of each venue's quote styles (USD, USDT, EUR), as `tests/test_sim_venues.py` uses.
SYMBOLS = ("BTCUSD", "ETHUSD", "SOLUSDT", "XRPUSD", "DOGEUSDT", "ADAUSD", "LTCUSD", "DOTUSDT", "LINKUSD", "ETHEUR")
RECV = 1_700_000_000_000_000
Adapter = CoinbaseAdapter | KrakenAdapter
#: A level as the reference keeps it: price -> the (price, quantity) strings as sent.
Side = dict[Decimal, tuple[str, str]]


# -- the reference: the venues' documented rules, nothing else --------------------------------------------------
def kraken_crc32(bids: Side, asks: Side) -> int:
    """Kraken's book checksum (docs.kraken.com spot-ws-book-v2): top 10 asks low to high, then top 10 bids high
    to low; each price and quantity as sent, `.` removed, leading zeros removed; CRC32 of the concatenation."""

    def text(level: tuple[str, str]) -> str:
        return "".join(s.replace(".", "").lstrip("0") for s in level)

    levels = [asks[k] for k in sorted(asks)[:10]] + [bids[k] for k in sorted(bids, reverse=True)[:10]]
    return zlib.crc32("".join(map(text, levels)).encode())


@dataclass
class Reference:
    """One connection's books rebuilt from its raw frames. `None`: out of sync until the next snapshot."""

    venue: str
    depth: int
    books: dict[str, tuple[Side, Side] | None] = field(default_factory=dict)
    last_seq: int | None = None
    agreed: int = 0
    disagreed: int = 0
    #: Per Kraken book message: True when the checksum disagreed (the adapter's verdict must be the same).
    verdicts: list[tuple[str, bool]] = field(default_factory=list)
    gaps: int = 0

    def on_frame(self, raw: bytes) -> None:
        if self.venue == "coinbase":
            self._coinbase(json.loads(raw))
        else:
            self._kraken(json.loads(raw, parse_float=str, parse_int=str))

    @staticmethod
    def _apply(side: Side, price: str, qty: str) -> None:
        if Decimal(qty) == 0:
            side.pop(Decimal(price), None)
        else:
            side[Decimal(price)] = (price, qty)

    def _coinbase(self, msg: dict[str, Any]) -> None:
        seq = msg.get("sequence_num")
        if seq is not None:  # one counter per connection over every channel: a jump may have been any product's
            if self.last_seq is not None and seq != self.last_seq + 1:
                self.gaps += 1
                self.books = dict.fromkeys(self.books)
            self.last_seq = seq
        if msg.get("channel") != "l2_data":
            return
        for ev in msg["events"]:
            product = ev["product_id"]
            if ev["type"] == "snapshot":
                self.books[product] = ({}, {})
            book = self.books.get(product)
            if book is None:
                continue
            for u in ev["updates"]:
                self._apply(book[0] if u["side"] == "bid" else book[1], u["price_level"], u["new_quantity"])

    def _kraken(self, msg: dict[str, Any]) -> None:
        if msg.get("channel") != "book":
            return
        for item in msg["data"]:
            symbol = item["symbol"]
            if msg["type"] == "snapshot":
                self.books[symbol] = ({}, {})
            book = self.books.get(symbol)
            if book is None:
                continue  # between a mismatch and the resubscription's snapshot
            bids, asks = book
            for side, rows in ((bids, item["bids"]), (asks, item["asks"])):
                for row in rows:
                    self._apply(side, row["price"], row["qty"])
            for side, keep in ((bids, sorted(bids, reverse=True)[: self.depth]), (asks, sorted(asks)[: self.depth])):
                for k in set(side) - set(keep):  # Kraken sends no removal for a level pushed out of the depth
                    del side[k]
            bad = kraken_crc32(bids, asks) != int(item["checksum"])
            self.verdicts.append((symbol, bad))
            if bad:
                self.disagreed += 1
                self.books[symbol] = None
            else:
                self.agreed += 1

    def top(self, venue_symbol: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]] | None:
        book = self.books.get(venue_symbol)
        if book is None:
            return None
        bids, asks = book
        return [bids[k] for k in sorted(bids, reverse=True)], [asks[k] for k in sorted(asks)]


# -- the harness: the simulator in-process, one connection through the adapter ------------------------------------
class _Transport:
    """What the simulator's `VenueConn` needs of a transport here: frames are captured, not written."""

    def abort(self) -> None:
        pass

    def is_closing(self) -> bool:
        return False

    def get_write_buffer_size(self) -> int:
        return 0


def capturing(kind: type[VenueServer]) -> type[VenueServer]:
    """The simulator with its send path captured per connection (no socket, no event loop)."""

    class Captured(kind):  # type: ignore[valid-type,misc]
        outbox: dict[int, list[bytes]]

        def send(self, c: VenueConn, data: bytes) -> None:
            if not c.closing:
                c.frames += 1
                self.outbox.setdefault(id(c), []).append(data)

        def drop(self, c: VenueConn, reason: str) -> None:
            c.closing = True
            self.conns.discard(c)

    return Captured


@dataclass
class Result:
    venue: str
    depth: int
    simulated_s: float
    symbols: int
    trades: int = 0
    ticks: int = 0
    frames: int = 0
    book_messages: int = 0
    checkpoints: int = 0
    books_compared: int = 0
    mismatches: list[str] = field(default_factory=list)
    faults: dict[str, int] = field(default_factory=dict)
    #: Frames or trades each kind of fault asked the simulator to lose or corrupt (its `count`s summed).
    fault_counts: dict[str, int] = field(default_factory=dict)
    sequence_gaps: int = 0
    reference_gaps: int = 0
    checksum_agreed: int = 0
    checksum_disagreed: int = 0
    adapter_mismatches: int = 0
    verdicts_differ: int = 0
    resyncs: int = 0
    reconnects: int = 0
    wall_s: float = 0.0

    @property
    def explained(self) -> bool:
        """Every checksum the reference found wrong was corrupted or followed a lost message (Kraken)."""
        return self.checksum_disagreed <= sum(self.fault_counts.get(k, 0) for k in ("corrupt_checksum",
                                                                                    "drop_book_update"))  # fmt: skip

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.verdicts_differ == 0 and self.checkpoints > 0 and self.explained


class Session:
    """One client connection: the adapter's frame handling as the collector's session does it, the reference
    fed the same frames."""

    def __init__(self, sim: VenueServer, adapter: Adapter, result: Result) -> None:
        self.sim, self.adapter, self.result = sim, adapter, result
        self.instruments = [adapter.symbols.venue(s) for s in sim.symbols]
        self.state = ConnectionState()
        self.reference = Reference(result.venue, getattr(adapter, "depth", 0))
        self.verdicts: list[tuple[str, bool]] = []
        self.conn = self._open()

    def _open(self) -> VenueConn:
        c = VenueConn(cast(Any, None), cast(Any, _Transport()), "bench")
        self.sim.conns.add(c)
        self.state = ConnectionState()
        for inst in self.instruments:
            self.state.books[inst.symbol] = self.adapter.new_book(inst)
        self.reference.books, self.reference.last_seq = {}, None
        if isinstance(self.sim, KrakenSim):
            self.sim.on_open(c)  # the status greeting (Coinbase's on_open only arms its subscribe deadline)
        for msg in self.adapter.subscribe_messages(self.instruments):
            self.sim.on_message(c, msg)
        return c

    def drain(self) -> None:
        """Read every frame the simulator captured for this connection (resyncs answer at once, in order)."""
        outbox: dict[int, list[bytes]] = self.sim.outbox  # type: ignore[attr-defined]
        if self.conn.closing:  # dropped by the venue: a new connection, new snapshots
            outbox.pop(id(self.conn), None)
            self.result.reconnects += 1
            self.conn = self._open()
        frames = outbox.setdefault(id(self.conn), [])
        i = 0
        while i < len(frames):
            self._read(frames[i])
            i += 1
        frames.clear()

    def _read(self, raw: bytes) -> None:
        self.result.frames += 1
        self.reference.on_frame(raw)
        frame = self.adapter.parse_frame(raw, RECV)
        if isinstance(frame, Rejected):
            self.result.mismatches.append(f"frame rejected by the adapter: {frame.reason} {frame.detail[:80]}")
            return
        outcome, hit = self.state.on_frame(frame)
        if outcome is SeqOutcome.GAP:
            self.result.sequence_gaps += 1
            self._resync(hit)
        for ev in frame.events:
            if not isinstance(ev, base.BookUpdate):
                continue
            self.result.book_messages += 1
            got = self.state.books[ev.symbol].apply(ev)
            if ev.checksum is not None and got is not BookOutcome.NOT_SYNCED:  # the reference skips those too
                self.verdicts.append((ev.venue_symbol, got is BookOutcome.CHECKSUM_MISMATCH))
            if got is BookOutcome.CHECKSUM_MISMATCH:
                self.result.adapter_mismatches += 1
                self._resync([ev.symbol])

    def _resync(self, symbols: list[str]) -> None:
        if symbols:
            self.result.resyncs += len(symbols)
            for msg in self.adapter.resync_messages([self.adapter.symbols.by_symbol[s] for s in symbols]):
                self.sim.on_message(self.conn, msg)

    def checkpoint(self, label: str) -> None:
        """Every book of the adapter against the reference's and the simulator's."""
        self.result.checkpoints += 1
        for inst in self.instruments:
            book = self.state.books[inst.symbol]
            mine = book.top(10**6) if book.valid else None
            ref = self.reference.top(inst.venue_symbol)
            if isinstance(self.sim, KrakenSim):
                truth = self.sim.view(inst.venue_symbol, self.reference.depth)
            else:
                truth = self.sim.markets[inst.venue_symbol].book_text()
            self.result.books_compared += 1
            same = mine is not None and ref is not None and (list(mine[0]), list(mine[1])) == ref
            if not same or ref != truth:
                self.result.mismatches.append(
                    f"{label} {inst.venue_symbol}: adapter {'valid' if mine else 'invalid'}, reference "
                    f"{'valid' if ref else 'invalid'}, adapter==reference {same}, reference==simulator {ref == truth}"
                )


def reveal(sim: VenueServer) -> int:
    """Before a checkpoint: a loss shows only at the next frame after it (Coinbase: the connection's next
    `sequence_num`; Kraken: the symbol's next book message, whose checksum covers the lost levels), so give
    every symbol one more trade once no loss is pending. Returns the trades made."""
    made = 0
    pending = getattr(sim, "lose_book", {})
    for vs in sim.symbols:
        while pending.get(vs):
            sim.step(1, vs)
            made += 1
        sim.step(1, vs)
        made += 1
    return made


def run(venue: str, minutes: float, checkpoints: int, rate: float, tick_s: float, seed: int, depth: int = 10,
        symbols: tuple[str, ...] = SYMBOLS, faults_per_minute: float = 1.0) -> Result:  # fmt: skip
    """One simulated run of `minutes` at `rate` trades/s with faults (of each kind about `faults_per_minute` per
    simulated minute, at random ticks); `checkpoints` evenly spread."""
    t_wall = time.monotonic()
    kind = capturing(CoinbaseSim if venue == "coinbase" else KrakenSim)
    sim = kind(SimConfig(symbols=symbols, rate=0.0, seed=seed))
    sim.outbox = {}  # type: ignore[attr-defined]
    adapter: Adapter = (
        CoinbaseAdapter(sim.symbols, ws_url="ws://bench", rest_url="http://bench", brokerage_url="http://bench")
        if venue == "coinbase"
        else KrakenAdapter(sim.symbols, depth=depth, ws_url="ws://bench", rest_url="http://bench")
    )
    ticks = max(1, round(minutes * 60 / tick_s))
    res = Result(venue, depth if venue == "kraken" else 0, round(ticks * tick_s, 1), len(symbols))
    session = Session(sim, adapter, res)
    rng = random.Random(f"{seed}:{venue}:faults")
    every = max(1, ticks // checkpoints)
    # A fault tick is never a checkpoint tick.
    fault_p = faults_per_minute * tick_s / 60.0
    kinds = ["skip_sequence", "drop_connections", "skip_trades"] if venue == "coinbase" else [
        "drop_book_update", "corrupt_checksum", "drop_connections", "skip_trades"]  # fmt: skip
    carry = 0.0
    session.drain()
    for tick in range(1, ticks + 1):
        for k in kinds:
            if rng.random() < fault_p and tick % every:
                symbol = rng.choice(sim.symbols)
                count = rng.randint(1, 3)
                sim.faults[k](sim, symbol, count)
                res.faults[k] = res.faults.get(k, 0) + 1
                res.fault_counts[k] = res.fault_counts.get(k, 0) + count
        carry += rate * tick_s
        n, carry = int(carry), carry - int(carry)
        if n:
            sim.step(n)
            res.trades += n
        session.drain()
        if tick % every == 0:
            res.trades += reveal(sim)
            session.drain()
            session.checkpoint(f"tick {tick} (t={tick * tick_s:.0f}s)")
    res.ticks = ticks
    res.reference_gaps = session.reference.gaps
    res.checksum_agreed, res.checksum_disagreed = session.reference.agreed, session.reference.disagreed
    theirs = session.reference.verdicts
    res.verdicts_differ = sum(1 for a, b in zip(session.verdicts, theirs, strict=False) if a != b) + abs(
        len(session.verdicts) - len(theirs))  # fmt: skip
    if venue == "coinbase" and res.reference_gaps != res.sequence_gaps:
        res.mismatches.append(f"sequence gaps: adapter {res.sequence_gaps}, reference {res.reference_gaps}")
    res.wall_s = round(time.monotonic() - t_wall, 1)
    return res


def markdown(results: list[Result], command: str, load: tuple[float, float, float]) -> str:
    lines = ["# Venue books against an independent reference rebuild (issue 18)", "",
             f"`{command}` — {'PASS' if all(r.ok for r in results) else 'FAIL'}", "",
             "A simulated hour per venue (time-compressed: the simulator stepped in-process, no sockets, no wall "
             "clock), with the simulator's venue faults; at each checkpoint every book of the adapter is compared "
             "with the reference rebuilt from the same raw frames by the venue's documented rules "
             "(`tickbridge_dev.bench.venuebooks.Reference`, independent of the adapter) and with the simulator's "
             "own book. Kraken: the reference's CRC32 is checked on every book message.", "",
             "| | " + " | ".join(r.venue + (f" (depth {r.depth})" if r.depth else "") for r in results) + " |",
             "|---|" + "---|" * len(results)]  # fmt: skip
    rows: list[tuple[str, Any]] = [
        ("simulated s", lambda r: f"{r.simulated_s:,.0f}"),
        ("symbols", lambda r: r.symbols),
        ("trades", lambda r: f"{r.trades:,}"),
        ("frames read", lambda r: f"{r.frames:,}"),
        ("book messages", lambda r: f"{r.book_messages:,}"),
        (
            "faults injected (messages or trades)",
            lambda r: ", ".join(f"{k} {v} ({r.fault_counts.get(k, 0)})" for k, v in sorted(r.faults.items())),
        ),
        ("reconnects", lambda r: r.reconnects),
        ("sequence gaps (adapter / reference)", lambda r: f"{r.sequence_gaps} / {r.reference_gaps}"),
        ("checksum agreed / disagreed (reference)", lambda r: f"{r.checksum_agreed:,} / {r.checksum_disagreed}"),
        ("adapter checksum mismatches", lambda r: r.adapter_mismatches),
        ("every disagreement a corrupted or lost message", lambda r: r.explained),
        ("verdicts differing (adapter vs reference)", lambda r: r.verdicts_differ),
        ("books resynced", lambda r: r.resyncs),
        ("checkpoints", lambda r: r.checkpoints),
        ("books compared", lambda r: f"{r.books_compared:,}"),
        ("books differing", lambda r: len(r.mismatches)),
        ("wall s", lambda r: r.wall_s),
    ]
    for name, get in rows:
        lines.append(f"| {name} | " + " | ".join(str(get(r)) for r in results) + " |")
    lines += ["", f"Load average (1/5/15 min) at the start: {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f}."]
    for r in results:
        lines += [f"- {r.venue}: {m}" for m in r.mismatches[:10]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tickbridge_dev.bench.venuebooks", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--venue", choices=("coinbase", "kraken", "both"), default="both")
    parser.add_argument("--minutes", type=float, default=60.0, help="simulated minutes")
    parser.add_argument("--checkpoints", type=int, default=240)
    parser.add_argument("--rate", type=float, default=20.0, help="trades/s over all symbols (simulated)")
    parser.add_argument("--tick-s", type=float, default=0.1, help="simulated seconds per generation tick")
    parser.add_argument("--depth", type=int, default=10, help="Kraken book depth subscribed")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write <out>.md and <out>.json")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    venues = ("coinbase", "kraken") if args.venue == "both" else (args.venue,)
    results = [run(v, args.minutes, args.checkpoints, args.rate, args.tick_s, args.seed, args.depth) for v in venues]
    command = "python -m tickbridge_dev.bench.venuebooks " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, command, load)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".md").write_text(text)
        doc = {"command": command, "loadavg": load, "results": [asdict(r) | {"ok": r.ok} for r in results]}
        args.out.with_suffix(".json").write_text(json.dumps(doc, indent=2) + "\n")
    sys.exit(0 if all(r.ok for r in results) else 1)


if __name__ == "__main__":
    main()
