"""Configuration of the simulator (one frozen dataclass, built by tests and by the CLI)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from tickbridge.core.settings import DEFAULT_SYMBOLS


@dataclass(frozen=True)
class SimConfig:
    """Everything a `SimServer` needs; defaults mirror Binance's documented limits."""

    symbols: tuple[str, ...] = DEFAULT_SYMBOLS
    #: Trades per second across all symbols (synthetic mode).
    rate: float = 1200.0
    seed: int = 1
    mode: Literal["synthetic", "replay"] = "synthetic"
    host: str = "127.0.0.1"
    port: int = 0
    #: Connection lifetime; Binance: 24 h, then a plain disconnect.
    lifetime_s: float = 86400.0
    ping_interval_s: float = 20.0
    pong_timeout_s: float = 60.0
    replay_files: tuple[Path | str, ...] = ()
    #: Replay pace multiplier; 0 = as fast as possible.
    speed: float = 1.0
    #: Start the replay when the first client connects (else call `start_replay()`).
    replay_autostart: bool = True
    #: Price levels kept per side of each synthetic book.
    depth_levels: int = 200
    #: Trades kept per symbol for `historicalTrades` (older ones are gone, as on a real exchange).
    history_per_symbol: int = 100_000
    #: Extra random book changes (add/cancel away from the touch) per trade.
    book_updates_per_trade: float = 1.0
    #: How RATE is spread over symbols: "zipf" (first symbols busiest, like real markets) or "even".
    weights: Literal["zipf", "even"] = "zipf"
    #: Slow-consumer policy (Binance drops clients that do not keep up): a connection whose unsent bytes
    #: stay above `max_send_buffer_bytes` for longer than `slow_consumer_grace_s` is dropped.
    max_send_buffer_bytes: int = 64 * 1024 * 1024
    slow_consumer_grace_s: float = 1.0
    #: Delay between the `serverShutdown` event and the close.
    shutdown_grace_s: float = 1.0
    #: REST weight budget per IP per minute (`X-MBX-USED-WEIGHT-1M`), over it 429 + Retry-After.
    rest_weight_limit: int = 6000
    #: 429s per minute an IP may ignore before a 418 ban of `rest_ban_s` (Binance: 2 min to 3 days).
    rest_429s_before_ban: int = 10
    rest_ban_s: float = 120.0
    #: Incoming frames (text, ping, pong) per rolling second before a 1008 close.
    max_incoming_per_s: int = 5
    max_streams: int = 1024
    #: Connection attempts per IP per 5 minutes before the handshake is refused with 429.
    max_connects_per_5m: int = 300
    #: Generation tick of the synthetic market.
    tick_interval_s: float = 0.01
