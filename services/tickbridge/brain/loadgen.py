"""Synthetic Brain-stream traffic for tests and `bench.brain`: contiguous trade IDs per symbol."""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from tickbridge.core.redis_io import Command, execute_packed
from tickbridge.core.tick import DepthDiff, Trade
from tickbridge.core.wire import encode_tick, now_us


def make_trade(symbol: str, trade_id: int, ts_us: int) -> Trade:
    return Trade(
        symbol=symbol,
        price=f"{100 + (trade_id % 1000) / 100:.2f}",
        volume=f"0.{(trade_id % 997) + 1:03d}",
        side="BUY" if trade_id % 2 else "SELL",
        timestamp=ts_us,
        trade_id=trade_id,
        recv_ts=ts_us + 1500,
    )


def make_depth(symbol: str, update_id: int, ts_us: int) -> DepthDiff:
    return DepthDiff(
        symbol=symbol,
        timestamp=ts_us,
        first_update_id=update_id,
        last_update_id=update_id + 2,
        bids=(("100.10", "1.5"), ("100.00", "0")),
        asks=(("100.20", "2.0"),),
        recv_ts=ts_us + 1000,
    )


class TradeSource:
    """Contiguous trade IDs per symbol from `first_id`, exchange time spaced `step_us` apart."""

    def __init__(self, symbols: Sequence[str], *, first_id: int = 1, start_us: int | None = None, step_us: int = 1000):
        self.symbols = list(symbols)
        self.next_id = {s: first_id for s in self.symbols}
        self.first_id = first_id
        self.ts = start_us if start_us is not None else now_us()
        self.step_us = step_us
        self._i = 0

    def next_commands(self, stream: str, n: int, *, live: bool = False) -> list[Command]:
        cmds: list[Command] = []
        for _ in range(n):
            sym = self.symbols[self._i % len(self.symbols)]
            self._i += 1
            tid = self.next_id[sym]
            self.next_id[sym] = tid + 1
            ts = now_us() if live else self.ts
            self.ts += self.step_us
            cmds.append(["XADD", stream, "*", *encode_tick(make_trade(sym, tid, ts))])
        return cmds

    def counts(self) -> dict[str, int]:
        return {s: n - self.first_id for s, n in self.next_id.items()}

    async def append(
        self, client: aioredis.Redis, stream: str, n: int, *, live: bool = False, chunk: int = 5000
    ) -> None:
        left = n
        while left > 0:
            k = min(chunk, left)
            replies = await execute_packed(client, self.next_commands(stream, k, live=live))
            for r in replies:
                if isinstance(r, BaseException):
                    raise r
            left -= k


def as_mapping(fields: Sequence[str | int]) -> dict[str, str | int]:
    """`encode_tick(Trade(...))` as a dict for redis-py's `xadd`."""
    return {str(fields[i]): fields[i + 1] for i in range(0, len(fields), 2)}
