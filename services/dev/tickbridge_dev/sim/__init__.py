"""Binance-compatible exchange simulator for tests, the demo and load tests (one aiohttp port).

```python
sim = SimServer(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=1000.0, seed=1))
await sim.start()          # sim.port, sim.ws_url, sim.rest_url
...
await sim.stop()
```

WebSocket: `/ws/<stream>[/<stream>...]` (bare payloads), `/stream?streams=a/b` (combined wrapper),
`timeUnit=MICROSECOND`; SUBSCRIBE / UNSUBSCRIBE / LIST_SUBSCRIPTIONS / SET_PROPERTY / GET_PROPERTY with
Binance's replies and error objects; streams `<sym>@trade`, `@depth@100ms`, `@depth`, `@bookTicker`
(other well-formed names are accepted and stay silent); > 5 incoming frames/s -> close 1008; > 1024
streams -> error; pings every `ping_interval_s`, close 1008 without a matching pong in `pong_timeout_s`;
close 1000 after `lifetime_s`.

REST: `/api/v3/depth` (lastUpdateId = the symbol's current update ID, so snapshot + diffs is exact),
`/api/v3/historicalTrades`, `/api/v3/trades`, `/api/v3/aggTrades` (one aggregate per trade),
`/api/v3/ping|time|exchangeInfo`; weights, `X-MBX-USED-WEIGHT-1M`, 429 + Retry-After, 418 ban.
Back-fill holds the last `history_per_symbol` trades per symbol; older IDs are gone, and a `fromId`
before the oldest held trade answers from the oldest held one (the client sees the hole).

Faults (methods, or `POST /_sim/fault {"action", "symbol", "count", "seconds"}`):
`drop_connections()` (abort, 1006), `server_shutdown()` (event, then close 1001), `skip_update_ids(sym, n)`
(pending diff lost + IDs jump: the client must resync), `skip_trade_ids(sym, n)` (not sent, but in
back-fill), `stall(seconds)` (nothing sent, not even pings; the backlog follows in order),
`slow_consumer(max_buffer_bytes, grace_s)` (drop clients whose unsent bytes stay over budget),
`burst(n, sym=None)`, `pause()` / `resume()`, `stale_snapshot(sym, n)`, `duplicate_trades(sym, n)`,
`duplicate_depth(sym)`, `big_diff(sym, n)` (~n-level diff with Binance's capped quantity).
`stats()` / `GET /_sim/stats`; `set_rate()` / `POST /_sim/rate {"rate": r}`.
Replay mode serves a capture (see `replay.py`).

Coinbase and Kraken (issue 18): `tickbridge_dev.sim.venues` (`CoinbaseSim`, `KrakenSim`, same config, one port
each; `tickbridge sim --venue coinbase|kraken`); see `venues/README.md`.
"""

from tickbridge_dev.sim.config import SimConfig
from tickbridge_dev.sim.server import SimServer

__all__ = ["SimConfig", "SimServer"]
