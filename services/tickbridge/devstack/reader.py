"""A stand-in for trading code in the native stack: embeds `TieredMarketData`, asks for recent ticks and
time ranges across the HOT/WARM/COLD tiers in a loop, and serves the tier metrics to Prometheus."""

from __future__ import annotations

import logging
import random

from tickbridge.brain.tiered import TieredMarketData
from tickbridge.core.lifecycle import Service, run_service, setup_logging
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import Settings, load_settings
from tickbridge.core.wire import now_us

log = logging.getLogger(__name__)


class DemoReader(Service):
    """Query every tier a few times per second, the way a strategy would."""

    name = "reader"

    def __init__(self, settings: Settings, interval_s: float = 0.25) -> None:
        super().__init__()
        self.settings = settings
        self.interval_s = interval_s
        self._rng = random.Random(7)

    async def run(self) -> None:
        async with TieredMarketData(self.settings) as md:
            while not await self.sleep_or_stop(self.interval_s):
                symbol = self._rng.choice(md.symbols)
                now = now_us()
                try:
                    await md.recent(symbol, 20)  # HOT
                    await md.range(symbol, now - 60_000_000, now)  # WARM
                    await md.range(symbol, now - 3_600_000_000, now, limit=1000)  # COLD + WARM
                except Exception as exc:  # a stand-in for a strategy: report and keep asking
                    log.warning("query failed: %s", exc)


def main(argv: list[str] | None = None) -> None:
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("reader"), settings.metrics_bind)
    run_service(lambda: DemoReader(settings))


if __name__ == "__main__":
    main()
