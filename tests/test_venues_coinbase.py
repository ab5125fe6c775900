"""Coinbase Advanced Trade adapter: parsing, connection sequence gaps, the level2 book against a reference rebuild,
REST back-fill paging by trade ID, and malformed input as one rejection, never a crash. Pure: no network."""

from __future__ import annotations

import random
from decimal import Decimal

import orjson
import pytest

from tickbridge.collector.parser import REASONS, Rejected
from tickbridge.collector.venues.base import (
    BookOutcome,
    BookUpdate,
    ConnectionState,
    Control,
    Frame,
    SeqOutcome,
    TradeGap,
    VenueError,
    VenueTrade,
)
from tickbridge.collector.venues.coinbase import MAX_FRAME_BYTES, CoinbaseAdapter, taker_side, trade_id_of

RECV = 1_700_000_000_000_000

# https://docs.cdp.coinbase.com/coinbase-app/advanced-trade-apis/websocket/websocket-channels#level2-channel
# (the snapshot example; an "offer" level added beside its bids).
DOC_L2_SNAPSHOT = {
    "channel": "l2_data",
    "client_id": "",
    "timestamp": "2023-02-09T20:32:50.714964855Z",
    "sequence_num": 0,
    "events": [
        {
            "type": "snapshot",
            "product_id": "BTC-USD",
            "updates": [
                {"side": "bid", "event_time": "1970-01-01T00:00:00Z", "price_level": "21921.73",
                 "new_quantity": "0.06317902"},
                {"side": "bid", "event_time": "1970-01-01T00:00:00Z", "price_level": "21921.3", "new_quantity": "0.02"},
                {"side": "offer", "event_time": "1970-01-01T00:00:00Z", "price_level": "21922.5",
                 "new_quantity": "0.5"},
            ],
        }
    ],
}  # fmt: skip
# Same page, market_trades channel example.
DOC_TRADES = {
    "channel": "market_trades",
    "client_id": "",
    "timestamp": "2023-02-09T20:19:35.39625135Z",
    "sequence_num": 0,
    "events": [
        {
            "type": "snapshot",
            "trades": [
                {"trade_id": "000000000", "product_id": "ETH-USD", "price": "1260.01", "size": "0.3", "side": "BUY",
                 "time": "2019-08-14T20:42:27.265Z"}
            ],
        }
    ],
}  # fmt: skip
# Same page, heartbeats channel example.
DOC_HEARTBEAT = {
    "channel": "heartbeats",
    "client_id": "",
    "timestamp": "2023-06-23T20:31:26.122969572Z",
    "sequence_num": 0,
    "events": [
        {"current_time": "2023-06-23 20:31:56.121961769 +0000 UTC m=+91717.525857105", "heartbeat_counter": "3049"}
    ],
}
# https://docs.cdp.coinbase.com/exchange/reference/exchangerestapi_getproducttrades (response example, the years
# moved from 2014 to 2024: the tick model refuses times before 2017).
DOC_REST_TRADES = (
    b'[{"time":"2024-11-07T22:19:28.578544Z","trade_id":74,"price":"10.00000000","size":"0.01000000","side":"buy"},'
    b'{"time":"2024-11-07T01:08:43.642366Z","trade_id":73,"price":"100.00000000","size":"0.01000000","side":"sell"}]'
)


def adapter() -> CoinbaseAdapter:
    return CoinbaseAdapter(["BTC-USD", "ETH-USD"])


def frame(a: CoinbaseAdapter, msg: object) -> Frame:
    out = a.parse_frame(orjson.dumps(msg), RECV)
    assert isinstance(out, Frame), out
    return out


def l2(seq: int, kind: str, product: str, levels: list[tuple[str, str, str]]) -> dict[str, object]:
    updates = [{"side": s, "event_time": "2024-01-01T00:00:00.5Z", "price_level": p, "new_quantity": q}
               for s, p, q in levels]  # fmt: skip
    return {"channel": "l2_data", "client_id": "", "timestamp": "2024-01-01T00:00:01.123456789Z",
            "sequence_num": seq, "events": [{"type": kind, "product_id": product, "updates": updates}]}  # fmt: skip


def test_doc_l2_snapshot() -> None:
    a = adapter()
    f = frame(a, DOC_L2_SNAPSHOT)
    (snap,) = f.events
    assert isinstance(snap, BookUpdate) and f.sequence == 0 and snap.sequence == 0
    assert snap.snapshot and snap.symbol == "BTCUSD" and snap.venue_symbol == "BTC-USD" and snap.exchange == "coinbase"
    assert snap.timestamp == 1675974770714964  # the message's time (ns cut to µs), not the levels' 1970 event_time
    assert snap.bids == (("21921.73", "0.06317902"), ("21921.3", "0.02")) and snap.asks == (("21922.5", "0.5"),)
    book = a.new_book(a.symbols.venue("BTC-USD"))
    assert book.apply(snap) is BookOutcome.SYNCED
    assert book.top(1) == ([("21921.73", "0.06317902")], [("21922.5", "0.5")])


def test_book_updates_and_removal() -> None:
    a = adapter()
    book = a.new_book(a.symbols.venue("BTC-USD"))
    upd = frame(a, l2(1, "update", "BTC-USD", [("bid", "21921.73", "0")])).events[0]
    assert isinstance(upd, BookUpdate)
    assert book.apply(upd) is BookOutcome.NOT_SYNCED  # no snapshot yet
    snap = frame(a, DOC_L2_SNAPSHOT).events[0]
    assert isinstance(snap, BookUpdate)
    book.apply(snap)
    assert book.apply(upd) is BookOutcome.APPLIED
    assert book.top(5)[0] == [("21921.3", "0.02")]
    again = frame(a, l2(2, "update", "BTC-USD", [("offer", "21922.50", "0.7"), ("bid", "21921.30", "0")])).events[0]
    assert isinstance(again, BookUpdate)
    book.apply(again)  # "21922.50" is the same level as "21922.5"
    assert book.top(5) == ([], [("21922.50", "0.7")])


def test_sequence_gap_invalidates_the_connection_books() -> None:
    a = adapter()
    conn = ConnectionState()
    for inst in a.symbols:
        conn.books[inst.symbol] = a.new_book(inst)
    for product, seq in (("BTC-USD", 0), ("ETH-USD", 1)):
        f = frame(a, l2(seq, "snapshot", product, [("bid", "10", "1"), ("offer", "11", "1")]))
        assert conn.on_frame(f) == (SeqOutcome.FIRST if seq == 0 else SeqOutcome.NEXT, [])
        for ev in f.events:
            assert isinstance(ev, BookUpdate)
            conn.books[ev.symbol].apply(ev)
    beat = frame(a, {**DOC_HEARTBEAT, "sequence_num": 2})
    assert conn.on_frame(beat) == (SeqOutcome.NEXT, [])  # heartbeats share the connection's numbering
    gap = frame(a, l2(5, "update", "ETH-USD", [("bid", "10", "2")]))
    assert conn.on_frame(gap) == (SeqOutcome.GAP, ["BTCUSD", "ETHUSD"])  # the lost frames could be any product's
    assert conn.sequence.lost == 2 and not any(b.valid for b in conn.books.values())
    assert conn.on_frame(frame(a, l2(4, "update", "ETH-USD", []))) == (SeqOutcome.STALE, [])
    unsub, sub = (orjson.loads(m) for m in a.resync_messages(list(a.symbols)))
    assert unsub == {"type": "unsubscribe", "channel": "level2", "product_ids": ["BTC-USD", "ETH-USD"]}
    assert sub["type"] == "subscribe"


def test_random_updates_agree_with_a_reference_book() -> None:
    """400 update frames over two products with removals and respellings: after each, the book equals a reference
    rebuilt from scratch from every level message so far (last write per price value wins, zeros removed)."""
    rng = random.Random(7)
    a = adapter()
    book = a.new_book(a.symbols.venue("BTC-USD"))
    history: list[tuple[str, str, str]] = [("bid", f"{100 - i}.5", "1.0") for i in range(20)]
    history += [("offer", f"{101 + i}.5", "2.0") for i in range(20)]
    snap = frame(a, l2(0, "snapshot", "BTC-USD", history)).events[0]
    assert isinstance(snap, BookUpdate)
    book.apply(snap)
    for seq in range(1, 401):
        levels = []
        for _ in range(rng.randint(1, 5)):
            side = rng.choice(["bid", "offer"])
            base = rng.randint(60, 100) if side == "bid" else rng.randint(101, 140)
            price = f"{base}.5" + "0" * rng.randint(0, 2)
            levels.append((side, price, "0" if rng.random() < 0.3 else f"{rng.randint(1, 10**6) / 1000}"))
        history += levels
        upd = frame(a, l2(seq, "update", "BTC-USD", levels)).events[0]
        assert isinstance(upd, BookUpdate)
        assert book.apply(upd) is BookOutcome.APPLIED
        ref: dict[str, dict[Decimal, tuple[str, str]]] = {"bid": {}, "offer": {}}
        for side, price, qty in history:
            ref[side].pop(Decimal(price), None)
            if Decimal(qty) != 0:
                ref[side][Decimal(price)] = (price, qty)
        bids, asks = book.top(10_000)
        assert bids == [ref["bid"][k] for k in sorted(ref["bid"], reverse=True)]
        assert asks == [ref["offer"][k] for k in sorted(ref["offer"])]


def test_doc_trade_side_is_the_takers() -> None:
    (trade,) = frame(adapter(), DOC_TRADES).events
    assert trade == VenueTrade(symbol="ETHUSD", price="1260.01", volume="0.3", side="SELL", timestamp=1565815347265000,
                               trade_id=0, recv_ts=RECV, exchange="coinbase", venue_symbol="ETH-USD")  # fmt: skip
    assert taker_side("sell") == "BUY" and trade_id_of("00042") == 42 and trade_id_of(42) == 42


def test_controls_and_subscribe_messages() -> None:
    a = adapter()
    assert frame(a, DOC_HEARTBEAT).events == (Control("heartbeat", "3049"),)
    subs = {"channel": "subscriptions", "client_id": "", "timestamp": "2023-02-09T20:32:50.714964855Z",
            "sequence_num": 1, "events": [{"subscriptions": {"level2": ["BTC-USD"]}}]}  # fmt: skip
    f = frame(a, subs)
    assert f.events == (Control("subscribed", "{'level2': ['BTC-USD']}"),) and f.sequence == 1
    msgs = [orjson.loads(m) for m in a.subscribe_messages(list(a.symbols))]
    assert [(m["type"], m["channel"]) for m in msgs] == [
        ("subscribe", "heartbeats"), ("subscribe", "market_trades"), ("subscribe", "level2")]  # fmt: skip
    assert msgs[1]["product_ids"] == ["BTC-USD", "ETH-USD"] and "product_ids" not in msgs[0]


def _trade(**changes: object) -> dict[str, object]:
    trade = {"trade_id": "5", "product_id": "BTC-USD", "price": "1.5", "size": "0.3", "side": "BUY",
             "time": "2024-01-01T00:00:00Z", **changes}  # fmt: skip
    return {"channel": "market_trades", "timestamp": "2024-01-01T00:00:00Z", "sequence_num": 3,
            "events": [{"type": "update", "trades": [trade]}]}  # fmt: skip


BAD = [
    (b"{", "json"),
    (b'"x"', "not_object"),
    (orjson.dumps({"type": "error", "message": "failure to subscribe"}), "exchange_error"),
    (orjson.dumps({"type": "error", "message": "two\nlines"}), "exchange_error"),
    (orjson.dumps({"channel": "ticker", "events": []}), "unknown_stream"),
    (orjson.dumps({"channel": "market_trades", "events": []}), "schema"),  # no sequence_num
    (orjson.dumps({"channel": "market_trades", "sequence_num": 1, "events": {}}), "schema"),
    (orjson.dumps({"channel": "market_trades", "sequence_num": -1, "events": []}), "schema"),
    (orjson.dumps({"channel": "market_trades", "sequence_num": 1, "events": [{"type": "delta", "trades": []}]}),
     "unknown_event"),
    (orjson.dumps(_trade(product_id="SOL-USD")), "unknown_symbol"),
    (orjson.dumps(_trade(side="HOLD")), "schema"),
    (orjson.dumps(_trade(trade_id="a1b2")), "schema"),
    (orjson.dumps(_trade(trade_id="１２")), "schema"),  # full-width digits: isdigit() but not ASCII
    (orjson.dumps(_trade(price="1e5")), "schema"),
    (orjson.dumps(_trade(size="0")), "schema"),
    (orjson.dumps(_trade(time="yesterday")), "schema"),
    (orjson.dumps(_trade(time="2024-02-30T00:00:00Z")), "schema"),
    (orjson.dumps({k: v for k, v in _trade().items() if k != "events"}), "schema"),
    (orjson.dumps(l2(1, "update", "BTC-USD", [("middle", "1", "1")])), "schema"),
    (orjson.dumps(l2(1, "update", "BTC-USD", [("bid", "-1", "1")])), "schema"),
    (orjson.dumps({**l2(1, "update", "BTC-USD", []), "timestamp": None}), "schema"),
    (orjson.dumps({"channel": "heartbeats", "sequence_num": 1, "events": [{}]}), "schema"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "reason"), BAD)
def test_malformed_frames_are_one_rejection(raw: bytes, reason: str) -> None:
    out = adapter().parse_frame(raw, RECV)
    assert isinstance(out, Rejected), out
    assert out.reason == reason and out.reason in REASONS
    assert "\n" not in out.detail


def test_large_snapshot_frames_are_allowed() -> None:
    """A full-depth BTC-USD snapshot is several MB: past Binance's 1 MiB frame limit, inside Coinbase's."""
    levels = [("bid", f"{i}.01", "1") for i in range(1, 40_001)]
    raw = orjson.dumps(l2(0, "snapshot", "BTC-USD", levels))
    assert 1 << 20 < len(raw) < MAX_FRAME_BYTES
    out = adapter().parse_frame(raw, RECV)
    assert isinstance(out, Frame) and len(out.events[0].bids) == 40_000  # type: ignore[union-attr]


def test_rest_backfill_pages_by_trade_id() -> None:
    a = adapter()
    inst = a.symbols.venue("BTC-USD")
    gap = TradeGap("BTCUSD", 73, 73, after_us=RECV)
    req = a.backfill_request(inst, gap)
    assert (req.base, req.path, dict(req.params)) == (
        "https://api.exchange.coinbase.com", "/products/BTC-USD/trades", {"after": "74", "limit": "1000"})  # fmt: skip
    page = a.parse_backfill(inst, gap, DOC_REST_TRADES, RECV)
    assert [(t.trade_id, t.side, t.price) for t in page.trades] == [(73, "BUY", "100.00000000")]  # maker sold
    assert page.next is None
    wide = TradeGap("BTCUSD", 10, 74, after_us=RECV)
    page = a.parse_backfill(inst, wide, DOC_REST_TRADES, RECV)
    assert [t.trade_id for t in page.trades] == [73, 74]  # ID order, whatever the answer's order
    assert page.next is not None and dict(page.next.params)["after"] == "73"
    assert a.parse_backfill(inst, wide, b"[]", RECV).next is None  # nothing older: the rest is lost


@pytest.mark.parametrize(
    ("body", "match"),
    [(b"{", "invalid JSON"), (b"{}", "expected a list")],
)
def test_rest_backfill_errors_are_one_line(body: bytes, match: str) -> None:
    a = adapter()
    with pytest.raises(VenueError, match=match):
        a.parse_backfill(a.symbols.venue("BTC-USD"), TradeGap("BTCUSD", 1, 2, after_us=RECV), body, RECV)


def test_rest_backfill_skips_bad_rows() -> None:
    """A bad row is skipped with its reason (its trade stays missing); the good ones and the paging go on."""
    a = adapter()
    body = DOC_REST_TRADES[:-1] + b',{"trade_id": 72},{"trade_id":71,"price":"1","size":"1","side":"buy","time":"x"}]'
    page = a.parse_backfill(a.symbols.venue("BTC-USD"), TradeGap("BTCUSD", 1, 74, after_us=RECV), body, RECV)
    assert [t.trade_id for t in page.trades] == [73, 74] and page.next is not None
    assert len(page.rejected) == 2 and "missing field 'price'" in page.rejected[0] and "RFC 3339" in page.rejected[1]


def test_rest_product_book() -> None:
    """https://docs.cdp.coinbase.com/api-reference/advanced-trade-api/rest-api/public/get-public-product-book
    (response shape)."""
    a = adapter()
    inst = a.symbols.venue("BTC-USD")
    req = a.snapshot_request(inst, 100)
    assert (req.base, req.path, dict(req.params)) == (
        "https://api.coinbase.com",
        "/api/v3/brokerage/market/product_book",
        {"product_id": "BTC-USD", "limit": "100"},
    )
    body = orjson.dumps({"pricebook": {"product_id": "BTC-USD", "bids": [{"price": "30000.01", "size": "0.5"}],
                                       "asks": [{"price": "30000.02", "size": "1.25"}],
                                       "time": "2023-07-06T19:04:31.123456Z"}})  # fmt: skip
    snap = a.parse_snapshot(inst, body, RECV)
    assert snap.snapshot and snap.bids == (("30000.01", "0.5"),) and snap.asks == (("30000.02", "1.25"),)
    assert snap.timestamp == 1688670271123456
    with pytest.raises(VenueError, match="not BTC-USD"):
        a.parse_snapshot(inst, body.replace(b"BTC-USD", b"ETH-USD"), RECV)


Truth = dict[str, tuple[dict[Decimal, str], dict[Decimal, str]]]


def _level_change(rng: random.Random, truth: Truth) -> dict[str, object]:
    """One random level change on the exchange's books, as the `l2_data` update that reports it."""
    product = rng.choice(list(truth))
    side = rng.randint(0, 1)
    book = truth[product][side]
    price = Decimal(rng.randint(60, 100) if side == 0 else rng.randint(101, 140))
    qty = "0" if price in book and rng.random() < 0.4 else f"{rng.randint(1, 500)}.{rng.randint(0, 9)}"
    if qty == "0":
        del book[price]
    else:
        book[price] = qty
    return l2(0, "update", product, [("bid" if side == 0 else "offer", str(price), qty)])


def test_simulated_feed_with_lost_frames() -> None:
    """3,000 frames of a model Coinbase connection (two products' level2 updates, market trades and heartbeats on one
    numbering), 2 % lost. Each loss is seen at the next frame as a sequence gap: both books are invalid until the
    resubscription's snapshots, and every update applied leaves each book equal to the exchange's."""
    rng = random.Random(3)
    a = adapter()
    conn = ConnectionState()
    truth: Truth = {}
    for inst in a.symbols:
        conn.books[inst.symbol] = a.new_book(inst)
        truth[inst.venue_symbol] = (
            {Decimal(100 - i): "1" for i in range(30)},
            {Decimal(101 + i): "1" for i in range(30)},
        )
    seq = 0

    def send(msg: dict[str, object], lose: bool = False) -> tuple[SeqOutcome | None, list[str]]:
        nonlocal seq
        msg["sequence_num"] = seq
        seq += 1
        if lose:
            return None, []
        f = frame(a, msg)
        outcome = conn.on_frame(f)
        for ev in f.events:
            if isinstance(ev, BookUpdate):
                conn.books[ev.symbol].apply(ev)
        return outcome

    def snapshot(product: str) -> dict[str, object]:
        bids, asks = truth[product]
        levels = [("bid", str(p), q) for p, q in bids.items()] + [("offer", str(p), q) for p, q in asks.items()]
        return l2(0, "snapshot", product, levels)

    for product in truth:
        send(snapshot(product))
    lost = gaps = checkpoints = 0
    for i in range(3000):
        lose = rng.random() < 0.02
        lost += lose
        kind = rng.random()
        if kind < 0.1:
            outcome = send({**DOC_HEARTBEAT}, lose)
        elif kind < 0.3:
            outcome = send(_trade(trade_id=str(i)), lose)
        else:
            outcome = send(_level_change(rng, truth), lose)
        if outcome[0] is SeqOutcome.GAP:
            gaps += 1
            assert sorted(outcome[1]) == ["BTCUSD", "ETHUSD"] and not any(b.valid for b in conn.books.values())
            for product in truth:  # the resubscription: a snapshot per product, on the same numbering
                send(snapshot(product))
        for product, (bids, asks) in truth.items():
            book = conn.books[a.symbols.venue(product).symbol]
            if book.valid and not lose:  # after a loss the books are stale until the next frame shows the gap
                got = book.top(1000)
                assert got[0] == [(str(p), q) for p, q in sorted(bids.items(), reverse=True)]
                assert got[1] == [(str(p), q) for p, q in sorted(asks.items())]
                checkpoints += 1
    assert lost >= 40 and gaps >= lost - 5 and checkpoints >= 5000, (lost, gaps, checkpoints)
