"""Synthetic mode: seeded per-symbol markets generate trades at `rate` (zipf- or evenly spread over the
symbols), book tickers, and diff-depth windows on Binance's 100 ms / 1 s grid."""

from __future__ import annotations

import asyncio
import random
import time
from collections import deque
from typing import Any

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.market import SymbolMarket, TradeHistory
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.session import Hub
from tickbridge_dev.sim.source import MarketSource


class SyntheticSource(MarketSource):
    """The generator loop and its markets."""

    def __init__(self, config: SimConfig, hub: Hub, metrics: SimMetrics) -> None:
        super().__init__(config, hub, metrics, tuple(s.upper() for s in config.symbols))
        self.markets: dict[str, SymbolMarket] = {
            sym: SymbolMarket(
                sym, config.seed, config.depth_levels, config.history_per_symbol, config.book_updates_per_trade
            )
            for sym in self.symbols
        }
        raw = [1.0 / (i + 1) ** 0.8 if config.weights == "zipf" else 1.0 for i in range(len(self.symbols))]
        acc, self._cum_weights = 0.0, []
        for w in raw:
            acc += w
            self._cum_weights.append(acc)
        self._alloc_rng = random.Random(f"{config.seed}:alloc")
        self._bursts: deque[tuple[int, str | None]] = deque()
        # First trade ID actually sent per symbol: trades generated before anyone subscribed were never emitted.
        self._first_sent: dict[str, int] = {}
        #: Trades RATE asked for but skipped because the loop ran late: the load test's "machine too slow".
        self.shortfall = 0

    def on_connect(self) -> None:
        """Nothing to do: the generator runs from `start()` on."""

    def stats_extra(self) -> dict[str, Any]:
        return {"shortfall_trades": self.shortfall}

    # -- what REST and the faults ask ----------------------------------------------------------------------

    def history(self, symbol: str) -> TradeHistory:
        return self.markets[symbol].history

    async def snapshot(self, symbol: str, limit: int) -> dict[str, Any]:
        return self.markets[symbol].snapshot(limit)

    def snapshot_now(self, symbol: str, limit: int) -> dict[str, Any]:
        return self.markets[symbol].snapshot(limit)

    def book(self, symbol: str) -> tuple[dict[int, int], dict[int, int], int]:
        m = self.markets[symbol]
        bids, asks = m.book()
        return bids, asks, m.update_id

    def last_update_id(self, symbol: str) -> int:
        return self.markets[symbol].update_id

    def first_sent_trade_id(self, symbol: str) -> int | None:
        return self._first_sent.get(symbol)

    def skip_update_ids(self, symbol: str, n: int) -> None:
        self.markets[symbol].skip_update_ids(n)

    def skip_trade_ids(self, symbol: str, n: int) -> None:
        self.markets[symbol].suppress_trades += n

    def burst(self, n_trades: int, symbol: str | None) -> None:
        self._bursts.append((n_trades, None if symbol is None else self.known(symbol)))

    def big_diff(self, symbol: str, n: int) -> None:
        self.markets[self.known(symbol)].big_diff(n)

    # -- generation ----------------------------------------------------------------------------------------

    async def run(self) -> None:
        tick = self.config.tick_interval_s
        last = time.monotonic()
        carry = 0.0
        now_ms = time.time_ns() // 1_000_000
        next100 = (now_ms // 100 + 1) * 100
        next1000 = (now_ms // 1000 + 1) * 1000
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            dt, last = now - last, now
            now_ms = time.time_ns() // 1_000_000
            n = 0
            if not self.paused:
                carry += self.rate * dt
                n = int(carry)
                carry -= n
                # A late loop does not replay its whole backlog at once, and no tick may freeze the loop.
                cap = min(int(self.rate * 0.5) + 1, 10_000)
                if n > cap:
                    self.shortfall += n - cap
                    self.metrics.shortfall.inc(n - cap)
                    n, carry = cap, 0.0
            if n:
                self._produce(n, None, now_ms)
            budget = 5_000  # per tick, so a big burst does not freeze the loop (pings, readers)
            while self._bursts and budget > 0:
                count, sym = self._bursts.popleft()
                take = min(count, budget)
                self._produce(take, sym, now_ms)
                budget -= take
                if count > take:
                    self._bursts.appendleft((count - take, sym))
            if now_ms >= next100:
                self._flush_depth(now_ms // 100 * 100, "@depth@100ms")  # E on the grid, 100 ms apart as on Binance
                next100 = (now_ms // 100 + 1) * 100
            if now_ms >= next1000:
                self._flush_depth(now_ms // 1000 * 1000, "@depth")
                next1000 = (now_ms // 1000 + 1) * 1000
            self.hub.flush()

    def _flush_depth(self, grid_ms: int, suffix: str) -> None:
        for m in self.markets.values():
            msg = m.flush100(grid_ms) if suffix == "@depth@100ms" else m.flush1000(grid_ms)
            if msg is not None:
                self.hub.emit(m.stream_prefix + suffix, msg)
                self.last_depth[m.stream_prefix + suffix] = (m.symbol, msg)

    def _produce(self, n: int, symbol: str | None, now_ms: int) -> None:
        if symbol is None:
            picks = self._alloc_rng.choices(self.symbols, cum_weights=self._cum_weights, k=n)
        else:
            picks = [symbol] * n
        trade_ms = now_ms - 1  # E >= T, usually by a millisecond as on the real stream
        hub = self.hub
        subs = hub.subs
        markets = self.markets
        for sym in picks:
            m = markets[sym]
            tid, price, qty, maker = m.trade(trade_ms)
            if m.suppress_trades:
                m.suppress_trades -= 1
            else:
                stream = m.stream_prefix + "@trade"
                if stream in subs:
                    self._first_sent.setdefault(sym, tid)
                    hub.emit(stream, m.trade_json(tid, price, qty, maker, trade_ms, now_ms))
            ticker_stream = m.stream_prefix + "@bookTicker"
            if ticker_stream in subs:
                msg = m.ticker_json_if_changed()
                if msg is not None:
                    hub.emit(ticker_stream, msg)
        self.metrics.trades.inc(n)
