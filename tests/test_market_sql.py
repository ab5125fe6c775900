"""The market dashboard's QuestDB data source answers its panel queries over PG wire (issue 19): every SQL target
of the generated dashboard JSON, with Grafana's macros expanded as its PostgreSQL data source does, runs as the
read-only PG user (the Brain's QUESTDB_READER_USER) against a real QuestDB holding trades, and returns rows; the
gap query finds exactly the trade IDs left out."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest
from questdb.ingress import Sender, TimestampMicros

from conftest import QUESTDB_READER as READER
from conftest import QUESTDB_USER as USER
from tickbridge.core.questdb_io import QuestDBHttp, ilp_conf
from tickbridge.core.settings import Settings
from tickbridge.core.wire import TRADES_DDL
from tickbridge.devstack.servers import QuestDBServer
from tickbridge.ops import dashboards

pytestmark = pytest.mark.timeout(180)

#: symbol -> (first trade ID, trades, IDs left out, price)
BOOK = {"BTCUSDT": (1_000, 300, {1_100, 1_101, 1_250}, 64_000.5), "ETHUSDT": (50, 120, set(), 3_100.25)}


async def _load_trades(server: QuestDBServer, password: str, now: datetime) -> dict[str, int]:
    """BOOK's trades over the last 5 minutes (exchange time), as the writer's login; the rows per symbol."""
    settings = Settings(questdb_user=USER, questdb_password=password)
    writer = QuestDBHttp(server.url, settings)
    counts: dict[str, int] = {}
    try:
        await writer.exec(TRADES_DDL)
        with Sender.from_conf(ilp_conf(server.url, settings, retry_timeout_ms=0)) as sender:
            for symbol, (first, n, left_out, price) in BOOK.items():
                ids = [first + i for i in range(n) if first + i not in left_out]
                counts[symbol] = len(ids)
                for i, trade_id in enumerate(ids):
                    ts = TimestampMicros(int((now - timedelta(minutes=5)).timestamp() * 1e6) + 900_000 * i + 1)
                    sender.row(
                        "trades",
                        symbols={"exchange": "binance_spot", "symbol": symbol, "side": "BUY" if i % 2 else "SELL"},
                        columns={"price": price + i, "volume": 0.01, "trade_id": trade_id, "recv_ts": ts},
                        at=ts,
                    )
            sender.flush()
        await writer.wait_applied("trades")
    finally:
        await writer.close()
    return counts


async def test_every_market_panel_query_answers_over_pg_wire_as_the_reader(
    questdb_with_reader: tuple[QuestDBServer, str, str],
) -> None:
    server, password, reader_password = questdb_with_reader
    now = datetime.now(UTC)
    counts = await _load_trades(server, password, now)
    board = json.loads(dashboards.market_path().read_text())
    queries = dashboards.sql_queries(board)
    assert queries, "no SQL panels on the market dashboard"
    # Grafana's default range (now-1h .. now) and an interval it picks for it (~2 s at 1,800 points).
    start, end = now - timedelta(hours=1), now + timedelta(seconds=1)
    conn = await asyncpg.connect(
        host="127.0.0.1", port=server.pg_port, user=READER, password=reader_password, database="qdb"
    )
    try:
        answers: dict[str, list[asyncpg.Record]] = {}
        for title, fmt, sql in queries:
            expanded = dashboards.expand_sql_macros(sql, start, end, 2000)
            assert "$" not in expanded, f"{title}: a macro left: {expanded}"
            rows = await conn.fetch(expanded)
            assert rows, f"{title}: no rows\n{expanded}"
            if fmt == "time_series":  # Grafana's time series format: a time column, sorted by it
                times = [r["time"] for r in rows]
                assert times == sorted(times), title
            answers[title] = rows
        # What the panels show is what QuestDB holds.
        last = {r["symbol"]: r["price"] for r in answers["Last price"]}
        assert last == {s: price + counts[s] - 1 for s, (_, _, _, price) in BOOK.items()}
        gaps = {r["symbol"]: (r["trades"], r["missing"]) for r in answers["Missing trade IDs"]}
        assert gaps == {s: (counts[s], len(left_out)) for s, (_, _, left_out, _) in BOOK.items()}
        per_second = answers["Trades per second"]
        assert {r["metric"] for r in per_second} == set(BOOK)
        # One trade per 0.9 s: each full 2-second interval holds 2 or 3 trades (1-1.5 per second).
        assert all(0 < r["trades_per_s"] <= 1.5 for r in per_second)
        total = sum(r["trades_per_s"] * 2 for r in per_second)
        assert round(total) == sum(counts.values())
        # The reader cannot write: the data source's login is the read-only one.
        with pytest.raises(asyncpg.PostgresError, match="permission denied"):
            await conn.execute("DROP TABLE trades")
    finally:
        await conn.close()


def test_macros_expand_as_grafanas_postgresql_data_source() -> None:
    start = datetime(2026, 12, 4, 17, 0, 0, tzinfo=UTC)
    end = datetime(2026, 12, 4, 18, 0, 0, 250_000, tzinfo=UTC)
    sql = "SELECT 1 FROM t WHERE $__timeFilter(timestamp) AND x > $__timeFrom() SAMPLE BY ${__interval_ms}T"
    assert dashboards.expand_sql_macros(sql, start, end, 2000) == (
        "SELECT 1 FROM t WHERE timestamp BETWEEN '2026-12-04T17:00:00Z' AND '2026-12-04T18:00:00.25Z' "
        "AND x > '2026-12-04T17:00:00Z' SAMPLE BY 2000T"
    )
