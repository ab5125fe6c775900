"""Process lifecycle shared by every role.

A role is a `Service`: `run()` owns its tasks in an `asyncio.TaskGroup`, so a task that dies takes
the process down loudly (non-zero exit, the supervisor restarts it) instead of going quiet. SIGTERM or
SIGINT only set `stopping`; the role then stops intake, drains, flushes, acks and closes. A second
signal forces the exit. A `Watchdog` turns a stuck loop into a crash as well.
"""

from __future__ import annotations

import abc
import asyncio
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


def tune_gc() -> None:
    """Fewer young-generation collections, for the roles that move batches of stream entries.

    A 5,000-entry batch allocates ~100k short-lived objects, and the default threshold (700) collects
    ~150 times per batch. Measured on this host: forwarder drain +50-70 %, Brain writer 7.7 -> 4.6-5.0
    µs per tick (`brain/README.md`). Cycles are still collected, just less often.
    """
    gc.collect()
    gc.freeze()  # startup objects (modules, settings) are never garbage: keep them out of every scan
    gc.set_threshold(200_000, 50, 100)


class StuckTaskError(RuntimeError):
    """A loop stopped making progress for longer than its limit."""


class Service(abc.ABC):
    """One role process: construct cheaply, `run()` until `stopping` is set."""

    name: str = "service"

    def __init__(self) -> None:
        self.stopping = asyncio.Event()

    def request_stop(self) -> None:
        self.stopping.set()

    @abc.abstractmethod
    async def run(self) -> None:
        """Run until `stopping` is set, then shut down in order and return."""

    async def sleep_or_stop(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True if a stop was requested meanwhile."""
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            return False
        return True


class Watchdog:
    """Loops call `beat(name)`; `run()` raises `StuckTaskError` if one is silent past its limit."""

    def __init__(self, default_limit: float = 60.0) -> None:
        self.default_limit = default_limit
        self._beats: dict[str, tuple[float, float]] = {}

    def beat(self, name: str, limit: float | None = None) -> None:
        self._beats[name] = (time.monotonic(), limit if limit is not None else self.default_limit)

    def forget(self, name: str) -> None:
        self._beats.pop(name, None)

    def check(self) -> None:
        now = time.monotonic()
        for name, (last, limit) in self._beats.items():
            if now - last > limit:
                raise StuckTaskError(f"{name} made no progress for {now - last:.0f}s (limit {limit:.0f}s)")

    async def run(self, stopping: asyncio.Event, interval: float = 1.0) -> None:
        while not stopping.is_set():
            self.check()
            try:
                await asyncio.wait_for(stopping.wait(), timeout=interval)
            except TimeoutError:
                pass


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        stream=sys.stdout,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


#: How long a role may take to stop after SIGTERM/SIGINT before it exits anyway.
STOP_TIMEOUT_S = 30.0


def run_service(factory: Callable[[], Service], *, stop_timeout: float = STOP_TIMEOUT_S) -> None:
    """Run a service under uvloop with signal handling; exit 1 if it crashed or could not stop in time.

    A stop that hangs (its last flush retrying a server that is gone) ends after `stop_timeout` with one
    error line and exit 1: every role is built to survive `kill -9` at any instant, so what it still held
    is recovered on restart (back-fill, pending entries, unacked keys), and a hung process helps nobody.
    """
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover - uvloop is a pinned dependency
        runner = asyncio.Runner()

    async def main() -> None:
        service = factory()
        loop = asyncio.get_running_loop()
        signals_seen = 0

        def stop_overdue() -> None:
            log.error("%s did not stop within %.0fs (a server it must flush to is unreachable?): exiting; "
                      "what it held is recovered on restart", service.name, stop_timeout)  # fmt: skip
            os._exit(1)

        def on_signal(sig: signal.Signals) -> None:
            nonlocal signals_seen
            signals_seen += 1
            if signals_seen > 1:
                log.warning("second %s: forcing exit", sig.name)
                os._exit(130)
            log.info("%s received: stopping %s", sig.name, service.name)
            service.request_stop()
            loop.call_later(stop_timeout, stop_overdue)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        await service.run()

    with runner:
        try:
            runner.run(main())
        except Exception:
            log.critical("crashed", exc_info=True)
            raise SystemExit(1) from None
