"""The catch-up state trading code reads (issue 16): `TieredMarketData.catch_up()` returns a `CatchUp`.

It is read from the exchange's Brain hash (`keys.catchup_key`: `tickbridge:catchup` for Binance,
`tickbridge:catchup:<exchange>` otherwise), which that exchange's forwarder live lane (`vps_*`, `live_start`,
every 0.5 s while the Brain is reachable) and the consumer's fast-forward follower (`brain_*`, every 0.5 s)
write. Times in the hash are stream IDs (ms) or Unix seconds; here they are µs like every tier.

The **gap** is what the ordered path has not delivered yet below the start of the live view: trades with an
exchange time in `missing` may be absent from HOT/WARM/COLD answers until the backlog has arrived. It is
`(frontier - FRONTIER_MARGIN_US, live_from)`: below the consumer group's frontier every entry was delivered
(a trade's exchange time is at most its VPS ID's time, and more than the margin before it only if the
exchange-to-VPS hop took longer); from the first live start above the frontier on, the live lane (or the
Brain stream's tail) delivered every entry as it came.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

from tickbridge.core.wire import parse_stream_id

#: A trade reaches the VPS after it happened (its VPS ID is later than its exchange time): the gap starts this
#: much before the frontier.
FRONTIER_MARGIN_US = 2_000_000
#: Consumer-group lag (entries) that counts as a Brain-side catch-up (as `fastforward.LAG_MIN`).
BRAIN_LAG_ACTIVE = 5_000


@dataclass(frozen=True)
class CatchUp:
    """Where the catch-up stands. `active`: a backlog is being replayed (VPS side or Brain side).

    - `backlog`: entries not yet on the ordered path (`vps_backlog` as the forwarder last reported, plus the
      consumer group's `brain_lag`); `buffer_rows`: the part in the VPS QuestDB buffer.
    - `oldest_age_s`: age of the oldest undelivered entry; `rate`: entries/s of the slower stage;
      `eta_s`: seconds until it ends (None while unknown).
    - `frontier_us`: the ordered path (per-symbol streams, QuestDB, WARM's ordered writes) is complete below
      about this exchange time, for every symbol; `live_from_us`: the live view (HOT/WARM fast-forward) is
      complete from here on; `missing`: the gap between them (None: nothing missing).
    - `vps_age_s` / `brain_age_s`: seconds since the forwarder / the consumer last reported (None: never);
      a large `vps_age_s` means the VPS side is not known now (the link is down, or the forwarder).
    """

    active: bool
    backlog: int
    vps_backlog: int
    brain_lag: int
    buffer_rows: int
    oldest_age_s: float
    rate: float
    eta_s: float | None
    frontier_us: int | None
    live_from_us: int | None
    missing: tuple[int, int] | None
    vps_age_s: float | None
    brain_age_s: float | None


def _text(fields: dict[bytes, bytes], name: str) -> str:
    value = fields.get(name.encode(), b"")
    return value.decode() if isinstance(value, bytes) else str(value)


def _num(fields: dict[bytes, bytes], name: str) -> float:
    try:
        return float(_text(fields, name) or 0)
    except ValueError:
        return 0.0


def _id_ms(fields: dict[bytes, bytes], name: str) -> int | None:
    text = _text(fields, name)
    if not text:
        return None
    try:
        return parse_stream_id(text)[0]
    except ValueError:
        return None


def parse_catchup(reply: Any, now: float | None = None) -> CatchUp:
    """A `CatchUp` from the hash's HGETALL reply (RESP2 list or RESP3 map)."""
    if isinstance(reply, dict):
        fields: dict[bytes, bytes] = dict(reply)
    else:
        fields = dict(zip(reply[::2], reply[1::2], strict=False)) if reply else {}
    now = time.time() if now is None else now
    vps_updated, brain_updated = _num(fields, "vps_updated"), _num(fields, "brain_updated")
    vps_age = now - vps_updated if vps_updated else None
    brain_age = now - brain_updated if brain_updated else None
    vps_active = _text(fields, "vps_active") == "1"
    vps_backlog = int(_num(fields, "vps_backlog")) if vps_active else 0
    brain_lag = int(_num(fields, "brain_lag"))
    active = vps_active or brain_lag >= BRAIN_LAG_ACTIVE
    oldest = _num(fields, "vps_oldest_age_s") + (vps_age or 0.0) if vps_active else 0.0
    vps_rate, brain_rate = _num(fields, "vps_rate"), _num(fields, "brain_rate")
    vps_eta, brain_eta = (_num(fields, "vps_eta_s") if vps_active else 0.0), _num(fields, "brain_eta_s")
    eta: float | None = None if min(vps_eta, brain_eta) < 0 else max(vps_eta, brain_eta)
    rates = [r for r in ((vps_rate if vps_active else 0.0), brain_rate if brain_lag else 0.0) if r > 0]
    frontier_ms = _id_ms(fields, "brain_frontier")
    starts = [s for s in (_id_ms(fields, "live_start"), _id_ms(fields, "brain_tail_start")) if s is not None]
    missing: tuple[int, int] | None = None
    live_from: int | None = None
    if frontier_ms is not None:
        ahead = [s for s in starts if s > frontier_ms]
        if ahead:
            live_from = min(ahead) * 1000
            missing = (frontier_ms * 1000 - FRONTIER_MARGIN_US, live_from)
    elif starts:
        live_from = max(starts) * 1000
    return CatchUp(
        active=active,
        backlog=vps_backlog + brain_lag,
        vps_backlog=vps_backlog,
        brain_lag=brain_lag,
        buffer_rows=int(_num(fields, "vps_buffer")) if vps_active else 0,
        oldest_age_s=oldest,
        rate=min(rates) if rates else 0.0,
        eta_s=eta if active else 0.0,
        frontier_us=frontier_ms * 1000 if frontier_ms is not None else None,
        live_from_us=live_from,
        missing=missing,
        vps_age_s=vps_age,
        brain_age_s=brain_age,
    )


def overlap(gap: tuple[int, int] | None, start_us: int, end_us: int) -> tuple[int, int] | None:
    """The part of `[start_us, end_us]` inside `gap`, or None."""
    if gap is None:
        return None
    lo, hi = max(start_us, gap[0]), min(end_us, gap[1])
    return (lo, hi) if lo <= hi else None
