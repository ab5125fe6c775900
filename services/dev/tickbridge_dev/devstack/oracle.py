"""The end-to-end oracle: every trade the simulator emitted is in the Brain's `trades` exactly once,
in order per symbol (trade IDs increase with the exchange timestamp)."""

from __future__ import annotations

import csv
import io
import itertools
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from tickbridge.core import keys


@dataclass
class SymbolResult:
    symbol: str
    expected: int
    rows: int
    distinct: int
    missing: int
    duplicates: int
    out_of_order: int

    @property
    def ok(self) -> bool:
        return self.missing == 0 and self.duplicates == 0 and self.out_of_order == 0 and self.rows == self.expected


@dataclass
class OracleReport:
    symbols: list[SymbolResult]

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.symbols)

    @property
    def expected(self) -> int:
        return sum(s.expected for s in self.symbols)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.symbols)

    @property
    def lost(self) -> int:
        return sum(s.missing for s in self.symbols)

    @property
    def duplicated(self) -> int:
        return sum(s.duplicates for s in self.symbols)

    @property
    def out_of_order(self) -> int:
        return sum(s.out_of_order for s in self.symbols)

    def summary(self) -> str:
        return (f"expected={self.expected} rows={self.rows} lost={self.lost} duplicated={self.duplicated} "
                f"out_of_order={self.out_of_order} -> {'OK' if self.ok else 'FAIL'}")  # fmt: skip


def export_csv(questdb_url: str, sql: str) -> list[list[str]]:
    url = f"{questdb_url}/exp?" + urllib.parse.urlencode({"query": sql})
    with urllib.request.urlopen(url, timeout=120) as resp:
        text = resp.read().decode()
    rows = list(csv.reader(io.StringIO(text)))
    return rows[1:]  # header


def count_trades(questdb_url: str, table: str = keys.TRADES_TABLE, exchange: str | None = None) -> int:
    where = f" WHERE exchange = '{exchange}'" if exchange else ""
    rows = export_csv(questdb_url, f"SELECT count() FROM {table}{where}")
    return int(rows[0][0]) if rows else 0


def check_trades(
    questdb_url: str, expected: dict[str, tuple[int, int]], table: str = keys.TRADES_TABLE,
    exchange: str = keys.EXCHANGE,
) -> OracleReport:  # fmt: skip
    """`expected`: symbol -> (first_trade_id, last_trade_id) `exchange` emitted, contiguous."""
    results: list[SymbolResult] = []
    for symbol, (first, last) in sorted(expected.items()):
        ids = [int(r[0]) for r in export_csv(
            questdb_url,
            f"SELECT trade_id FROM {table} WHERE exchange = '{exchange}' AND symbol = '{symbol}' "
            f"AND trade_id >= {first} AND trade_id <= {last} ORDER BY timestamp, trade_id",
        )]  # fmt: skip
        want = last - first + 1 if last >= first else 0
        distinct = len(set(ids))
        out_of_order = sum(1 for a, b in itertools.pairwise(ids) if b < a)
        results.append(SymbolResult(symbol, want, len(ids), distinct, want - distinct, len(ids) - distinct,
                                    out_of_order))  # fmt: skip
    return OracleReport(results)


def expected_from_sim_stats(stats: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """Map the simulator's `/_sim/stats` per-symbol section to the oracle's expectation."""
    per_symbol = stats.get("symbols", stats)
    out: dict[str, tuple[int, int]] = {}
    for symbol, info in per_symbol.items():
        if not isinstance(info, dict) or not info.get("trades", 0):
            continue
        # Trades generated before any client subscribed were never emitted: start at the first one sent.
        first = info.get("first_sent_trade_id", info.get("first_trade_id"))
        if first is not None and info.get("last_trade_id") is not None:
            # Coinbase and Kraken sims key their stats by the venue's symbol (`BTC-USD`) and give the normalized one.
            out[str(info.get("symbol") or symbol)] = (int(first), int(info["last_trade_id"]))
    return out
