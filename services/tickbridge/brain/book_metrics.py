"""Prometheus view of the Brain's order books (issue 17), refreshed by the consumer's monitor loop.

- `tickbridge_consumer_book_valid{symbol}`: 1 while the Brain's book is valid;
- `tickbridge_consumer_book_invalid_seconds{symbol}`: how long it has not been valid (0 while valid; from the
  first monitor round that saw it so): the alert BrainBookInvalid fires on it;
- `tickbridge_consumer_book_age_seconds{symbol}`: now minus the exchange time of the book's last update.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry

from tickbridge.core import keys
from tickbridge.core.metrics import gauge
from tickbridge.core.redis_io import execute_packed


class BookMetrics:
    """The book gauges of one consumer, per configured symbol."""

    def __init__(self, registry: CollectorRegistry = REGISTRY, symbols: Sequence[str] = ()) -> None:
        self.symbols = list(symbols)
        valid = gauge("consumer_book_valid", "1 while the Brain's order book is valid", ("symbol",), registry=registry)
        invalid = gauge(
            "consumer_book_invalid_seconds",
            "Seconds the Brain's order book has not been valid (0 while valid)",
            ("symbol",),
            registry=registry,
        )
        age = gauge(
            "consumer_book_age_seconds",
            "Now minus the exchange time of the last update applied to the Brain's order book",
            ("symbol",),
            registry=registry,
        )
        self._valid = {s: valid.labels(s) for s in self.symbols}
        self._invalid = {s: invalid.labels(s) for s in self.symbols}
        self._age = {s: age.labels(s) for s in self.symbols}
        now = time.monotonic()
        self._invalid_since: dict[str, float] = dict.fromkeys(self.symbols, now)  # no book seen yet: not valid

    async def update(self, client: aioredis.Redis) -> None:
        """One round trip: every book's state."""
        cmds = [["HMGET", keys.book_keys(s)[0], "valid", "timestamp"] for s in self.symbols]
        replies = await execute_packed(client, cmds)
        now, now_s = time.monotonic(), time.time()
        for symbol, reply in zip(self.symbols, replies, strict=True):
            if isinstance(reply, BaseException):
                continue
            valid_raw, ts = reply
            if valid_raw == b"1":
                self._invalid_since.pop(symbol, None)
                self._valid[symbol].set(1)
                self._invalid[symbol].set(0)
            else:
                since = self._invalid_since.setdefault(symbol, now)
                self._valid[symbol].set(0)
                self._invalid[symbol].set(now - since)
            if ts:
                self._age[symbol].set(max(0.0, now_s - int(ts) / 1e6))
