"""Synthetic per-symbol market: an order book, a trade tape and Binance's ID bookkeeping.

Prices and quantities are integers in units of 1e-8 (Binance shows 8 decimals), so the book is exact
and formatting is a cheap integer split. One update-ID counter per symbol advances by one per level
change, shared by the diff-depth windows and bookTicker, exactly like the real exchange. Every random
draw comes from a per-symbol `random.Random(f"{seed}:{symbol}")` and never depends on timing, so the
n-th trade of a symbol (id, price, qty, side) is the same for the same seed whatever the rate.
"""

from __future__ import annotations

import math
import random
import zlib
from array import array
from bisect import bisect_left, insort
from statistics import NormalDist
from typing import Any

SCALE = 100_000_000
#: Binance caps overflowing quantities at the signed 64-bit maximum at precision 8.
MAX_QTY = 2**63 - 1

#: Rough mid-2024 prices so the synthetic tape looks like the real one.
REFERENCE_PRICES: dict[str, float] = {
    "BTCUSDT": 61000, "ETHUSDT": 2680, "BNBUSDT": 520, "SOLUSDT": 150, "XRPUSDT": 0.55, "DOGEUSDT": 0.105,
    "ADAUSDT": 0.35, "TRXUSDT": 0.135, "AVAXUSDT": 22, "LINKUSDT": 11, "DOTUSDT": 4.6, "TONUSDT": 6.5,
    "SHIBUSDT": 0.0000138, "LTCUSDT": 60, "BCHUSDT": 330, "NEARUSDT": 4.5, "UNIUSDT": 6.6, "APTUSDT": 6.5,
    "ICPUSDT": 8.1, "ETCUSDT": 19, "XLMUSDT": 0.092, "FILUSDT": 3.6, "ATOMUSDT": 5.6, "ARBUSDT": 0.56,
    "OPUSDT": 1.4, "HBARUSDT": 0.061, "INJUSDT": 19, "SUIUSDT": 0.82, "VETUSDT": 0.022, "AAVEUSDT": 100,
    "GRTUSDT": 0.15, "RENDERUSDT": 5.6, "ALGOUSDT": 0.12, "SEIUSDT": 0.3, "TIAUSDT": 5.1, "STXUSDT": 1.5,
    "IMXUSDT": 1.3, "LDOUSDT": 1.1, "RUNEUSDT": 3.5, "EGLDUSDT": 30, "SANDUSDT": 0.25, "MANAUSDT": 0.27,
    "AXSUSDT": 4.8, "FLOWUSDT": 0.5, "CHZUSDT": 0.065, "PEPEUSDT": 0.0000085, "WIFUSDT": 1.5, "FETUSDT": 0.9,
    "CRVUSDT": 0.27, "ENAUSDT": 0.35,
}  # fmt: skip


def fmt8(value: int) -> str:
    """Integer 1e-8 units -> Binance's 8-decimal string."""
    return f"{value // SCALE}.{value % SCALE:08d}"


def parse8(text: str) -> int:
    """Binance decimal string -> integer 1e-8 units (exact)."""
    whole, _, frac = text.partition(".")
    return int(whole) * SCALE + int((frac + "00000000")[:8])


class TradeHistory:
    """Bounded ring of the last `cap` trades of one symbol, columnar (compact at 100k rows)."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.first_id: int | None = None
        self.count = 0
        self._price = array("q")
        self._qty = array("q")
        self._time = array("q")
        self._maker = array("b")

    def append(self, trade_id: int, price: int, qty: int, time_ms: int, buyer_maker: bool) -> None:
        if self.first_id is None:
            self.first_id = trade_id
        if len(self._price) < self.cap:
            self._price.append(price)
            self._qty.append(qty)
            self._time.append(time_ms)
            self._maker.append(buyer_maker)
        else:
            slot = (trade_id - self.first_id) % self.cap
            self._price[slot] = price
            self._qty[slot] = qty
            self._time[slot] = time_ms
            self._maker[slot] = buyer_maker
        self.count += 1

    @property
    def last_id(self) -> int | None:
        return None if self.first_id is None else self.first_id + self.count - 1

    def row(self, trade_id: int) -> tuple[int, int, int, bool] | None:
        """(price, qty, time, buyer_maker) of one held trade, None if not held (evicted or not yet made)."""
        last, oldest = self.last_id, self.oldest_id
        if last is None or oldest is None or not oldest <= trade_id <= last:
            return None
        assert self.first_id is not None
        slot = (trade_id - self.first_id) % self.cap
        return self._price[slot], self._qty[slot], self._time[slot], bool(self._maker[slot])

    @property
    def oldest_id(self) -> int | None:
        """Oldest trade still held (older ones were evicted)."""
        if self.first_id is None:
            return None
        return self.first_id + max(0, self.count - self.cap)

    def rows(self, from_id: int | None, limit: int) -> list[dict[str, Any]]:
        """`historicalTrades` rows from `from_id` (default: the most recent `limit`)."""
        last, oldest = self.last_id, self.oldest_id
        if last is None or oldest is None:
            return []
        start = last - limit + 1 if from_id is None else from_id
        start = max(start, oldest)
        end = min(last, start + limit - 1)
        out: list[dict[str, Any]] = []
        assert self.first_id is not None
        for tid in range(start, end + 1):
            slot = (tid - self.first_id) % self.cap
            price, qty = self._price[slot], self._qty[slot]
            out.append(
                {
                    "id": tid,
                    "price": fmt8(price),
                    "qty": fmt8(qty),
                    "quoteQty": fmt8(price * qty // SCALE),
                    "time": self._time[slot],
                    "isBuyerMaker": bool(self._maker[slot]),
                    "isBestMatch": True,
                }
            )
        return out


_QUANTILES = 1024
_NORMAL_Z = [NormalDist().inv_cdf((i + 0.5) / _QUANTILES) for i in range(_QUANTILES)]


def _lognormal_table(mu: float, sigma: float, lot: int) -> list[int]:
    """Lot-rounded lognormal quantiles: one `random()` per draw instead of `lognormvariate` (hot path)."""
    return [(int(math.exp(mu + sigma * z)) + 1) * lot for z in _NORMAL_Z]


def _pow10_units(exponent: int) -> int:
    """10**exponent in 1e-8 units, at least 1."""
    return max(1, round(10.0 ** (exponent + 8)))


class SymbolMarket:
    """One symbol's book, tape, ID counters and pending diff windows."""

    def __init__(
        self,
        symbol: str,
        seed: int,
        depth_levels: int,
        history_cap: int,
        updates_per_trade: float,
        reference: float | None = None,
    ) -> None:
        self.symbol = symbol
        self.stream_prefix = symbol.lower()
        self.rng = random.Random(f"{seed}:{symbol}")
        rng = self.rng
        ref = reference or REFERENCE_PRICES.get(symbol) or 10.0 ** ((zlib.crc32(symbol.encode()) % 500) / 100.0 - 2.0)
        # Tick ~1e-6 of the price (0.01 for BTC), lot ~ one unit of quote currency.
        self.tick = _pow10_units(min(math.floor(math.log10(ref)) - 6, -2))
        self.lot = _pow10_units(min(math.floor(math.log10(1.0 / ref)), 0))
        lot_value = ref * self.lot / SCALE
        # Median trade ~150 USDT, median resting level ~3000 USDT, both lognormal.
        self.trade_sizes = _lognormal_table(math.log(max(1.0, 150.0 / lot_value)), 1.2, self.lot)
        self.level_sizes = _lognormal_table(math.log(max(1.0, 3000.0 / lot_value)), 1.3, self.lot)
        self.depth_levels = max(10, depth_levels)
        self.updates_per_trade = updates_per_trade
        self.update_id = rng.randrange(10_000_000_000, 50_000_000_000)
        self.next_trade_id = rng.randrange(100_000_000, 4_000_000_000)
        self.history = TradeHistory(history_cap)
        self.bids: list[int] = []  # ascending; best = bids[-1]
        self.asks: list[int] = []  # ascending; best = asks[0]
        self.bid_qty: dict[int, int] = {}
        self.ask_qty: dict[int, int] = {}
        # Pending diff windows: first update ID (0 = nothing pending) and the final qty per changed level.
        self.w100_first = 0
        self.w100_bids: dict[int, int] = {}
        self.w100_asks: dict[int, int] = {}
        self.w1000_first = 0
        self.w1000_bids: dict[int, int] = {}
        self.w1000_asks: dict[int, int] = {}
        self.suppress_trades = 0
        self.last_ticker: tuple[int, int, int, int] = (0, 0, 0, 0)
        mid = int(ref * SCALE) // self.tick * self.tick
        for i in range(self.depth_levels):
            gap = (i + 1) * self.tick * 2
            self.bid_qty[mid - gap] = self._level_qty()
            self.ask_qty[mid + gap - self.tick] = self._level_qty()
        self.bids = sorted(self.bid_qty)
        self.asks = sorted(self.ask_qty)

    def _level_qty(self) -> int:
        return self.level_sizes[int(self.rng.random() * _QUANTILES)]

    # -- book mutations (each = one update ID) ----------------------------------------------------------

    def _set(self, bid: bool, price: int, qty: int) -> None:
        book, levels = (self.bid_qty, self.bids) if bid else (self.ask_qty, self.asks)
        if qty == 0:
            if price not in book:
                return
            del book[price]
            del levels[bisect_left(levels, price)]
        elif price in book:
            book[price] = qty
        else:
            book[price] = qty
            insort(levels, price)
        self.update_id += 1
        if not self.w100_first:
            self.w100_first = self.update_id
        if not self.w1000_first:
            self.w1000_first = self.update_id
        if bid:
            self.w100_bids[price] = qty
            self.w1000_bids[price] = qty
        else:
            self.w100_asks[price] = qty
            self.w1000_asks[price] = qty

    def _trim(self, bid: bool) -> None:
        levels = self.bids if bid else self.asks
        while len(levels) > self.depth_levels:
            self._set(bid, levels[0] if bid else levels[-1], 0)

    def _place(self, bid: bool) -> None:
        """A new order at a random distance from the touch, densest near it (offset ~ U² · 2·depth ticks)."""
        levels, book = (self.bids, self.bid_qty) if bid else (self.asks, self.ask_qty)
        u = self.rng.random()
        offset = int(u * u * 2 * self.depth_levels) * self.tick
        if levels:
            price = levels[-1] - offset if bid else levels[0] + offset
        else:
            price = self.asks[0] - self.tick - offset if bid else self.bids[-1] + self.tick + offset
        if price > 0:
            self._set(bid, price, book.get(price, 0) + self._level_qty())

    def _quote_inside(self) -> None:
        """A market maker quotes inside a wide spread (this keeps it tight and makes the price walk)."""
        best_bid, best_ask = self.bids[-1], self.asks[0]
        ticks = (best_ask - best_bid) // self.tick
        if ticks <= 1:
            return
        k = 1 + int(self.rng.random() * (ticks - 1))  # 1 .. ticks-1: strictly inside
        if self.rng.random() < 0.5:
            self._set(True, best_bid + k * self.tick, self._level_qty())
        else:
            self._set(False, best_ask - k * self.tick, self._level_qty())

    def _noise(self) -> None:
        """An order amended or cancelled near the touch (~40 % removals, as in real data), then the side
        is topped up to `depth_levels` with a new order and trimmed at the far end."""
        rng = self.rng
        bid = rng.random() < 0.5
        levels = self.bids if bid else self.asks
        n = len(levels)
        r = rng.random()
        if n > 1 and r < 0.85:
            idx = int(rng.random() * min(20, n - 1))  # never empties the side
            price = levels[n - 1 - idx] if bid else levels[idx]
            self._set(bid, price, self._level_qty() if r < 0.45 else 0)
        if len(levels) < self.depth_levels:
            self._place(bid)
        self._trim(bid)

    # -- trades ---------------------------------------------------------------------------------------

    def trade(self, time_ms: int) -> tuple[int, int, int, bool]:
        """Generate one trade against the touch; returns (id, price, qty, buyer_is_maker)."""
        rng = self.rng
        taker_buys = rng.random() < 0.5
        if taker_buys:
            price = self.asks[0]
            avail = self.ask_qty[price]
        else:
            price = self.bids[-1]
            avail = self.bid_qty[price]
        qty = min(self.trade_sizes[int(rng.random() * _QUANTILES)], avail)
        left = avail - qty
        self._set(not taker_buys, price, left)
        if left == 0 and not (self.asks if taker_buys else self.bids):
            self._place(not taker_buys)  # never let a side run empty
        if rng.random() < 0.5:
            self._quote_inside()
        extra = self.updates_per_trade
        while extra > 0:
            if extra >= 1 or rng.random() < extra:
                self._noise()
            extra -= 1
        tid = self.next_trade_id
        self.next_trade_id += 1
        buyer_maker = not taker_buys
        self.history.append(tid, price, qty, time_ms, buyer_maker)
        return tid, price, qty, buyer_maker

    def trade_json(self, tid: int, price: int, qty: int, buyer_maker: bool, trade_ms: int, event_ms: int) -> str:
        return (
            f'{{"e":"trade","E":{event_ms},"s":"{self.symbol}","t":{tid},"p":"{fmt8(price)}","q":"{fmt8(qty)}",'
            f'"T":{trade_ms},"m":{"true" if buyer_maker else "false"},"M":true}}'
        )

    def ticker_json_if_changed(self) -> str | None:
        """bookTicker payload if the top of book moved since the last one."""
        bb, ba = self.bids[-1], self.asks[0]
        top = (bb, self.bid_qty[bb], ba, self.ask_qty[ba])
        if top == self.last_ticker:
            return None
        self.last_ticker = top
        return (
            f'{{"u":{self.update_id},"s":"{self.symbol}","b":"{fmt8(bb)}","B":"{fmt8(top[1])}",'
            f'"a":"{fmt8(ba)}","A":"{fmt8(top[3])}"}}'
        )

    # -- diff depth -----------------------------------------------------------------------------------

    def _depth_json(self, event_ms: int, first: int, bids: dict[int, int], asks: dict[int, int]) -> str:
        b = ",".join(f'["{fmt8(p)}","{fmt8(bids[p])}"]' for p in sorted(bids, reverse=True))
        a = ",".join(f'["{fmt8(p)}","{fmt8(asks[p])}"]' for p in sorted(asks))
        return (
            f'{{"e":"depthUpdate","E":{event_ms},"s":"{self.symbol}","U":{first},"u":{self.update_id},'
            f'"b":[{b}],"a":[{a}]}}'
        )

    def flush100(self, event_ms: int) -> str | None:
        """Close the 100 ms window: a depthUpdate if the book changed, else nothing (Binance sends no empties)."""
        if not self.w100_first:
            return None
        msg = self._depth_json(event_ms, self.w100_first, self.w100_bids, self.w100_asks)
        self.w100_first = 0
        self.w100_bids = {}
        self.w100_asks = {}
        return msg

    def flush1000(self, event_ms: int) -> str | None:
        if not self.w1000_first:
            return None
        msg = self._depth_json(event_ms, self.w1000_first, self.w1000_bids, self.w1000_asks)
        self.w1000_first = 0
        self.w1000_bids = {}
        self.w1000_asks = {}
        return msg

    def take_changes(self) -> tuple[dict[int, int], dict[int, int]]:
        """The levels changed since the last call (price -> final qty, 0 = removed), bids and asks; both
        Binance windows are reset (the Coinbase and Kraken simulators number nothing per symbol)."""
        bids, asks = self.w100_bids, self.w100_asks
        self.w100_first = self.w1000_first = 0
        self.w100_bids, self.w100_asks, self.w1000_bids, self.w1000_asks = {}, {}, {}, {}
        return bids, asks

    def skip_update_ids(self, n: int) -> None:
        """Lose the pending diff windows and jump the counter by `n`: the next event's U leaves a gap."""
        self.w100_first = self.w1000_first = 0
        self.w100_bids, self.w100_asks, self.w1000_bids, self.w1000_asks = {}, {}, {}, {}
        self.update_id += max(1, n)

    def big_diff(self, n: int) -> None:
        """~n-level window: `n` deep bid levels appear and vanish (removals of prices no snapshot showed),
        and a mid-book ask (out of reach of trades and trims) gets Binance's capped quantity
        (92233720368.54775807, the cap since 2022-05)."""
        far = self.bids[0]
        for k in range(1, n + 1):
            price = far - k * self.tick
            if price <= 0:
                break
            self._set(True, price, self.lot)
            self._set(True, price, 0)
        self._set(False, self.asks[len(self.asks) // 2], MAX_QTY)

    def snapshot(self, limit: int) -> dict[str, Any]:
        """`/api/v3/depth` body; `lastUpdateId` is the current counter, so it matches the diff stream."""
        bids = [[fmt8(p), fmt8(self.bid_qty[p])] for p in self.bids[: -limit - 1 : -1]]
        asks = [[fmt8(p), fmt8(self.ask_qty[p])] for p in self.asks[:limit]]
        return {"lastUpdateId": self.update_id, "bids": bids, "asks": asks}

    def book(self) -> tuple[dict[int, int], dict[int, int]]:
        """Copy of the full book (bids, asks) for oracles."""
        return dict(self.bid_qty), dict(self.ask_qty)
