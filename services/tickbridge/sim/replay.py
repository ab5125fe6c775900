"""Replay of real captures (`<recv_ns> <json>` per line, gzip; see data/binance/README.md)."""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tickbridge.sim.market import fmt8, parse8


@dataclass(frozen=True)
class CaptureLine:
    """One captured message: a WebSocket event (`stream` set) or the REST snapshot (`stream` None)."""

    recv_ns: int
    stream: str | None
    symbol: str
    text: bytes  # the line's JSON exactly as captured (combined wrapper for WebSocket lines)
    data: dict[str, Any]


def load_capture(paths: tuple[Path | str, ...]) -> list[CaptureLine]:
    """All lines of the files in order; the snapshot line gets the symbol of the depth events around it."""
    out: list[CaptureLine] = []
    last_symbol = ""
    pending_snapshots: list[int] = []
    for path in paths:
        with gzip.open(path, "rb") as fh:
            for raw in fh:
                raw = raw.rstrip(b"\r\n")
                if not raw:
                    continue
                ns, _, text = raw.partition(b" ")
                obj = orjson.loads(text)
                stream = obj.get("stream")
                if stream is None:
                    pending_snapshots.append(len(out))
                    out.append(CaptureLine(int(ns), None, last_symbol, text, obj))
                    continue
                symbol = stream.partition("@")[0].upper()
                if not last_symbol:
                    for idx in pending_snapshots:
                        out[idx] = CaptureLine(out[idx].recv_ns, None, symbol, out[idx].text, out[idx].data)
                pending_snapshots.clear()
                last_symbol = symbol
                out.append(CaptureLine(int(ns), stream, symbol, text, obj["data"]))
    return out


class ReplayBook:
    """The capture's snapshot rolled forward with the replayed diffs, so later snapshots stay consistent."""

    def __init__(self, snapshot: dict[str, Any]) -> None:
        self.last_update_id: int = snapshot["lastUpdateId"]
        self.bids = {parse8(p): parse8(q) for p, q in snapshot["bids"]}
        self.asks = {parse8(p): parse8(q) for p, q in snapshot["asks"]}

    def apply(self, event: dict[str, Any]) -> None:
        if event["u"] <= self.last_update_id:
            return
        for side, levels in ((self.bids, event["b"]), (self.asks, event["a"])):
            for p, q in levels:
                price, qty = parse8(p), parse8(q)
                if qty:
                    side[price] = qty
                else:
                    side.pop(price, None)
        self.last_update_id = event["u"]

    def snapshot(self, limit: int) -> dict[str, Any]:
        bids = sorted(self.bids, reverse=True)[:limit]
        asks = sorted(self.asks)[:limit]
        return {
            "lastUpdateId": self.last_update_id,
            "bids": [[fmt8(p), fmt8(self.bids[p])] for p in bids],
            "asks": [[fmt8(p), fmt8(self.asks[p])] for p in asks],
        }
