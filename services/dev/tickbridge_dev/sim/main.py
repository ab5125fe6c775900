"""`tickbridge sim`: run the simulator as a process (SIGTERM/SIGINT stop it cleanly)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import NoReturn

from prometheus_client import REGISTRY
from pydantic import ByteSize, TypeAdapter, ValidationError

from tickbridge.collector.venues.base import BINANCE_SPOT, EXCHANGES, venue_symbols
from tickbridge.core.lifecycle import Service, run_service, setup_logging
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import die, load_settings
from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.server import SimServer
from tickbridge_dev.sim.venues import VENUES, VenueServer

log = logging.getLogger(__name__)


class SimService(Service):
    """Runs a `SimServer` until stopped; a crashed simulator task ends the process non-zero."""

    name = "sim"

    def __init__(self, config: SimConfig, venue: str = BINANCE_SPOT) -> None:
        super().__init__()
        self.config = config
        self.venue = venue
        self.sim: SimServer | VenueServer | None = None

    async def run(self) -> None:
        venue = VENUES.get(self.venue)
        self.sim = SimServer(self.config, registry=REGISTRY) if venue is None else venue(self.config, REGISTRY)
        await self.sim.start()
        try:
            while not await self.sleep_or_stop(0.5):
                if self.sim.failed is not None:
                    raise RuntimeError("simulator task crashed") from self.sim.failed
        finally:
            await self.sim.stop()
        log.info("sim stopped: %s", self.sim.stats()["totals"])


def _byte_size(text: str) -> int:
    """`64MiB`, `64000000`, ... (the settings' byte sizes) for --max-send-buffer."""
    try:
        return int(TypeAdapter(ByteSize).validate_python(text))
    except ValidationError as exc:
        raise argparse.ArgumentTypeError(f"{exc.errors()[0]['msg']}: {text!r}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `tickbridge sim` (the CLI's sub-parser)."""
    p.add_argument(
        "--venue",
        choices=EXCHANGES,
        default=BINANCE_SPOT,
        help="the exchange protocol to speak (coinbase, kraken: synthetic mode only, one venue per process)",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9443)
    p.add_argument("--mode", choices=("synthetic", "replay"), default="synthetic")
    p.add_argument("--symbols", help="comma-separated (default: SYMBOLS)")
    p.add_argument("--rate", type=float, default=1200.0, help="trades per second across all symbols")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--replay", action="append", default=[], type=Path, help="capture file (repeatable)")
    p.add_argument("--speed", type=float, default=1.0, help="replay pace multiplier, 0 = as fast as possible")
    p.add_argument("--lifetime", type=float, default=86400.0, help="connection lifetime in seconds")
    p.add_argument("--ping-interval", type=float, default=20.0)
    p.add_argument("--pong-timeout", type=float, default=60.0)
    p.add_argument("--depth-levels", type=int, default=200)
    p.add_argument(
        "--max-send-buffer",
        type=_byte_size,
        default=64 * 1024 * 1024,
        help="slow-consumer policy: drop a client whose unsent bytes stay above this for 1 s (e.g. 64MiB)",
    )
    p.add_argument("--metrics-port", type=int, help="0 disables /metrics (default: METRICS_PORT, else 9105)")


def config_from(a: argparse.Namespace, default_symbols: tuple[str, ...]) -> SimConfig:
    """Parsed options -> config; a contradiction ends the process with one line (exit 2, as argparse)."""

    def error(message: str) -> NoReturn:
        die(f"tickbridge sim: error: {message}")

    symbols = (
        default_symbols if a.symbols is None else tuple(s.strip().upper() for s in a.symbols.split(",") if s.strip())
    )
    if not symbols:
        error("--symbols: at least one symbol is required")
    venue = getattr(a, "venue", BINANCE_SPOT)
    if venue != BINANCE_SPOT:
        if a.mode != "synthetic":
            error(f"--venue {venue}: only --mode synthetic")
        try:
            venue_symbols(symbols, "-")
        except ValueError as exc:
            error(f"--symbols: {exc}")
    if a.mode == "replay" and not a.replay:
        error("--mode replay needs --replay FILE")
    for path in a.replay:
        if not path.is_file():
            error(f"--replay: no such file {path}")
    if a.rate < 0 or a.speed < 0 or a.lifetime <= 0 or a.ping_interval <= 0 or a.pong_timeout <= 0:
        error("--rate/--speed must be >= 0; --lifetime/--ping-interval/--pong-timeout must be > 0")
    return SimConfig(
        symbols=symbols,
        rate=a.rate,
        seed=a.seed,
        mode=a.mode,
        host=a.host,
        port=a.port,
        lifetime_s=a.lifetime,
        ping_interval_s=a.ping_interval,
        pong_timeout_s=a.pong_timeout,
        replay_files=tuple(a.replay),
        speed=a.speed,
        depth_levels=a.depth_levels,
        max_send_buffer_bytes=a.max_send_buffer,
    )


def run_command(args: argparse.Namespace) -> None:
    """Run the simulator until SIGTERM/SIGINT."""
    settings = load_settings()
    setup_logging(settings.log_level)
    config = config_from(args, settings.symbols)
    metrics_port = settings.metrics_port_for("sim") if args.metrics_port is None else args.metrics_port
    serve_metrics(metrics_port, settings.metrics_bind)
    log.info("sim %s on %s:%d, %d symbols", config.mode, config.host, config.port, len(config.symbols))
    run_service(lambda: SimService(config, args.venue))
