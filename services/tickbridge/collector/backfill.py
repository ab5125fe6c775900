"""Trade gaps: the missing trade IDs fetched from REST (`historicalTrades`) while the symbol's later trades are
parked, then appended in ID order."""

from __future__ import annotations

import logging

import orjson

from tickbridge.collector.base import MAX_AHEAD_US, MAX_BACKFILL, BackfillResult
from tickbridge.collector.book_publish import BookPublish
from tickbridge.collector.parser import (
    FUTURE_TIME,
    to_us,
)  # fmt: skip
from tickbridge.collector.publisher import FrameDeadLetter, Item
from tickbridge.collector.rest import RestCallFailed
from tickbridge.core.tick import TickError, Trade
from tickbridge.core.wire import now_us

log = logging.getLogger("tickbridge.collector.service")


class Backfill(BookPublish):
    """Back-fill of trade gaps, bounded by MAX_BACKFILL trades and `max_parked` parked ones."""

    def _start_backfill(self, trade: Trade, gen: int, last: int) -> None:
        """A gap before `trade` on the primary: fetch it from REST in the background, park the symbol."""
        symbol = trade.symbol
        self.metrics.trade_gaps.labels(symbol).inc()
        log.warning("%s: trade gap %d..%d, back-filling", symbol, last + 1, trade.trade_id - 1)
        self._parked[symbol] = [(gen, trade)]
        res = self._backfills[symbol] = BackfillResult(symbol, last + 1, trade.trade_id - 1, [])
        assert self._tg is not None
        self._backfill_tasks[symbol] = self._tg.create_task(
            self._fetch_backfill(res), name=f"collector-backfill-{symbol}"
        )

    async def _fetch_backfill(self, res: BackfillResult) -> None:
        """Pages of `historicalTrades` for `first..last` into `res.trades`; the processor appends them (other
        symbols go on)."""
        symbol, end, trades = res.symbol, res.last, res.trades
        start = max(res.first, end - MAX_BACKFILL + 1)
        next_id = start
        while next_id <= end:
            try:
                rows = await self.rest.historical_trades(symbol, next_id, min(1000, end - next_id + 1))
            except RestCallFailed as exc:
                log.error("%s: back-fill failed at %d: %s", symbol, next_id, exc)
                break
            progressed = False
            for row in rows:
                try:
                    tid = row["id"]
                    if not isinstance(tid, int) or tid < next_id:
                        continue
                    if tid > end:
                        break
                    maker = row["isBuyerMaker"]
                    recv = now_us()
                    trade = Trade(
                        symbol=symbol, price=row["price"], volume=row["qty"], side="SELL" if maker else "BUY",
                        timestamp=to_us(row["time"]), trade_id=tid, recv_ts=recv,
                    )  # fmt: skip
                    if trade.timestamp > recv + MAX_AHEAD_US:  # not appended: its ID stays a gap (lost)
                        res.future.append(
                            FrameDeadLetter(FUTURE_TIME, _ahead(trade, recv), orjson.dumps(row)[:4096], recv)
                        )
                        continue
                    trades.append(trade)
                except (KeyError, TypeError, TickError) as exc:
                    log.error("%s: bad historical trade %s: %s", symbol, str(row)[:200], exc)
                    continue
                next_id = tid + 1
                progressed = True
            if not progressed:
                break
        await self.inbox.put(res)

    def _on_backfill(self, res: BackfillResult, out: list[Item]) -> None:
        if self._backfills.get(res.symbol) is not res:
            return  # ended early (its trades were appended then); it finished before it saw the cancel
        del self._backfills[res.symbol]
        self._backfill_tasks.pop(res.symbol, None)
        self._finish_backfill(res, list(res.trades), out)

    def _end_backfill_early(self, symbol: str, out: list[Item]) -> None:
        """Too many trades parked: give up on the rest of the gap and let the symbol flow again."""
        res = self._backfills.pop(symbol)
        task = self._backfill_tasks.pop(symbol, None)
        if task is not None:
            task.cancel()  # it cannot add to `res.trades` any more: the cancel lands at its current await
        fetched = list(res.trades)
        first_lost = fetched[-1].trade_id + 1 if fetched else res.first
        log.warning("%s: %d trades parked behind the back-fill of %d..%d: ending it early, %d..%d lost",
                    symbol, len(self._parked[symbol]), res.first, res.last, first_lost, res.last)  # fmt: skip
        self._finish_backfill(res, fetched, out)

    def _finish_backfill(self, res: BackfillResult, trades: list[Trade], out: list[Item]) -> None:
        """Append the fetched trades, then the trades parked meanwhile (which may start another back-fill)."""
        symbol = res.symbol
        parked = self._parked.pop(symbol, [])
        for letter in res.future:
            self.metrics.dead_letters.labels(letter.reason).inc()
            out.append(letter)
        next_id = res.first
        for trade in trades:
            if trade.trade_id < next_id:
                continue
            if trade.trade_id > next_id:
                self.metrics.lost_trades.labels(symbol).inc(trade.trade_id - next_id)
            self._emit_trade(trade, out, live=False)
            next_id = trade.trade_id + 1
        if next_id <= res.last:
            self.metrics.lost_trades.labels(symbol).inc(res.last - next_id + 1)
            log.error("%s: %d trades (%d..%d) could not be back-filled", symbol, res.last - next_id + 1, next_id,
                      res.last)  # fmt: skip
        self.last_trade[symbol] = max(self.last_trade.get(symbol, 0), res.last)
        self.metrics.backfilled.labels(symbol).inc(len(trades))
        log.info("%s: back-filled %d trades", symbol, len(trades))
        for gen, trade in parked:
            self._on_trade(trade, gen, out)


def _ahead(trade: Trade, recv: int) -> str:
    return f"{trade.symbol} trade {trade.trade_id}: time {(trade.timestamp - recv) / 1e6:.1f} s after it was received"
