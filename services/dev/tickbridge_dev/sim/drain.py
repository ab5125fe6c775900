"""Drain a (simulated) Binance stream with one `websockets` client and report the rate and ID continuity.

`python -m tickbridge_dev.sim.drain ws://127.0.0.1:9443 --symbols BTCUSDT,ETHUSDT --seconds 10`
"""

from __future__ import annotations

import argparse
import asyncio
import time
from dataclasses import dataclass

import orjson
import websockets


@dataclass
class DrainResult:
    seconds: float
    messages: int
    trades: int
    trade_gaps: int
    depth_gaps: int

    @property
    def trades_per_s(self) -> float:
        return self.trades / self.seconds

    @property
    def messages_per_s(self) -> float:
        return self.messages / self.seconds


async def drain(ws_url: str, symbols: tuple[str, ...], seconds: float) -> DrainResult:
    """Subscribe to `@trade` + `@depth@100ms` of `symbols` (combined) and check every trade and update ID."""
    streams = "/".join(f"{s.lower()}@trade/{s.lower()}@depth@100ms" for s in symbols)
    last_t: dict[str, int] = {}
    last_u: dict[str, int] = {}
    messages = trades = trade_gaps = depth_gaps = 0
    async with websockets.connect(
        f"{ws_url}/stream?streams={streams}", max_size=None, max_queue=None, compression=None
    ) as ws:
        t0 = time.monotonic()
        end = t0 + seconds
        while time.monotonic() < end:
            raw = await ws.recv(decode=False)
            messages += 1
            data = orjson.loads(raw)["data"]
            sym = data["s"]
            if data["e"] == "trade":
                trades += 1
                prev = last_t.get(sym)
                trade_gaps += prev is not None and data["t"] != prev + 1
                last_t[sym] = data["t"]
            else:
                prev = last_u.get(sym)
                depth_gaps += prev is not None and data["U"] != prev + 1
                last_u[sym] = data["u"]
        elapsed = time.monotonic() - t0
    return DrainResult(elapsed, messages, trades, trade_gaps, depth_gaps)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tickbridge_dev.sim.drain")
    p.add_argument("ws_url")
    p.add_argument("--symbols", default="BTCUSDT")
    p.add_argument("--seconds", type=float, default=10.0)
    a = p.parse_args(argv)
    symbols = tuple(s.strip().upper() for s in a.symbols.split(",") if s.strip())
    r = asyncio.run(drain(a.ws_url, symbols, a.seconds))
    print(
        f"{len(symbols)} symbols, {r.seconds:.1f} s: {r.trades_per_s:,.0f} trades/s, {r.messages_per_s:,.0f} msgs/s, "
        f"trade-ID gaps {r.trade_gaps}, update-ID gaps {r.depth_gaps}"
    )


if __name__ == "__main__":
    main()
