"""Fuzz the venue adapters (issue 18): whatever a Coinbase, Kraken or Binance frame or REST answer holds, the
adapter returns records or rejects in its own terms (`Rejected` with a bounded reason from a frame, one
`TickError`/`VenueError` line from a REST answer), never another exception. Inputs: the documented samples of
tests/test_venues_*.py with one part replaced or removed, and arbitrary bytes. `make fuzz` runs the long profile."""

from __future__ import annotations

import copy
import json
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_venues_coinbase import DOC_HEARTBEAT, DOC_L2_SNAPSHOT, DOC_REST_TRADES, DOC_TRADES
from test_venues_kraken import DOC_ACK, DOC_BOOK_UPDATE, DOC_TRADE, DOC_V2_SNAPSHOT
from test_venues_kraken import DOC_REST_TRADES as KRAKEN_REST_TRADES
from tickbridge.collector.parser import MAX_RAW_KEPT, REASONS, Rejected
from tickbridge.collector.venues.base import Frame, TradeGap, VenueAdapter
from tickbridge.collector.venues.binance import BinanceAdapter
from tickbridge.collector.venues.coinbase import CoinbaseAdapter
from tickbridge.collector.venues.kraken import KrakenAdapter
from tickbridge.core.tick import TickError

pytestmark = pytest.mark.timeout(60 if settings().max_examples <= 1000 else 1800)

RECV = 1_700_000_000_000_000
ADAPTERS: dict[str, VenueAdapter] = {
    "coinbase": CoinbaseAdapter(["BTC-USD", "ETH-USD"]),
    "kraken": KrakenAdapter(["BTC/USD", "MATIC/USD"]),
    "binance": BinanceAdapter(["ETHUSDT"]),
}
BINANCE_TRADE = {"stream": "ethusdt@trade", "data": {"e": "trade", "E": 1723161255343, "s": "ETHUSDT", "t": 3,
                 "p": "2600.01", "q": "0.5", "T": 1723161255342, "m": True}}  # fmt: skip
SAMPLES: dict[str, list[Any]] = {
    "coinbase": [DOC_L2_SNAPSHOT, DOC_TRADES, DOC_HEARTBEAT],
    "kraken": [DOC_V2_SNAPSHOT, json.loads(DOC_TRADE), json.loads(DOC_BOOK_UPDATE), json.loads(DOC_ACK)],
    "binance": [BINANCE_TRADE],
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12) | st.sampled_from(["BTC-USD", "BTC/USD", "0", "1.5", "snapshot", "update", "bid", "sell"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


@st.composite
def mutated(draw: st.DrawFn, samples: list[Any]) -> bytes:
    """A sample with one part replaced by any JSON value, or removed."""
    doc = copy.deepcopy(draw(st.sampled_from(samples)))
    path = draw(st.sampled_from(_paths(doc)))
    if not path:
        return json.dumps(draw(json_values)).encode()
    parent = doc
    for step in path[:-1]:
        parent = parent[step]
    if draw(st.booleans()):
        parent[path[-1]] = draw(json_values)
    else:
        del parent[path[-1]]
    return json.dumps(doc).encode()  # not orjson: it refuses integers past 64 bits


def _check(out: object) -> None:
    if isinstance(out, Rejected):
        assert out.reason in REASONS and len(out.raw) <= MAX_RAW_KEPT and "\n" not in out.detail
    else:
        assert isinstance(out, Frame)


@pytest.mark.parametrize("venue", list(ADAPTERS))
@given(data=st.data())
def test_fuzz_mutated_frames_never_crash(venue: str, data: st.DataObject) -> None:
    _check(ADAPTERS[venue].parse_frame(data.draw(mutated(SAMPLES[venue])), RECV))


@pytest.mark.parametrize("venue", list(ADAPTERS))
@given(raw=st.binary(max_size=300) | st.text(max_size=300))
def test_fuzz_arbitrary_frames_never_crash(venue: str, raw: bytes | str) -> None:
    _check(ADAPTERS[venue].parse_frame(raw, RECV))


REST_SAMPLES: dict[str, list[Any]] = {
    "coinbase": [orjson.loads(DOC_REST_TRADES)],
    "kraken": [json.loads(KRAKEN_REST_TRADES)],
    "binance": [[{"id": 5, "price": "2600.01", "qty": "0.5", "time": 1723161255342, "isBuyerMaker": True}]],
}


@pytest.mark.parametrize("venue", list(ADAPTERS))
@given(data=st.data())
def test_fuzz_rest_answers_are_records_or_one_line(venue: str, data: st.DataObject) -> None:
    a = ADAPTERS[venue]
    inst = next(iter(a.symbols))
    body = data.draw(mutated(REST_SAMPLES[venue]) | st.binary(max_size=200))
    gap = TradeGap(inst.symbol, 1, 10**9, after_us=RECV)
    try:
        page = a.parse_backfill(inst, gap, body, RECV)
    except TickError as exc:
        assert "\n" not in str(exc)
    else:
        assert all("\n" not in r for r in page.rejected)
        ids = [t.trade_id for t in page.trades]
        assert ids == sorted(set(ids))
    try:
        a.parse_snapshot(inst, body, RECV)
    except TickError as exc:
        assert "\n" not in str(exc)
