"""What every simulated venue's server shares (Binance's `SimServer`, the Coinbase and Kraken `VenueServer`s):
one aiohttp app on one port, background tasks whose crash is kept in `failed`, and the `/_sim/stats` and
`/_sim/rate` control routes."""

from __future__ import annotations

import asyncio
import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Coroutine
from typing import Any

import orjson
from aiohttp import web

from tickbridge_dev.sim.config import SimConfig

log = logging.getLogger(__name__)


class SimApp(ABC):
    """The lifecycle half of a simulator: `serve` listens and starts its loops, `shutdown` ends them."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.failed: BaseException | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._runner: web.AppRunner | None = None
        self._port = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def rest_url(self) -> str:
        return f"http://{self.config.host}:{self._port}"

    @property
    @abstractmethod
    def rate(self) -> float:
        """Trades per second generated now."""

    @abstractmethod
    def set_rate(self, rate: float) -> None: ...

    @abstractmethod
    def stats(self) -> dict[str, Any]: ...

    async def serve(self, app: web.Application, *loops: Coroutine[Any, Any, None]) -> None:
        """Add the control routes, listen on the configured port (0: a free one) and run `loops`."""
        app.router.add_get("/_sim/stats", self._http_stats)
        app.router.add_post("/_sim/rate", self._http_rate)
        self._runner = web.AppRunner(app, handle_signals=False, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        self._port = int(self._runner.addresses[0][1])
        for loop in loops:
            self._spawn(loop)

    async def shutdown(self, abort_connections: Callable[[], None]) -> None:
        """Cancel the loops, abort every client connection, close the listener."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        abort_connections()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            self.failed = task.exception()
            log.critical("sim task crashed", exc_info=self.failed)

    async def _http_stats(self, request: web.Request) -> web.Response:
        return web.Response(body=orjson.dumps(self.stats()), content_type="application/json")

    async def _http_rate(self, request: web.Request) -> web.Response:
        try:
            body = await request.json(loads=orjson.loads)
            rate = float(body["rate"])
            if not math.isfinite(rate) or rate < 0:
                raise ValueError("rate must be >= 0")
        except (ValueError, TypeError, KeyError) as exc:
            return web.json_response({"ok": False, "error": str(exc)}, status=400)
        self.set_rate(rate)
        return web.json_response({"ok": True, "rate": self.rate})
