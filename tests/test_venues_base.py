"""The exchange adapter boundary: symbol normalization, times, records, sequence tracking, the shared level book,
every adapter against the `VenueAdapter` protocol, and Binance behind the boundary on the real captures (the
same ticks and book as the collector's own parser and procedure). Pure: no network, no servers."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from tickbridge.collector import parser
from tickbridge.collector.venues.base import (
    EXCHANGES,
    BookOutcome,
    BookUpdate,
    Control,
    Frame,
    Instrument,
    RestRequest,
    SeqOutcome,
    SequenceTracker,
    SymbolMap,
    TradeGap,
    VenueAdapter,
    VenueError,
    VenueTrade,
    iso_to_us,
    seconds_to_us,
    split_pair,
)
from tickbridge.collector.venues.binance import BinanceAdapter, depth_diff, split_symbol
from tickbridge.collector.venues.coinbase import CoinbaseAdapter
from tickbridge.collector.venues.kraken import KrakenAdapter
from tickbridge.collector.venues.levels import LevelBook
from tickbridge.core.tick import DepthDiff, TickError, Trade

RECV = 1_700_000_000_000_000


def test_one_symbol_form_across_venues() -> None:
    coinbase, kraken, kraken_legacy = split_pair("coinbase", "BTC-USD", "-"), split_pair("kraken", "BTC/USD", "/"), \
        split_pair("kraken", "XBT/USD", "/")  # fmt: skip
    assert coinbase.symbol == kraken.symbol == kraken_legacy.symbol == "BTCUSD"
    assert (coinbase.venue_symbol, kraken.venue_symbol, kraken_legacy.venue_symbol) == ("BTC-USD", "BTC/USD", "XBT/USD")
    binance = split_symbol("BTCUSDT")
    assert (binance.base, binance.quote, binance.symbol, binance.venue_symbol) == ("BTC", "USDT", "BTCUSDT", "BTCUSDT")
    assert split_symbol("ETHFDUSD").quote == "FDUSD" and split_symbol("ETHBTC").base == "ETH"
    assert EXCHANGES == ("binance_spot", "coinbase", "kraken")


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: split_pair("coinbase", "BTCUSD", "-"), "BASE-QUOTE"),
        (lambda: split_pair("kraken", "/USD", "/"), "BASE/QUOTE"),
        (lambda: split_pair("kraken", "BT C/USD", "/"), "base"),
        (lambda: Instrument("bitstamp", "BTC", "USD", "btcusd"), "exchange"),
        (lambda: split_symbol("XYZ"), "no known quote"),
        (lambda: SymbolMap([split_pair("kraken", "XBT/USD", "/"), split_pair("kraken", "BTC/USD", "/")]), "both"),
    ],
)
def test_bad_symbols_are_one_line(build: object, match: str) -> None:
    with pytest.raises(VenueError, match=match) as info:
        build()  # type: ignore[operator]
    assert "\n" not in str(info.value)


def test_symbol_map() -> None:
    m = SymbolMap([split_pair("coinbase", "BTC-USD", "-"), split_pair("coinbase", "ETH-USD", "-")])
    assert m.venue("ETH-USD").symbol == "ETHUSD" and m.by_symbol["BTCUSD"].venue_symbol == "BTC-USD" and len(m) == 2
    assert [i.venue_symbol for i in m] == ["BTC-USD", "ETH-USD"]
    with pytest.raises(VenueError, match="not subscribed"):
        m.venue("SOL-USD")
    with pytest.raises(VenueError, match="not subscribed"):
        m.venue(None)


def test_times() -> None:
    assert iso_to_us("t", "2023-02-09T20:32:50.714964855Z") == 1675974770714964  # ns cut to µs
    assert iso_to_us("t", "2023-02-09T20:32:50Z") == 1675974770000000
    assert iso_to_us("t", "2023-02-09 20:32:50.5+00:00") == 1675974770500000
    assert seconds_to_us("t", "1688669597.8277369") == 1688669597827736
    assert seconds_to_us("t", 1688669597) == 1688669597000000
    bad_times = ("2023-02-09T20:32:50", "2023-02-30T00:00:00Z", "2023-02-09T25:00:00Z", 5, "x", "2023-02-09T20:32:50.Z",
                 "٢٠٢٣-02-09T20:32:50Z")  # fmt: skip
    for bad in bad_times:
        with pytest.raises(VenueError):
            iso_to_us("t", bad)
    for bad_s in ("1e9", "-1", True, None, "1.2.3"):
        with pytest.raises(VenueError):
            seconds_to_us("t", bad_s)


def test_records_validate_like_the_shared_ticks() -> None:
    good = {"symbol": "BTCUSDT", "price": "1.5", "volume": "2", "side": "BUY", "timestamp": RECV, "trade_id": 7,
            "recv_ts": RECV, "exchange": "binance_spot", "venue_symbol": "BTCUSDT"}  # fmt: skip
    trade = VenueTrade(**good)  # type: ignore[arg-type]
    assert trade.to_tick() == Trade(symbol="BTCUSDT", price="1.5", volume="2", side="BUY", timestamp=RECV, trade_id=7,
                                    recv_ts=RECV)  # fmt: skip
    for key, value in [("price", "0"), ("side", "buy"), ("timestamp", 5), ("trade_id", -1), ("exchange", "ftx"),
                       ("symbol", "btc-usd"), ("volume", 1)]:  # fmt: skip
        with pytest.raises(TickError):
            VenueTrade(**{**good, key: value})  # type: ignore[arg-type]
    book = {"symbol": "BTCUSD", "exchange": "kraken", "timestamp": RECV, "bids": (), "asks": (), "recv_ts": RECV,
            "snapshot": True, "venue_symbol": "BTC/USD"}  # fmt: skip
    BookUpdate(**book)  # type: ignore[arg-type]
    with pytest.raises(VenueError, match="not a range"):
        BookUpdate(**book, update_ids=(5, 4))  # type: ignore[arg-type]
    with pytest.raises(VenueError, match="tuples"):
        BookUpdate(**{**book, "bids": [("1", "1")]})  # type: ignore[arg-type]
    with pytest.raises(VenueError, match="empty"):
        TradeGap("BTCUSD", 5, 4, after_us=RECV)


def test_sequence_tracker() -> None:
    t = SequenceTracker()
    assert [t.observe(s) for s in (7, 8, 8, 6, 11, 12)] == [
        SeqOutcome.FIRST,
        SeqOutcome.NEXT,
        SeqOutcome.STALE,
        SeqOutcome.STALE,
        SeqOutcome.GAP,
        SeqOutcome.NEXT,
    ]
    assert t.lost == 2 and t.last == 12


def test_level_book() -> None:
    book = LevelBook()
    book.load([("10.0", "1"), ("9.5", "2"), ("9", "3")], [("10.5", "1"), ("11", "2")])
    book.apply([("10.00", "4"), ("9.50", "0")], [("12", "1")])  # one price, two spellings
    assert book.top_bids(5) == [("10.00", "4"), ("9", "3")] and book.top_asks(2) == [("10.5", "1"), ("11", "2")]
    book.truncate(1)
    assert book.top_bids(5) == [("10.00", "4")] and book.top_asks(5) == [("10.5", "1")] and not book.crossed()
    book.apply([("11", "1")], [])
    assert book.crossed()


def test_every_adapter_is_a_venue_adapter() -> None:
    """mypy checks the structure (`VenueAdapter` is a Protocol); this checks what the values mean."""
    adapters: list[VenueAdapter] = [BinanceAdapter(["BTCUSDT"]), CoinbaseAdapter(["BTC-USD"]),
                                    KrakenAdapter(["BTC/USD"])]  # fmt: skip
    assert [a.exchange for a in adapters] == list(EXCHANGES)
    for a in adapters:
        (inst,) = list(a.symbols)
        url = a.connect_url([inst])
        assert url.startswith("wss://")
        assert a.limits.stale_after_s > 0 and a.limits.rest_per_s > 0
        book = a.new_book(inst)
        assert not book.valid and book.top(5) == ([], [])
        gap = TradeGap(inst.symbol, 10, 20, after_us=RECV)
        req = a.backfill_request(inst, gap)
        assert req is not None and req.base.startswith("https://")
        out = a.parse_frame(b"{oops", RECV)
        assert isinstance(out, parser.Rejected) and out.reason == "json"
    assert BinanceAdapter(["BTCUSDT"]).connect_url([split_symbol("BTCUSDT")]).endswith(
        "/stream?streams=btcusdt@trade/btcusdt@depth@100ms")  # fmt: skip


def _capture(path: Path) -> list[tuple[int, bytes]]:
    with gzip.open(path, "rb") as fh:
        return [(int(ts) // 1000, raw) for ts, _, raw in (line.rstrip(b"\n").partition(b" ") for line in fh)]


def test_binance_behind_the_boundary_matches_the_collector_on_real_captures(binance_data: Path) -> None:
    """Both captures through `BinanceAdapter`: every frame gives the ticks (or the rejection) the collector's parser
    gives; the book syncs on the capture's REST snapshot, then takes every diff without a gap, and wherever its
    update ID meets a `bookTicker`'s, its best bid and ask are the ticker's (an independent view of the book)."""
    a = BinanceAdapter(["ETHUSDT"])
    inst = a.symbols.venue("ETHUSDT")
    book = a.new_book(inst)
    outcomes: dict[BookOutcome, int] = {}
    trades = 0
    tickers: dict[int, tuple[tuple[str, str], tuple[str, str]]] = {}
    tops: dict[int, tuple[tuple[str, str], tuple[str, str]]] = {}
    for name in ("ethusdt_20240808.gz", "ethusdt_20240809.gz"):
        for recv, raw in _capture(binance_data / name):
            if not raw.startswith(b'{"stream"'):  # the REST snapshot line
                snap = a.parse_snapshot(inst, raw, recv)
                outcome = book.apply(snap)
                assert outcome is BookOutcome.SYNCED, outcome
                assert book.released == []  # both diffs that came before the answer were already in it
                continue
            mine, theirs = a.parse_frame(raw, recv), parser.parse_frame(raw, recv)
            if isinstance(theirs, parser.Rejected):
                assert mine == theirs
                data = orjson.loads(raw)["data"]
                if "b" in data and "B" in data:  # bookTicker: best bid and ask after update `u`
                    tickers[data["u"]] = ((data["b"], data["B"]), (data["a"], data["A"]))
                continue
            assert isinstance(mine, Frame)
            (event,) = mine.events
            if isinstance(theirs, Trade):
                assert isinstance(event, VenueTrade) and event.to_tick() == theirs
                trades += 1
                continue
            assert isinstance(theirs, DepthDiff) and isinstance(event, BookUpdate) and depth_diff(event) == theirs
            outcome = book.apply(event)
            outcomes[outcome] = outcomes.get(outcome, 0) + 1
            if outcome is BookOutcome.APPLIED:
                bids, asks = book.top(1)
                tops[theirs.last_update_id] = (bids[0], asks[0])
    assert trades == 6106 + 8409
    assert BookOutcome.GAP not in outcomes and outcomes[BookOutcome.APPLIED] > 6000, outcomes
    both = tops.keys() & tickers.keys()  # the ticker arrives before or after the 100 ms diff holding its update
    assert len(both) >= 200, len(both)
    for u in both:
        assert tops[u] == tickers[u], u


def test_binance_rest_paths() -> None:
    a = BinanceAdapter(["ETHUSDT"])
    inst = a.symbols.venue("ETHUSDT")
    gap = TradeGap("ETHUSDT", 100, 1500, after_us=RECV)
    req = a.backfill_request(inst, gap)
    assert (req.path, dict(req.params), req.cost) == (
        "/api/v3/historicalTrades", {"symbol": "ETHUSDT", "fromId": "100", "limit": "1000"}, 25)  # fmt: skip
    rows = [{"id": i, "price": "2600.01", "qty": "0.5", "time": 1723161255342, "isBuyerMaker": i % 2 == 0}
            for i in range(100, 1100)]  # fmt: skip
    page = a.parse_backfill(inst, gap, orjson.dumps(rows), RECV)
    assert len(page.trades) == 1000 and page.trades[0].side == "SELL" and page.trades[0].timestamp == 1723161255342000
    assert page.next is not None and dict(page.next.params) == {"symbol": "ETHUSDT", "fromId": "1100", "limit": "401"}
    bad = a.parse_backfill(inst, gap, orjson.dumps([{"id": 1500, "isBuyerMaker": "no"}, "two\nlines"]), RECV)
    assert bad.trades == () and bad.next is None and "boolean" in bad.rejected[0]
    assert "two lines" in bad.rejected[1]  # every reason is one line (found by tests/test_fuzz_venues.py)
    snap = a.snapshot_request(inst, 1000)
    assert (snap.path, snap.cost) == ("/api/v3/depth", 50)
    with pytest.raises(VenueError, match="lastUpdateId"):
        a.parse_snapshot(inst, b'{"bids": [], "asks": []}', RECV)
    out = a.parse_frame(b'{"stream":"btcusdt@trade","data":{"e":"trade","E":1723161255343,"s":"BTCUSDT","t":1,'
                        b'"p":"1.0","q":"1.0","T":1723161255342,"m":true}}', RECV)  # fmt: skip
    assert isinstance(out, parser.Rejected) and out.reason == "unknown_symbol"
    out = a.parse_frame(b'{"e":"serverShutdown","E":1723161255343}', RECV)
    assert out == Frame((Control("server_shutdown", "1723161255343"),))


def _serve(req: RestRequest, history: list[tuple[int, int]]) -> bytes:
    """A model of each venue's trades endpoint over `history` [(trade ID, time µs)], as documented."""
    p = dict(req.params)
    if req.path == "/api/v3/historicalTrades":  # Binance: from an ID, oldest first
        rows = [r for r in history if r[0] >= int(p["fromId"])][: int(p["limit"])]
        return orjson.dumps([{"id": i, "price": "1.5", "qty": "2", "time": t // 1000, "isBuyerMaker": True}
                             for i, t in rows])  # fmt: skip
    if req.path.startswith("/products/"):  # Coinbase Exchange: IDs below `after`, newest first
        rows = [r for r in reversed(history) if r[0] < int(p["after"])][: int(p["limit"])]
        return orjson.dumps([{"trade_id": i, "price": "1.5", "size": "2", "side": "buy",
                              "time": f"2024-01-01T00:00:{(t // 1_000_000) % 60:02d}.{t % 1_000_000:06d}Z"}
                             for i, t in rows])  # fmt: skip
    assert req.path == "/0/public/Trades"  # Kraken: after a time (ns), oldest first; `last` continues
    rows = [r for r in history if r[1] * 1000 > int(p["since"])][: int(p["count"])]
    last = str(rows[-1][1] * 1000) if rows else p["since"]
    body = [["1.5", "2", f"{t // 1_000_000}.{t % 1_000_000:06d}", "b", "m", "", i] for i, t in rows]
    return orjson.dumps({"error": [], "result": {"XXBTZUSD": body, "last": last}})


@pytest.mark.parametrize("venue", ["binance", "coinbase", "kraken"])
@pytest.mark.parametrize("kept_from", [1, 2000])
def test_backfill_pages_cover_a_gap(venue: str, kept_from: int) -> None:
    """A gap of 2,501 trades, paged through a model of each venue's endpoint: every trade the venue still has comes
    back once (each page in ID order; Coinbase pages run newest first, so the session merges them with
    `gap_trades` before appending), and paging stops (the rest is lost) when the venue has no more."""
    a: VenueAdapter = {"binance": BinanceAdapter(["BTCUSDT"]), "coinbase": CoinbaseAdapter(["BTC-USDT"]),
                       "kraken": KrakenAdapter(["BTC/USDT"])}[venue]  # fmt: skip
    (inst,) = list(a.symbols)
    start = 1_704_067_200_000_000  # 2024-01-01, within one minute (Coinbase's model writes seconds only)
    history = [(i, start + i * 7_000) for i in range(kept_from, 5001)]
    gap = TradeGap(inst.symbol, 1200, 3700, after_us=start + 1199 * 7_000)
    req: RestRequest | None = a.backfill_request(inst, gap)
    got: list[int] = []
    requests = 0
    while req is not None:
        requests += 1
        assert requests < 20
        page = a.parse_backfill(inst, gap, _serve(req, history), RECV)
        assert page.rejected == ()
        got += [t.trade_id for t in page.trades]
        req = page.next
    assert sorted(got) == list(range(max(1200, kept_from), 3701)) and len(set(got)) == len(got)
    assert requests <= 4
