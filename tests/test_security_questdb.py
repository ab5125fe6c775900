"""QuestDB credentials from the environment (issue 7): a QuestDB with HTTP Basic auth refuses anonymous
SQL and ILP, and the core helpers the roles use (`QuestDBHttp`, `ilp_conf`) get in with QUESTDB_USER /
QUESTDB_PASSWORD from Settings. The readers (TieredMarketData, `tickbridge query`) use a login that can only
read (issue 14): QuestDB's PG-wire read-only user, QUESTDB_READER_USER / QUESTDB_READER_PASSWORD."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry
from questdb.ingress import IngressError, Sender, TimestampNanos

from conftest import QUESTDB_READER as READER
from tickbridge.brain.tiered import COLD, TieredMarketData
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp, ilp_conf
from tickbridge.core.settings import Settings
from tickbridge.core.wire import TRADES_DDL
from tickbridge.devstack.servers import QuestDBServer, RedisServer

pytestmark = pytest.mark.timeout(180)

USER = "tickbridge"


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QuestDBServer, str]]:
    password = secrets.token_urlsafe(18)
    server = QuestDBServer(
        workdir=tmp_path_factory.mktemp("qdb-auth"), extra_conf={"http.user": USER, "http.password": password}
    )
    server.start()
    yield server, password
    server.stop()


async def test_sql_needs_the_credentials_from_settings(secured: tuple[QuestDBServer, str]) -> None:
    server, password = secured
    anonymous = QuestDBHttp(server.url)
    wrong = QuestDBHttp(server.url, Settings(questdb_user=USER, questdb_password="not-" + password))
    right = QuestDBHttp(server.url, Settings(questdb_user=USER, questdb_password=password))
    try:
        for client in (anonymous, wrong):
            with pytest.raises(QuestDBError):
                await client.exec("SELECT 1")
        assert await right.scalar("SELECT 41 + 1") == 42
    finally:
        for client in (anonymous, wrong, right):
            await client.close()


async def test_ilp_needs_the_credentials_from_settings(secured: tuple[QuestDBServer, str]) -> None:
    server, password = secured
    settings = Settings(questdb_user=USER, questdb_password=password)
    table = f"sec_{secrets.token_hex(4)}"
    sql = QuestDBHttp(server.url, settings)
    try:
        await sql.exec(f"CREATE TABLE {table} (s SYMBOL, v DOUBLE, ts TIMESTAMP) TIMESTAMP(ts) PARTITION BY DAY WAL")
        with pytest.raises(IngressError), Sender.from_conf(ilp_conf(server.url, retry_timeout_ms=0)) as sender:
            sender.row(table, symbols={"s": "x"}, columns={"v": 1.0}, at=TimestampNanos.now())
            sender.flush()
        with Sender.from_conf(ilp_conf(server.url, settings, retry_timeout_ms=0)) as sender:
            sender.row(table, symbols={"s": "x"}, columns={"v": 1.0}, at=TimestampNanos.now())
            sender.flush()
        await sql.wait_applied(table)
        assert await sql.scalar(f"SELECT count() FROM {table}") == 1
    finally:
        await sql.close()


async def test_the_readers_login_can_select_but_not_drop_nor_insert(
    questdb_with_reader: tuple[QuestDBServer, str, str], redis_server: RedisServer
) -> None:
    """Trading code and `tickbridge query` read COLD through TieredMarketData. Before, it held the writer's
    full-rights login (QUESTDB_USER): a bug or an injected query in trading code could DROP TABLE trades.
    With QUESTDB_READER_USER/PASSWORD it reads as QuestDB's read-only PG user: answers, but every write is
    refused and the table is untouched."""
    server, password, reader_password = questdb_with_reader
    writer = QuestDBHttp(server.url, Settings(questdb_user=USER, questdb_password=password))
    await writer.exec(TRADES_DDL)
    await writer.exec(
        "INSERT INTO trades VALUES ('2024-08-09T00:00:00.000001Z', 'binance_spot', 'BTCUSDT', 'BUY', 100.5, 0.01, 1, "
        "'2024-08-09T00:00:00.002Z'), ('2024-08-09T00:00:00.000002Z', 'binance_spot', 'BTCUSDT', 'SELL', 100.6, 0.02, "
        "2, '2024-08-09T00:00:00.003Z')"
    )
    await writer.wait_applied("trades")
    settings = Settings(
        brain_redis_url=redis_server.url, brain_questdb_url=server.url, symbols=("BTCUSDT",),
        brain_questdb_pg_url=f"postgresql://127.0.0.1:{server.pg_port}/qdb",
        questdb_user=USER, questdb_password=password,  # in the same .env: the reader must not use them
        questdb_reader_user=READER, questdb_reader_password=reader_password,
    )  # fmt: skip
    try:
        async with TieredMarketData(settings, registry=CollectorRegistry(), follow=False) as md:
            answer = await md.recent("BTCUSDT", 5)
            assert [r.trade_id for r in answer.rows] == [1, 2] and answer.tiers == (COLD,)
            for sql in (
                "DROP TABLE trades",
                "INSERT INTO trades VALUES (now(), 'binance_spot', 'BTCUSDT', 'BUY', 1.0, 1.0, 3, now())",
                "TRUNCATE TABLE trades",
                "ALTER TABLE trades DROP PARTITION LIST '2024-08-09'",
                "CREATE TABLE evil (a INT)",
            ):
                with pytest.raises(QuestDBError, match="permission denied"):
                    await md.qdb.exec(sql)
            assert await md.qdb.scalar("SELECT count() FROM trades") == 2  # the same link still reads
        await writer.wait_applied("trades")
        assert await writer.scalar("SELECT count() FROM trades") == 2
        assert await writer.scalar("SELECT count() FROM tables() WHERE table_name = 'evil'") == 0
    finally:
        await writer.close()


async def test_a_wrong_reader_password_is_one_clear_error(questdb_with_reader: tuple[QuestDBServer, str, str]) -> None:
    from tickbridge.core.questdb_io import reader_for

    server, _, reader_password = questdb_with_reader
    settings = Settings(
        brain_questdb_pg_url=f"postgresql://127.0.0.1:{server.pg_port}/qdb", questdb_reader_user=READER,
        questdb_reader_password="not-" + reader_password,
    )  # fmt: skip
    reader = reader_for(settings)
    try:
        with pytest.raises(QuestDBError, match="invalid username/password"):
            await reader.rows("SELECT 1")
    finally:
        await reader.close()


async def test_the_reader_link_survives_a_questdb_restart(questdb_with_reader: tuple[QuestDBServer, str, str]) -> None:
    """The read-only link is one PG connection: after QuestDB restarts, the next SELECT reopens it (same
    ports) and answers, instead of every COLD answer failing until the trading process restarts."""
    from tickbridge.core.questdb_io import reader_for

    server, _, reader_password = questdb_with_reader
    settings = Settings(
        brain_questdb_pg_url=f"postgresql://127.0.0.1:{server.pg_port}/qdb", questdb_reader_user=READER,
        questdb_reader_password=reader_password,
    )  # fmt: skip
    reader = reader_for(settings)
    try:
        assert await reader.scalar("SELECT 40 + 2") == 42
        await asyncio.to_thread(server.restart)
        assert await reader.scalar("SELECT 40 + 3") == 43
    finally:
        await reader.close()
