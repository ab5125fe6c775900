"""Binance REST client for depth snapshots and trade back-fill, within the per-IP weight budget."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import email.utils
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from tickbridge.core.backoff import Backoff

log = logging.getLogger(__name__)

#: REQUEST_WEIGHT per minute allowed per IP (binance-protocol.md §5).
WEIGHT_PER_MINUTE = 6000
#: The share of it we spend: the rest absorbs the few requests that clock skew at a minute boundary lets
#: slip past our count, and anything else on the host's IP.
WEIGHT_SHARE = 0.9
HISTORICAL_TRADES_WEIGHT = 25
DEPTH_ENDPOINT = "/api/v3/depth"
HISTORICAL_TRADES_ENDPOINT = "/api/v3/historicalTrades"
USED_WEIGHT_HEADER = "X-MBX-USED-WEIGHT-1M"
#: The wait after a 429/418 whose `Retry-After` is missing or unreadable: long enough not to earn a ban by
#: hammering, short enough to recover soon when it was just a 429.
DEFAULT_RETRY_AFTER_S = 10.0
#: The longest one 429's `Retry-After` holds REST work. Binance's 429s ask for about a minute; a larger value
#: (`1e9` from a broken or hostile proxy) would stop snapshots and back-fills for good. Past the cap the request
#: is simply tried again: a real limit answers 429 once more, and waits another cap.
MAX_RETRY_AFTER_S = 120.0
#: The longest one 418 (IP ban) holds REST work: Binance documents bans of 2 minutes to 3 days, and a request
#: during a ban lengthens it ("scales up for repeat offenders"), so a real ban is honoured up to its documented
#: maximum instead of being probed every `MAX_RETRY_AFTER_S`.
MAX_BAN_RETRY_AFTER_S = 3 * 86400.0
#: REST answers are read up to this many bytes (decompressed): a 5000-level depth snapshot is ~0.3 MB, 1000
#: historical trades ~0.2 MB. A bigger body is refused before it is in memory.
MAX_BODY_BYTES = 8 * 2**20


def parse_retry_after(value: str | None, default: float = DEFAULT_RETRY_AFTER_S) -> float:
    """Seconds to wait from a `Retry-After` header: delta-seconds or an HTTP-date (RFC 9110 §10.2.3);
    anything else (missing, garbage, negative, not finite) is `default`, never an exception."""
    if not value or not value.strip():
        return default
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return default
        if when.tzinfo is None:  # RFC 9110 dates are GMT; a naive one is read as such
            when = when.replace(tzinfo=datetime.UTC)
        return max(when.timestamp() - time.time(), 0.0)
    return seconds if math.isfinite(seconds) and seconds >= 0 else default


class RestCallFailed(RuntimeError):
    """A REST call failed after its retries."""


class BodyTooLarge(RestCallFailed):
    """A REST answer over the byte limit (not retried: the same request would get the same answer)."""


async def read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body of `resp`, or `BodyTooLarge` as soon as it is known to exceed `limit` bytes."""
    if resp.content_length is not None and resp.content_length > limit:
        raise BodyTooLarge(f"{resp.content_length} bytes announced")
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"more than {size} bytes read")
        chunks.append(chunk)
    return b"".join(chunks)


def depth_weight(limit: int) -> int:
    if limit <= 100:
        return 5
    if limit <= 500:
        return 25
    if limit <= 1000:
        return 50
    return 250


class WeightBudget:
    """The exchange's REQUEST_WEIGHT count for the current wall-clock minute, kept in step with its header.

    Binance counts weight per IP in fixed minutes and reports the count (`X-MBX-USED-WEIGHT-1M`) on every
    answer. A restarted collector cannot know what its previous run spent this minute, so until the first
    answer tells it (`synced`) requests go one at a time; then they go while the count stays under our
    share, and otherwise wait for the next minute. (Firing 50 snapshots blind after a crash loop earned 429s,
    and repeated 429s earn a 418 IP ban.) Our minute starts `skew_s` after the wall-clock one, so a clock
    slightly ahead of the exchange's does not spend a minute the exchange has not begun.
    """

    def __init__(
        self, per_minute: int = WEIGHT_PER_MINUTE, *, share: float = WEIGHT_SHARE, window_s: float = 60.0,
        skew_s: float = 1.0,
    ) -> None:  # fmt: skip
        self.limit = int(per_minute * share)
        self.window_s = window_s
        self.skew_s = skew_s
        self.window = -1
        self.used = 0
        self.blocked_until = 0.0  # monotonic, after a 429/418 Retry-After
        self.synced = False
        self._probe = asyncio.Lock()

    def _roll(self) -> float:
        """Start a new count when our minute changed; return seconds left in it."""
        shifted = time.time() - self.skew_s
        window = int(shifted // self.window_s)
        if window > self.window:
            self.window, self.used = window, 0
        return (self.window + 1) * self.window_s - shifted

    async def take(self, weight: int) -> None:
        while True:
            left = self._roll()
            blocked = self.blocked_until - time.monotonic()
            if blocked <= 0 and self.used + weight <= self.limit:
                self.used += weight
                return
            await asyncio.sleep(max(blocked if blocked > 0 else left, 0.01))  # the block, else the minute

    def observe(self, used: int) -> None:
        """The exchange's count for this minute: ours never stays below it."""
        self._roll()
        wall = int(time.time() // self.window_s)
        if wall > self.window:  # the exchange's minute began `skew_s` before ours: adopt it and its count
            self.window, self.used = wall, used
        else:
            self.used = max(self.used, used)
        self.synced = True

    @contextlib.asynccontextmanager
    async def slot(self, weight: int) -> AsyncIterator[None]:
        """Admit one request of `weight`; before the first answer, one request at a time."""
        if not self.synced:
            async with self._probe:
                if not self.synced:
                    await self.take(weight)
                    yield
                    return
        await self.take(weight)
        yield


class PacedBudget(WeightBudget):
    """A venue's per-second request limit (Coinbase 10/s, Kraken about 1/s per IP): requests spaced evenly at our
    share of it, never a burst. Binance's per-minute count let a minute's allowance go at once; with 150 Kraken
    back-fills after a reconnect that drew `EGeneral:Too many requests` for most of them (trades lost)."""

    def __init__(self, per_s: float, *, share: float = WEIGHT_SHARE) -> None:
        super().__init__(max(int(per_s * 60), 1), share=share)
        self.interval = 1.0 / (per_s * share)
        self.next_at = 0.0
        self.synced = True

    def observe(self, used: int) -> None:
        """Venues send no weight header: our spacing is the only count."""

    @contextlib.asynccontextmanager
    async def slot(self, weight: int) -> AsyncIterator[None]:
        while True:
            now = time.monotonic()
            start = max(self.next_at, self.blocked_until)
            if start <= now:
                break
            await asyncio.sleep(start - now)
        self.next_at = max(now, self.next_at) + self.interval * weight  # reserved before the request goes
        yield


class RestClient:
    """`GET /api/v3/depth` and `/api/v3/historicalTrades` with retries; honours 429/418 `Retry-After` (up to
    `max_retry_after_s`); reads bodies up to `max_body_bytes`."""

    def __init__(
        self, base_url: str, *, attempts: int = 6, timeout: float = 10.0, on_request: Any = None,
        on_capped: Any = None,
    ) -> None:  # fmt: skip
        self.base_url = base_url.rstrip("/")
        self.attempts = attempts
        self.default_retry_after_s = DEFAULT_RETRY_AFTER_S
        self.max_retry_after_s = MAX_RETRY_AFTER_S
        self.max_ban_retry_after_s = MAX_BAN_RETRY_AFTER_S
        self.max_body_bytes = MAX_BODY_BYTES
        self.budget = WeightBudget()
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._on_request = on_request  # callable(endpoint, status) for metrics
        self._on_capped = on_capped  # callable(endpoint, "retry_after" | "body") for metrics

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def get_bytes(self, endpoint: str, params: dict[str, str | int], weight: int = 1) -> bytes:
        """A GET of any endpoint whose answer the caller parses itself (the venue adapters: Kraken's decimals are
        JSON numbers kept as text), with the same budget, retries and limits."""
        body: bytes = await self._get(endpoint, params, weight, raw=True)
        return body

    async def _get(self, endpoint: str, params: dict[str, str | int], weight: int, *, raw: bool = False) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        backoff = Backoff(base=0.2, cap=5.0)
        last_error = ""
        for _ in range(self.attempts):
            status = "error"
            try:
                async with self.budget.slot(weight), self._session.get(self.base_url + endpoint, params=params) as resp:
                    status = str(resp.status)
                    try:
                        body = await read_capped(resp, self.max_body_bytes)
                    except BodyTooLarge as exc:
                        self._capped(endpoint, "body")
                        raise BodyTooLarge(f"{endpoint} {params}: HTTP {resp.status} body over "
                                           f"{self.max_body_bytes} bytes ({exc}): refused") from None  # fmt: skip
                    used = resp.headers.get(USED_WEIGHT_HEADER, "")
                    # An exchange without the header leaves our own count as the only one.
                    self.budget.observe(int(used) if used.isdigit() else 0)
                    if resp.status == 200:
                        return body if raw else orjson.loads(body)
                    last_error = f"HTTP {resp.status}: {body[:200]!r}"
                    if resp.status in (429, 418):
                        header = resp.headers.get("Retry-After")
                        retry_after = parse_retry_after(header, self.default_retry_after_s)
                        cap = self.max_ban_retry_after_s if resp.status == 418 else self.max_retry_after_s
                        capped = retry_after > cap
                        if capped:
                            self._capped(endpoint, "retry_after")
                            retry_after = cap
                        self.budget.blocked_until = time.monotonic() + retry_after
                        log.warning("%s rate-limited (%s, Retry-After %r), retry after %.0fs%s", endpoint, resp.status,
                                    header, retry_after, " (capped)" if capped else "")  # fmt: skip
                        continue
                    if 400 <= resp.status < 500:
                        raise RestCallFailed(f"{endpoint} {params}: {last_error}")
            except (aiohttp.ClientError, TimeoutError, orjson.JSONDecodeError) as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            finally:
                if self._on_request is not None:
                    self._on_request(endpoint, status)
            await asyncio.sleep(backoff.next())
        raise RestCallFailed(f"{endpoint} {params}: gave up after {self.attempts} attempts ({last_error})")

    def _capped(self, endpoint: str, what: str) -> None:
        if what == "body":
            log.warning("%s: answer over %d bytes refused", endpoint, self.max_body_bytes)
        if self._on_capped is not None:
            self._on_capped(endpoint, what)

    async def depth(self, symbol: str, limit: int) -> dict[str, Any]:
        """The order-book snapshot `{"lastUpdateId", "bids", "asks"}`."""
        snap = await self._get(DEPTH_ENDPOINT, {"symbol": symbol, "limit": limit}, depth_weight(limit))
        if not isinstance(snap, dict) or not isinstance(snap.get("lastUpdateId"), int):
            raise RestCallFailed(f"depth {symbol}: unexpected body")
        return snap

    async def historical_trades(self, symbol: str, from_id: int, limit: int = 1000) -> list[dict[str, Any]]:
        """Up to `limit` trades from `from_id` on: `{"id","price","qty","time","isBuyerMaker",...}`."""
        rows = await self._get(
            HISTORICAL_TRADES_ENDPOINT, {"symbol": symbol, "fromId": from_id, "limit": limit}, HISTORICAL_TRADES_WEIGHT
        )
        if not isinstance(rows, list):
            raise RestCallFailed(f"historicalTrades {symbol}: unexpected body")
        return rows
