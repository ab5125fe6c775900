"""Binance REST client for depth snapshots and trade back-fill, within the per-IP weight budget."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import aiohttp
import orjson

from tickbridge.core.backoff import Backoff

log = logging.getLogger(__name__)

#: REQUEST_WEIGHT per minute allowed per IP (binance-protocol.md §5); we keep a margin.
WEIGHT_PER_MINUTE = 6000
HISTORICAL_TRADES_WEIGHT = 25


class RestError(RuntimeError):
    """A REST call failed after its retries."""


def depth_weight(limit: int) -> int:
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


class WeightBudget:
    """Token bucket refilled continuously at `per_minute` / 60 per second."""

    def __init__(self, per_minute: int = WEIGHT_PER_MINUTE) -> None:
        self.capacity = float(per_minute)
        self.tokens = float(per_minute)
        self.rate = per_minute / 60.0
        self.updated = time.monotonic()
        self.blocked_until = 0.0  # after a 429/418 Retry-After

    async def take(self, weight: int) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.updated) * self.rate)
            self.updated = now
            wait = self.blocked_until - now
            if wait <= 0 and self.tokens >= weight:
                self.tokens -= weight
                return
            await asyncio.sleep(max(wait, (weight - self.tokens) / self.rate, 0.01))


class RestClient:
    """`GET /api/v3/depth` and `/api/v3/historicalTrades` with retries; honours 429/418 `Retry-After`."""

    def __init__(self, base_url: str, *, attempts: int = 6, timeout: float = 10.0, on_request: Any = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.budget = WeightBudget()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._on_request = on_request  # callable(endpoint, status) for metrics

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get(self, endpoint: str, params: dict[str, str | int], weight: int) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        backoff = Backoff(base=0.2, cap=5.0)
        last_error = ""
        for _ in range(self.attempts):
            await self.budget.take(weight)
            status = "error"
            try:
                async with self._session.get(self.base_url + endpoint, params=params) as resp:
                    status = str(resp.status)
                    body = await resp.read()
                    if resp.status == 200:
                        return orjson.loads(body)
                    last_error = f"HTTP {resp.status}: {body[:200]!r}"
                    if resp.status in (429, 418):
                        retry_after = float(resp.headers.get("Retry-After", "1") or 1)
                        self.budget.blocked_until = time.monotonic() + retry_after
                        log.warning("%s rate-limited (%s), retry after %.0fs", endpoint, resp.status, retry_after)
                        continue
                    if 400 <= resp.status < 500:
                        raise RestError(f"{endpoint} {params}: {last_error}")
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if self._on_request is not None:
                    self._on_request(endpoint, status)
            await asyncio.sleep(backoff.next())
        raise RestError(f"{endpoint} {params}: gave up after {self.attempts} attempts ({last_error})")

    async def depth(self, symbol: str, limit: int) -> dict[str, Any]:
        """The order-book snapshot `{"lastUpdateId", "bids", "asks"}`."""
        snap = await self._get("/api/v3/depth", {"symbol": symbol, "limit": limit}, depth_weight(limit))
        if not isinstance(snap, dict) or not isinstance(snap.get("lastUpdateId"), int):
            raise RestError(f"depth {symbol}: unexpected body")
        return snap

    async def historical_trades(self, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to `limit` trades from `from_id` on: `{"id","price","qty","time","isBuyerMaker",...}`."""
        rows = await self._get(
            "/api/v3/historicalTrades", {"symbol": symbol, "fromId": from_id, "limit": limit}, HISTORICAL_TRADES_WEIGHT
        )
        if not isinstance(rows, list):
            raise RestError(f"historicalTrades {symbol}: unexpected body")
        return rows
