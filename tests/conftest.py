"""Shared fixtures: real servers on free ports with temporary directories, stopped by PID."""

from __future__ import annotations

import asyncio
import os
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings

from tickbridge.core.lifecycle import Service
from tickbridge_dev.devstack.servers import ManagedProcess, QuestDBServer, RedisServer, ToxiproxyServer

# Hypothesis profiles (issue 7), registered here because pytest loads this file before the hypothesis
# plugin applies `--hypothesis-profile`: "default" is the short run in `make test`, "long" is `make fuzz`.
for _name, _examples in (("default", 100), ("long", 10_000)):
    hypothesis_settings.register_profile(
        _name, max_examples=_examples, deadline=None, database=None, print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip
hypothesis_settings.load_profile("default")

#: Real Binance captures kept in the repository (their MIT notice beside them): see data/binance/README.md.
BINANCE_DATA = Path(__file__).resolve().parents[1] / "data" / "binance"


@pytest.fixture
def redis_factory(tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Start as many fresh redis-servers as a test needs; all are stopped at the end."""
    started: list[ManagedProcess] = []

    def start(**kwargs: Any) -> RedisServer:
        server = RedisServer(workdir=tmp_path / f"redis{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_server(redis_factory: Callable[..., RedisServer]) -> RedisServer:
    return redis_factory()


@pytest.fixture
def questdb_factory(tmp_path: Path) -> Iterator[Callable[..., QuestDBServer]]:
    """Fresh QuestDB servers (about 3 s each) for tests that use the contract's fixed table names."""
    started: list[QuestDBServer] = []

    def start(**kwargs: Any) -> QuestDBServer:
        server = QuestDBServer(workdir=tmp_path / f"questdb{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def questdb_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[QuestDBServer]:
    """One QuestDB for the session: use unique table names in tests that share it."""
    server = QuestDBServer(workdir=tmp_path_factory.mktemp("questdb-session"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def toxiproxy(tmp_path: Path) -> Iterator[ToxiproxyServer]:
    server = ToxiproxyServer(workdir=tmp_path / "toxiproxy")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def binance_data() -> Path:
    if not BINANCE_DATA.exists():
        pytest.fail(f"{BINANCE_DATA} missing: the captures are part of the repository (git checkout data/)")
    return BINANCE_DATA


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, interval: float = 0.05, what: str = "condition"
) -> None:
    """Poll an async predicate until it holds (never a fixed sleep); fail with `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(interval)


async def equals(awaitable: Awaitable[object], expected: object) -> bool:
    """`eventually(lambda: equals(client.xlen(key), 200))`: an awaited value compared, for polling."""
    return bool(await awaitable == expected)


@pytest.fixture(autouse=True)
def _no_dotenv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Tests never read a developer's `.env`: run from a clean directory."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name in {"SYMBOLS", "VPS_REDIS_URL", "BRAIN_REDIS_URL", "STREAM_KEY", "METRICS_PORT"}:
            monkeypatch.delenv(name)


class ServiceRunner:
    """Roles run in-process as tasks; `stop()` asks each to stop and awaits its orderly shutdown."""

    def __init__(self, stop_timeout: float = 30.0) -> None:
        self.stop_timeout = stop_timeout
        self.items: list[tuple[Service, asyncio.Task[None]]] = []

    def start(self, svc: Any) -> Any:
        self.items.append((svc, asyncio.create_task(svc.run())))
        return svc

    async def stop_one(self, svc: Any) -> None:
        """Stop one role (orderly) and forget it; the others keep running."""
        for item in list(self.items):
            if item[0] is svc:
                svc.request_stop()
                await asyncio.wait_for(item[1], self.stop_timeout)
                self.items.remove(item)

    async def stop(self) -> None:
        for svc, _ in self.items:
            svc.request_stop()
        for _, task in self.items:
            await asyncio.wait_for(task, self.stop_timeout)
        self.items.clear()


@pytest.fixture
async def services() -> AsyncIterator[ServiceRunner]:
    runner = ServiceRunner()
    yield runner
    await runner.stop()


#: The QuestDB logins of `questdb_with_reader`: the writer's (HTTP and PG) and the read-only PG user.
QUESTDB_USER, QUESTDB_READER = "tickbridge", "tbreader"


@pytest.fixture(scope="module")
def questdb_with_reader(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QuestDBServer, str, str]]:
    """QuestDB as compose runs it on the Brain: the writer's login on HTTP and PG, the read-only PG user;
    yields (server, writer password, reader password)."""
    password, reader_password = secrets.token_urlsafe(18), secrets.token_urlsafe(18)
    server = QuestDBServer(
        workdir=tmp_path_factory.mktemp("qdb-reader"),
        extra_conf={
            "http.user": QUESTDB_USER, "http.password": password, "pg.user": QUESTDB_USER, "pg.password": password,
            "pg.readonly.user.enabled": "true", "pg.readonly.user": QUESTDB_READER,
            "pg.readonly.password": reader_password,
        },
    )  # fmt: skip
    server.start()
    yield server, password, reader_password
    server.stop()
