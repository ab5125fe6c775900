"""QuestDB credentials from the environment (issue 7): a QuestDB with HTTP Basic auth refuses anonymous
SQL and ILP, and the core helpers the roles use (`QuestDBHttp`, `ilp_conf`) get in with QUESTDB_USER /
QUESTDB_PASSWORD from Settings."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from questdb.ingress import IngressError, Sender, TimestampNanos

from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp, ilp_conf
from tickbridge.core.settings import Settings
from tickbridge.devstack.servers import QuestDBServer

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
