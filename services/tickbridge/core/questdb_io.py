"""QuestDB helpers: SQL over HTTP `/exec`, read-only SQL over PG wire, ILP-over-HTTP sender configuration, WAL
visibility checks."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import urlparse

import aiohttp
import asyncpg
import orjson

from tickbridge.core.settings import Settings


class QuestDBError(RuntimeError):
    """QuestDB answered with an error (bad SQL, table missing, ...)."""


def ilp_conf(url: str, settings: Settings | None = None, *, retry_timeout_ms: int = 10_000) -> str:
    """`questdb.ingress.Sender.from_conf` string for ILP over HTTP, explicit flushes only."""
    parsed = urlparse(url)
    scheme = "https" if parsed.scheme == "https" else "http"
    port = parsed.port or (443 if scheme == "https" else 9000)
    conf = (
        f"{scheme}::addr={parsed.hostname}:{port};auto_flush=off;retry_timeout={retry_timeout_ms};protocol_version=2;"
    )
    if settings is not None and settings.questdb_user and settings.questdb_password:
        conf += f"username={settings.questdb_user};password={settings.questdb_password};"
    return conf


class QuestDBHttp:
    """Minimal async client for QuestDB's REST API (`/exec`), one aiohttp session."""

    def __init__(self, url: str, settings: Settings | None = None, *, timeout: float = 30.0) -> None:
        self.url = url.rstrip("/")
        auth = None
        if settings is not None and settings.questdb_user and settings.questdb_password:
            auth = aiohttp.BasicAuth(settings.questdb_user, settings.questdb_password)
        self._auth = auth
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    async def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=self._timeout, auth=self._auth, json_serialize=lambda o: orjson.dumps(o).decode()
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def exec(self, sql: str) -> dict[str, Any]:
        """Run one statement; returns QuestDB's JSON (`columns`, `dataset`, `count` for queries)."""
        session = await self._get_session()
        async with session.get(f"{self.url}/exec", params={"query": sql}) as resp:
            body = await resp.read()
        try:
            doc: dict[str, Any] = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise QuestDBError(f"HTTP {resp.status}: {body[:200]!r}") from None
        if resp.status != 200 or "error" in doc:
            raise QuestDBError(str(doc.get("error", doc))[:500])
        return doc

    async def rows(self, sql: str) -> list[list[Any]]:
        doc = await self.exec(sql)
        dataset: list[list[Any]] = doc.get("dataset", [])
        return dataset

    async def scalar(self, sql: str) -> Any:
        rows = await self.rows(sql)
        return rows[0][0] if rows and rows[0] else None

    async def ping(self) -> bool:
        try:
            session = await self._get_session()
            async with session.get(f"{self.url}/ping") as resp:
                return resp.status == 204
        except (TimeoutError, aiohttp.ClientError, OSError):
            return False

    async def wal_pending(self, table: str) -> int | None:
        """Transactions committed to the WAL but not yet visible (None if the table is unknown)."""
        rows = await self.rows(f"SELECT sequencerTxn - writerTxn FROM wal_tables() WHERE name = '{table}'")
        return int(rows[0][0]) if rows else None

    async def wait_applied(self, table: str, timeout: float = 30.0, poll: float = 0.02) -> None:
        """Wait until every committed WAL transaction of `table` is visible to queries."""
        deadline = time.monotonic() + timeout
        while True:
            pending = await self.wal_pending(table)
            if pending == 0:
                return
            if await self.is_suspended(table):
                raise QuestDBError(f"table {table} is suspended (WAL apply failed)")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{table}: {pending} WAL transactions still not applied after {timeout}s")
            await asyncio.sleep(poll)

    async def is_suspended(self, table: str) -> bool:
        rows = await self.rows(f"SELECT suspended FROM wal_tables() WHERE name = '{table}'")
        return bool(rows and rows[0][0])

    async def suspended_tables(self) -> list[str]:
        return [str(r[0]) for r in await self.rows("SELECT name FROM wal_tables() WHERE suspended")]


class QuestDBReader:
    """Read-only SQL for the readers (TieredMarketData, `tickbridge query`) as QuestDB's PG-wire read-only user.

    QuestDB OSS has one HTTP login (`http.user`, full rights: the writer's) and, on PG wire, a second user
    that can only read (`pg.readonly.user.enabled/user/password`): DROP, INSERT, ALTER, CREATE, TRUNCATE
    answer "Write permission denied". Same methods as `QuestDBHttp` (rows of the query, `QuestDBError`
    for any failure). One connection, opened on first use, queries in turn; a broken one (QuestDB restarted)
    is reopened and a SELECT sent once more.
    """

    def __init__(self, url: str, user: str, password: str, *, timeout: float = 30.0) -> None:
        parsed = urlparse(url)
        self.host = parsed.hostname or "localhost"
        self.port = parsed.port or 8812
        self.database = parsed.path.lstrip("/") or "qdb"
        self.user = user
        self._password = password
        self._timeout = timeout
        self._conn: asyncpg.Connection | None = None
        self._lock = asyncio.Lock()

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close(timeout=5)

    async def _connect(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            self._conn = await asyncpg.connect(
                host=self.host, port=self.port, user=self.user, password=self._password, database=self.database,
                timeout=self._timeout, statement_cache_size=0, ssl=False,
            )  # fmt: skip
        return self._conn

    async def rows(self, sql: str) -> list[list[Any]]:
        async with self._lock:
            for attempt in range(2):
                try:
                    conn = await self._connect()
                    records = await conn.fetch(sql, timeout=self._timeout)
                    return [list(r.values()) for r in records]
                except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError, ConnectionError) as exc:
                    await self._drop()
                    if attempt or not sql.lstrip().upper().startswith("SELECT"):
                        raise QuestDBError(f"QuestDB PG {self.host}:{self.port}: {exc}") from exc
                except (asyncpg.PostgresError, OSError, TimeoutError) as exc:
                    if not isinstance(exc, asyncpg.PostgresError):
                        await self._drop()
                    raise QuestDBError(f"QuestDB PG {self.host}:{self.port} as {self.user}: {exc}") from exc
        raise AssertionError("unreachable")

    async def exec(self, sql: str) -> dict[str, Any]:
        """Run one statement; `{"dataset": rows}` like `QuestDBHttp.exec` (writes are refused: QuestDBError)."""
        return {"dataset": await self.rows(sql)}

    async def scalar(self, sql: str) -> Any:
        rows = await self.rows(sql)
        return rows[0][0] if rows and rows[0] else None

    async def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()


def reader_for(settings: Settings) -> QuestDBHttp | QuestDBReader:
    """COLD's SQL client: the read-only PG-wire login when QUESTDB_READER_USER/PASSWORD are set, else HTTP
    `/exec` on BRAIN_QUESTDB_URL (a QuestDB without logins, as in the native stack and the tests)."""
    if settings.questdb_reader_user and settings.questdb_reader_password:
        return QuestDBReader(
            settings.brain_questdb_pg_url, settings.questdb_reader_user, settings.questdb_reader_password
        )
    return QuestDBHttp(settings.brain_questdb_url, settings)
