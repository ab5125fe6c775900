"""The simulator's REST API: Binance's `/api/v3` market endpoints with request weights, the
`X-MBX-USED-WEIGHT-1M` header, 429 + Retry-After over the per-minute budget and a 418 ban for clients
that keep going."""

from __future__ import annotations

import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from tickbridge.collector.rest import depth_weight
from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.metrics import SimMetrics
from tickbridge_dev.sim.source import MarketSource

Endpoint = Callable[[web.Request], Coroutine[Any, Any, tuple[Any, int]]]


class RestReject(Exception):
    """An error answer of the simulated exchange: HTTP status, Binance error code and message."""

    def __init__(self, status: int, code: int, msg: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.status, self.code, self.msg, self.headers = status, code, msg, headers or {}


def _micro(request: web.Request) -> bool:
    """REST `X-MBX-TIME-UNIT: MICROSECOND` header."""
    return request.headers.get("X-MBX-TIME-UNIT", "").lower() == "microsecond"


class WeightLimiter:
    """Request weight per IP per clock minute; 429s counted per minute, a ban after too many."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self._weights: dict[str, tuple[int, int]] = {}  # peer -> (minute, weight used)
        self._rejections: dict[str, tuple[int, int]] = {}  # peer -> (minute, 429s sent)
        self._banned_until: dict[str, float] = {}

    def used(self, peer: str) -> int:
        minute = int(time.time() // 60)
        window, used = self._weights.get(peer, (minute, 0))
        return used if window == minute else 0

    def charge(self, peer: str, weight: int) -> int:
        minute = int(time.time() // 60)
        used = self.used(peer) + weight
        self._weights[peer] = (minute, used)
        return used

    def precheck(self, peer: str, weight: int) -> None:
        """418 while banned; 429 before doing the work if this request would exceed the per-minute weight."""
        limit = self.config.rest_weight_limit
        now = time.time()
        banned = self._banned_until.get(peer, 0.0)
        if now < banned:
            raise RestReject(
                418,
                -1003,
                f"Way too much request weight used; IP banned until {int(banned * 1000)}. "
                "Please use WebSocket Streams for live updates to avoid bans.",
                {"Retry-After": str(max(1, int(banned - now)))},
            )
        if self.used(peer) + weight > limit:
            minute = int(now // 60)
            window, count = self._rejections.get(peer, (minute, 0))
            count = count + 1 if window == minute else 1
            self._rejections[peer] = (minute, count)
            if count > self.config.rest_429s_before_ban:  # kept hammering after 429s: a 418 ban
                self._banned_until[peer] = now + self.config.rest_ban_s
            retry = 60 - int(now % 60)
            raise RestReject(
                429,
                -1003,
                f"Too much request weight used; current limit is {limit} request weight per 1 MINUTE. "
                "Please use WebSocket Streams for live updates to avoid polling the API.",
                {"Retry-After": str(max(1, retry))},
            )


@dataclass
class StaleSnapshot:
    """The `stale_snapshot` fault: the next `left` depth requests get this frozen snapshot."""

    left: int
    snapshot: dict[str, Any]


class RestApi:
    """The endpoints, answered from `source`."""

    def __init__(self, config: SimConfig, metrics: SimMetrics, source: MarketSource) -> None:
        self.config = config
        self.metrics = metrics
        self.source = source
        self.limiter = WeightLimiter(config)
        self.stale: dict[str, StaleSnapshot] = {}
        self._symbol_set = frozenset(source.symbols)

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/api/v3/depth", self._endpoint(self._depth, "depth"))
        app.router.add_get("/api/v3/historicalTrades", self._endpoint(self._historical, "historicalTrades"))
        app.router.add_get("/api/v3/trades", self._endpoint(self._recent, "trades"))
        app.router.add_get("/api/v3/aggTrades", self._endpoint(self._agg, "aggTrades"))
        app.router.add_get("/api/v3/ping", self._endpoint(self._ping, "ping"))
        app.router.add_get("/api/v3/time", self._endpoint(self._time, "time"))
        app.router.add_get("/api/v3/exchangeInfo", self._endpoint(self._exchange_info, "exchangeInfo"))

    def _endpoint(
        self, fn: Endpoint, endpoint: str
    ) -> Callable[[web.Request], Coroutine[Any, Any, web.StreamResponse]]:
        async def handler(request: web.Request) -> web.StreamResponse:
            peer = request.remote or "?"
            try:
                body, weight = await fn(request)
                used = self.limiter.charge(peer, weight)
                status = 200
                resp = web.Response(body=orjson.dumps(body), content_type="application/json")
            except RestReject as exc:
                used = self.limiter.charge(peer, 1) if exc.status not in (418, 429) else self.limiter.used(peer)
                status = exc.status
                resp = web.Response(
                    body=orjson.dumps({"code": exc.code, "msg": exc.msg}),
                    status=exc.status,
                    content_type="application/json",
                    headers=exc.headers,
                )
            resp.headers["X-MBX-USED-WEIGHT-1M"] = str(used)
            self.metrics.rest.labels(endpoint, str(status)).inc()
            return resp

        return handler

    def _precheck(self, request: web.Request, weight: int) -> None:
        self.limiter.precheck(request.remote or "?", weight)

    def _symbol_param(self, request: web.Request) -> str:
        raw = request.query.get("symbol")
        if not raw:
            raise RestReject(400, -1102, "Mandatory parameter 'symbol' was not sent, was empty/null, or malformed.")
        sym = raw.upper()
        if sym not in self._symbol_set:
            raise RestReject(400, -1121, "Invalid symbol.")
        return sym

    @staticmethod
    def _int_param(request: web.Request, name: str, default: int | None) -> int | None:
        raw = request.query.get(name)
        if raw is None or raw == "":
            return default
        try:
            return int(raw)
        except ValueError:
            raise RestReject(400, -1100, f"Illegal characters found in parameter '{name}'.") from None

    def _trade_limit(self, request: web.Request) -> int:
        limit = self._int_param(request, "limit", 500) or 500
        if limit < 1 or limit > 1000:
            raise RestReject(400, -1130, "Invalid data sent for a parameter.")
        return limit

    async def _depth(self, request: web.Request) -> tuple[Any, int]:
        limit = self._int_param(request, "limit", 100) or 100
        limit = max(1, min(limit, 5000))
        weight = depth_weight(limit)
        self._precheck(request, weight)
        sym = self._symbol_param(request)
        stale = self.stale.get(sym)
        if stale is not None:
            stale.left -= 1
            if stale.left <= 0:
                del self.stale[sym]
            snap = stale.snapshot
            return {**snap, "bids": snap["bids"][:limit], "asks": snap["asks"][:limit]}, weight
        try:
            return await self.source.snapshot(sym, limit), weight
        except TimeoutError:
            raise RestReject(503, -1001, "Internal error; unable to process your request. Please try again.") from None

    async def _historical(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 25)
        sym = self._symbol_param(request)
        limit = self._trade_limit(request)
        from_id = self._int_param(request, "fromId", None)
        rows = self.source.history(sym).rows(from_id, limit)
        if _micro(request):
            for r in rows:
                r["time"] *= 1000
        return rows, 25

    async def _recent(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 25)
        sym = self._symbol_param(request)
        rows = self.source.history(sym).rows(None, self._trade_limit(request))
        if _micro(request):
            for r in rows:
                r["time"] *= 1000
        return rows, 25

    async def _agg(self, request: web.Request) -> tuple[Any, int]:
        """One aggregate per trade (`a` = `f` = `l` = trade ID): simple and gap-free."""
        self._precheck(request, 4)
        sym = self._symbol_param(request)
        rows = self.source.history(sym).rows(self._int_param(request, "fromId", None), self._trade_limit(request))
        micro = _micro(request)
        return [
            {
                "a": r["id"],
                "p": r["price"],
                "q": r["qty"],
                "f": r["id"],
                "l": r["id"],
                "T": r["time"] * 1000 if micro else r["time"],
                "m": r["isBuyerMaker"],
                "M": True,
            }
            for r in rows
        ], 4

    async def _ping(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 1)
        return {}, 1

    async def _time(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 1)
        return {"serverTime": time.time_ns() // (1000 if _micro(request) else 1_000_000)}, 1

    async def _exchange_info(self, request: web.Request) -> tuple[Any, int]:
        self._precheck(request, 20)
        return {
            "timezone": "UTC",
            "serverTime": time.time_ns() // 1_000_000,
            "rateLimits": [
                {"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000},
            ],
            "symbols": [
                {"symbol": s, "status": "TRADING", "baseAsset": s[:-4], "quoteAsset": s[-4:]}
                for s in self.source.symbols
            ],
        }, 20
