"""Binance-compatible exchange simulator for tests, the demo and load tests.

```python
sim = SimServer(SimConfig(symbols=("BTCUSDT", "ETHUSDT"), rate=1000.0, seed=1))
await sim.start()          # sim.port, sim.ws_url, sim.rest_url
sim.skip_trade_ids("BTCUSDT", 5); sim.stall(2.0); sim.drop_connections(); sim.stats()
await sim.stop()
```
The same faults are available over HTTP: `POST /_sim/fault`, `GET /_sim/stats`, `POST /_sim/rate`.
"""

from tickbridge.sim.config import SimConfig
from tickbridge.sim.server import SimServer

__all__ = ["SimConfig", "SimServer"]
