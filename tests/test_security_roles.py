"""Roles under the real security setup: each role's own code, its ACL user, TLS to the Brain (issue 7).

Poisoned stream entries reach the Brain consumer over TLS exactly as the forwarder would append them;
each is counted and dead-lettered with its raw payload, the consumer keeps running, and no valid tick
around it is lost or duplicated. Every role started with a broken variable exits with one line naming it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
import redis.exceptions
from prometheus_client import CollectorRegistry

from conftest import eventually
from tickbridge.brain import deadletters
from tickbridge.brain.consumer import DEAD_LETTER_MAX_BYTES, BrainConsumer
from tickbridge.brain.tiered import COLD, HOT, WARM, TieredMarketData
from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.redis_io import ensure_group, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import BookSnapshot, DepthDiff, Trade
from tickbridge.core.wire import TRADES_DDL, encode_book, encode_depth, encode_tick
from tickbridge.forwarder.book_relay import relay_book_requests
from tickbridge.ops.acl import acl_variables, render_acl
from tickbridge_dev.devstack.servers import QuestDBServer
from tickbridge_dev.devstack.tls import BRAIN_ACL, CertPaths, SecureRedisServer, make_certs

pytestmark = pytest.mark.timeout(90)

STREAM = keys.DEFAULT_STREAM_KEY
TS = 1_723_161_255_342_000


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture
def passwords() -> dict[str, str]:
    return {name: secrets.token_urlsafe(24) for name in acl_variables(BRAIN_ACL.read_text())}


@pytest.fixture
def brain(certs: CertPaths, passwords: dict[str, str], tmp_path: Path) -> Iterator[SecureRedisServer]:
    server = SecureRedisServer(aclfile=render_acl(BRAIN_ACL, tmp_path / "brain.acl", passwords), certs=certs,
                               plain_port=False, workdir=tmp_path / "brain")  # fmt: skip
    server.start()
    yield server
    server.stop()


def tls_settings(server: SecureRedisServer, user: str, passwords: dict[str, str], **kw: object) -> Settings:
    assert server.certs is not None
    return Settings(
        brain_redis_url=server.url_for(user, passwords[f"BRAIN_REDIS_{user.upper()}_PASSWORD"]),
        redis_tls_ca=str(server.certs.ca),
        redis_tls_cert=str(server.certs.client_cert),
        redis_tls_key=str(server.certs.client_key),
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
async def admin(brain: SecureRedisServer, passwords: dict[str, str]) -> AsyncIterator[aioredis.Redis]:
    settings = tls_settings(brain, "admin", passwords)
    client = make_client(settings.brain_redis_url, settings)
    yield client
    await client.aclose()


def trade_fields(symbol: str, trade_id: int) -> list[bytes]:
    t = Trade(symbol, f"{61000 + trade_id}.5", "0.001", "BUY", TS + trade_id, trade_id, TS + trade_id + 7)
    return [str(x).encode() for x in encode_tick(t)]


def poisoned(base: list[bytes], field: bytes, value: bytes | None) -> list[bytes]:
    """`base` with `field` set to `value` (None removes it)."""
    out: list[bytes] = []
    for name, old in zip(base[::2], base[1::2], strict=True):
        if name == field:
            if value is not None:
                out += [name, value]
        else:
            out += [name, old]
    return out


#: (label, fields) of entries no consumer may write: each must become one dead letter.
POISON: list[tuple[str, list[bytes]]] = [
    ("invalid utf-8", poisoned(trade_fields("BTCUSDT", 0), b"price", b"\xff\xfe61000")),
    ("nan price", poisoned(trade_fields("BTCUSDT", 0), b"price", b"NaN")),
    ("inf volume", poisoned(trade_fields("BTCUSDT", 0), b"volume", b"inf")),
    ("negative volume", poisoned(trade_fields("BTCUSDT", 0), b"volume", b"-1")),
    ("huge integer", poisoned(trade_fields("BTCUSDT", 0), b"trade_id", b"9" * 5000)),
    ("missing trade_id", poisoned(trade_fields("BTCUSDT", 0), b"trade_id", None)),
    ("unknown type", poisoned(trade_fields("BTCUSDT", 0), b"type", b"KLINE")),
    ("symbol with newline", poisoned(trade_fields("BTCUSDT", 0), b"symbol", b"BTCUSDT\n")),
    ("lower-case symbol", poisoned(trade_fields("BTCUSDT", 0), b"symbol", b"btcusdt")),
    ("depth with bad json", [b"type", b"DEPTH", b"symbol", b"BTCUSDT", b"bids", b"[[", b"asks", b"[]"]),
    ("oversized field", poisoned(trade_fields("BTCUSDT", 0), b"side", b"B" * 1_000_000)),
    ("nothing known", [b"hello", b"world"]),
    ("exchange smuggling a key", poisoned(trade_fields("BTCUSDT", 0), b"exchange", b"x:warm:BTCUSDT:y")),
]
#: A well-formed exchange name that is not ours: keys outside the consumer's ACL.
FOREIGN_EXCHANGE = [("foreign exchange", poisoned(trade_fields("BTCUSDT", 0), b"exchange", b"evil"))]


async def test_consumer_dead_letters_poison_over_tls_and_loses_no_valid_tick(
    brain: SecureRedisServer, passwords: dict[str, str], admin: aioredis.Redis
) -> None:
    await run_poison(brain, passwords, admin, POISON, timeout=30)


async def test_consumer_dead_letters_a_foreign_exchange(
    brain: SecureRedisServer, passwords: dict[str, str], admin: aioredis.Redis
) -> None:
    """The fast path lets it through, the ingest call is refused (keys outside the ACL), and the consumer's
    entry-by-entry retry dead-letters it: slower than a decode error, but nothing stalls or is lost."""
    await run_poison(brain, passwords, admin, FOREIGN_EXCHANGE, timeout=30)


async def run_poison(
    brain: SecureRedisServer,
    passwords: dict[str, str],
    admin: aioredis.Redis,
    poison: list[tuple[str, list[bytes]]],
    timeout: float,
) -> None:
    """Valid trades with `poison` between them, through a real consumer with its own user over TLS."""
    forwarder_settings = tls_settings(brain, "forwarder", passwords)
    forwarder = make_client(forwarder_settings.brain_redis_url, forwarder_settings)
    # Valid trades with poison between them, appended by the forwarder's user with explicit IDs.
    valid: dict[str, list[bytes]] = {"BTCUSDT": [], "ETHUSDT": []}
    poison_ids: dict[bytes, tuple[str, list[bytes]]] = {}
    seq = 0
    try:
        for i in range(1, 3 * len(poison) + 3):
            symbol = "BTCUSDT" if i % 2 else "ETHUSDT"
            seq += 1
            entry_id = f"{1_723_161_255_000 + seq}-0".encode()
            await forwarder.execute_command("XADD", STREAM, entry_id, *trade_fields(symbol, i))  # type: ignore[no-untyped-call]
            valid[symbol].append(entry_id)
            if i % 3 == 0:
                label, fields = poison[(i // 3 - 1) % len(poison)]
                seq += 1
                entry_id = f"{1_723_161_255_000 + seq}-0".encode()
                await forwarder.execute_command("XADD", STREAM, entry_id, *fields)  # type: ignore[no-untyped-call]
                poison_ids[entry_id] = (label, fields)
    finally:
        await forwarder.aclose()
    assert {label for label, _ in poison_ids.values()} == {label for label, _ in poison}

    registry = CollectorRegistry()
    consumer = BrainConsumer(
        tls_settings(brain, "consumer", passwords, symbols=("BTCUSDT", "ETHUSDT"), consumer_name="c1"),
        registry,
        monitor_interval_s=0.2,
    )
    task = asyncio.create_task(consumer.run())
    try:
        want_valid = sum(len(v) for v in valid.values())

        async def all_handled() -> bool:
            if task.done():
                return True
            n = sum([await admin.xlen(keys.trades_key(s)) for s in valid])
            return n >= want_valid and await admin.xlen(keys.CONSUMER_DEAD_LETTER) >= len(poison_ids)

        await eventually(all_handled, timeout=timeout, what="every entry written or dead-lettered")
        assert not task.done(), f"the consumer stopped: {task.exception() if task.done() else ''}"

        # Every valid tick exactly once, in stream order, per symbol.
        for symbol, ids in valid.items():
            rows: list[tuple[bytes, dict[bytes, bytes]]] = await admin.xrange(keys.trades_key(symbol))  # type: ignore[assignment]
            assert [fields[b"src_id"] for _, fields in rows] == ids, symbol
        # Every poisoned entry once in the dead-letter stream, with a reason and its raw fields.
        letters: list[tuple[bytes, dict[bytes, bytes]]] = await admin.xrange(keys.CONSUMER_DEAD_LETTER)  # type: ignore[assignment]
        by_src = {fields.get(b"src_id"): fields for _, fields in letters}
        assert len(letters) == len(poison_ids) == len(by_src)
        for entry_id, (label, fields) in poison_ids.items():
            letter = by_src.get(entry_id)
            assert letter is not None, f"{label}: no dead letter for {entry_id!r}"
            assert letter.get(b"reason"), label
            raw = dict(zip(fields[::2], fields[1::2], strict=True))
            if b"truncated" in letter:  # over the consumer's byte cap: a prefix of the entry is kept (issue 14)
                assert sum(len(k) + len(v) for k, v in letter.items()) <= DEAD_LETTER_MAX_BYTES + 1024, label
                assert all(raw[k].startswith(v) for k, v in letter.items() if k in raw), f"{label}: not a prefix"
            else:
                assert {k: letter.get(k) for k in raw} == raw, f"{label}: raw payload not kept byte for byte"
        dead = registry.get_sample_value("tickbridge_consumer_dead_letters_total")
        assert dead == len(poison_ids)
        pending = await admin.xpending(STREAM, keys.DEFAULT_CONSUMER_GROUP)
        assert pending["pending"] == 0

        # Still running: a later tick comes through.
        await admin.xadd(STREAM, dict(zip(*[iter(trade_fields("BTCUSDT", 999))] * 2, strict=True)),
                         id=f"{1_723_161_255_000 + seq + 1}-0")  # fmt: skip

        async def later_tick() -> bool:
            return await admin.xlen(keys.trades_key("BTCUSDT")) == len(valid["BTCUSDT"]) + 1

        await eventually(later_tick, timeout=15, what="a tick after the poison")
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 15)


# -- broken configuration: one line naming the variable ---------------------------------------------

ROLES = ("collector", "forwarder", "consumer", "writer", "sim")
BROKEN: list[tuple[str, str]] = [
    ("VPS_REDIS_URL", "http://nowhere"),
    ("BRAIN_REDIS_URL", "rediss//missing-colon"),
    ("SYMBOLS", "BTC-USDT"),
    ("RAM_BUFFER_BYTES", "-5"),
    ("CONSUMER_BATCH", "lots"),
    ("METRICS_PORT", "70000"),
    ("LOG_LEVEL", "LOUD"),
]


@pytest.mark.parametrize("role", ROLES)
def test_each_role_with_a_broken_variable_exits_with_one_line_naming_it(role: str, tmp_path: Path) -> None:
    # Settings are validated as a whole, so two variables per role cover the loader; rotate which.
    i = ROLES.index(role)
    for name, value in (BROKEN[i % len(BROKEN)], BROKEN[(i + 3) % len(BROKEN)]):
        env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), name: value}
        proc = subprocess.run([sys.executable, "-m", "tickbridge", role], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60, check=False)  # fmt: skip
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode != 0, f"{role} started with {name}={value!r}"
        assert len(lines) == 1 and name in lines[0], f"{role} with {name}={value!r}: {proc.stderr[-500:]!r}"
        assert "Traceback" not in proc.stderr and value not in proc.stdout


#: A `.env.example` placeholder or a short password in each secret a role reads (issue 14, item 7).
PLACEHOLDERS: dict[str, tuple[str, str]] = {
    "collector": ("VPS_REDIS_URL", "redis://collector:change-me-vps-redis-collector-password@redis:6379/0"),
    "forwarder": ("BRAIN_REDIS_URL", "rediss://forwarder:change-me-brain-redis-forwarder-password@brain:6380/0"),
    "consumer": ("BRAIN_REDIS_URL", "redis://consumer:tooshort@redis:6379/0"),
    "writer": ("QUESTDB_PASSWORD", "change-me-questdb-password"),
    "sim": ("QUESTDB_READER_PASSWORD", "quest"),
}


@pytest.mark.parametrize("role", ROLES)
def test_each_role_refuses_a_placeholder_or_short_secret_with_one_line(role: str, tmp_path: Path) -> None:
    """The docs promise `.env.example`'s placeholders can never be live: a role given one (or a password under
    16 characters) does not start, and says which variable in one line, without echoing the secret."""
    name, value = PLACEHOLDERS[role]
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), name: value}
    proc = subprocess.run([sys.executable, "-m", "tickbridge", role], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, f"{role} started with {name}={value!r}: {proc.stderr[-500:]!r}"
    assert len(lines) == 1 and lines[0].startswith(f"config error: {name}: "), proc.stderr[-500:]
    secret = value.split("://")[-1].split("@")[0].split(":")[-1]
    assert secret not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("BRAIN_REDIS_URL", "http://forwarder:{pw}@brain.example.net:6380/0"),
        ("VPS_REDIS_URL", "redis//collector:{pw}@redis:6379/0"),
        ("BRAIN_REDIS_URL", "https://forwarder:{pw}-and-a-very-long-tail-past-the-sixty-character-cut@brain:6380/0"),
        ("VPS_QUESTDB_URL", "ftp://user:{pw}@questdb:9000"),
    ],
)
def test_config_error_never_prints_a_password(name: str, value: str, tmp_path: Path) -> None:
    password = secrets.token_hex(12)
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), name: value.format(pw=password)}
    proc = subprocess.run([sys.executable, "-m", "tickbridge", "consumer"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 2 and name in proc.stderr, proc.stderr
    assert password not in proc.stderr + proc.stdout and password[:6] not in proc.stderr, proc.stderr


@pytest.mark.parametrize(
    ("role", "tls_env", "name"),
    [
        ("forwarder", {"REDIS_TLS_CA": "/nonexistent/ca.crt"}, "REDIS_TLS_CA"),
        ("consumer", {"REDIS_TLS_CERT": "missing/client.crt", "REDIS_TLS_KEY": "missing/client.key"}, "REDIS_TLS_CERT"),
        ("writer", {"REDIS_TLS_CERT": "{ca}"}, "REDIS_TLS_KEY"),
    ],
)
def test_a_role_with_broken_tls_files_exits_with_one_line_naming_the_variable(
    role: str, tls_env: dict[str, str], name: str, tmp_path: Path
) -> None:
    """Not an endless "connection failed, retrying" loop: the role refuses to start and says why."""
    existing = tmp_path / "present.crt"
    existing.write_text("x")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "METRICS_PORT": "0",
           "BRAIN_REDIS_URL": f"rediss://x:{secrets.token_hex(12)}@127.0.0.1:1/0",
           **{k: v.format(ca=existing) for k, v in tls_env.items()}}  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "tickbridge", role], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, check=False)  # fmt: skip
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"config error: {name}:"), proc.stderr


async def test_trading_code_reads_every_tier_as_the_reader_user_and_can_change_nothing(
    brain: SecureRedisServer,
    passwords: dict[str, str],
    admin: aioredis.Redis,
    questdb_factory: Callable[..., QuestDBServer],
) -> None:
    """`reader` (BRAIN_REDIS_READER_PASSWORD) over TLS: HOT, WARM and COLD with the writer's unconfirmed
    backlog all answer; every write, and a group read that would change a pending list, is refused."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    await qdb.exec(TRADES_DDL)
    await qdb.close()
    key, warm = keys.trades_key("BTCUSDT"), keys.warm_key("BTCUSDT")
    hour_ago = TS - 3_600_000_000
    for i in range(1, 201):  # as the consumer writes them (1..100 an hour older: out of WARM), none confirmed
        ts = (hour_ago if i <= 100 else TS) + i * 1000
        t = Trade("BTCUSDT", f"{61000 + i}.5", "0.001", "BUY", ts, i, ts + 7)
        await admin.xadd(key, dict(zip(*[iter(["src_id", f"{i}-0", *encode_tick(t)])] * 2, strict=True)))
        if i > 100:
            await admin.zadd(warm, {f"{i}|{61000 + i}.5|0.001|BUY|{ts + 7}": ts})
    await ensure_group(admin, key, keys.WRITER_GROUP, "0")
    settings = tls_settings(brain, "reader", passwords, brain_questdb_url=qserver.url, symbols=("BTCUSDT",),
                            hot_ticks=50, warm_window_s=300)  # fmt: skip
    async with TieredMarketData(settings, registry=CollectorRegistry()) as md:
        a = await md.recent("BTCUSDT", 20)
        assert a.tiers == (HOT,) and [r.trade_id for r in a.rows] == list(range(181, 201))
        a = await md.recent("BTCUSDT", 80)
        assert a.tiers == (WARM,) and [r.trade_id for r in a.rows] == list(range(121, 201))
        a = await md.recent("BTCUSDT", 150)  # COLD is empty: the backlog fills in 51..100
        assert a.tiers == (WARM, COLD) and [r.trade_id for r in a.rows] == list(range(51, 201))
        a = await md.range("BTCUSDT", hour_ago, hour_ago + 60_000)
        assert a.tiers == (COLD,) and [r.trade_id for r in a.rows] == list(range(1, 61))
        reader = md.redis
        for command in (
            ["XADD", key, "*", "a", "b"],
            ["ZADD", warm, 1, "x"],
            ["DEL", key],
            ["XREADGROUP", "GROUP", keys.WRITER_GROUP, "r", "STREAMS", key, ">"],
            ["XACK", key, keys.WRITER_GROUP, "1-0"],
            ["GET", "tickbridge:writer:x"],
        ):
            with pytest.raises(redis.exceptions.NoPermissionError):
                await reader.execute_command(*command)
    assert (await admin.xinfo_groups(key))[0]["pending"] == 0


async def test_a_reader_without_the_backlog_commands_is_told_once(
    brain: SecureRedisServer,
    passwords: dict[str, str],
    admin: aioredis.Redis,
    questdb_factory: Callable[..., QuestDBServer],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A user made from the old docs' example (no XINFO GROUPS, XPENDING): COLD still answers, and the log says
    once that it may miss what the writer has not confirmed, instead of a silent hole."""
    qserver = questdb_factory()
    qdb = QuestDBHttp(qserver.url)
    await qdb.exec(TRADES_DDL)
    await qdb.close()
    password = secrets.token_urlsafe(16)
    await admin.execute_command(
        "ACL", "SETUSER", "oldreader", "on", f">{password}", "%R~market:*", "+ping", "+client|setname", "+client|id",
        "+xread", "+xrange", "+xrevrange", "+xinfo|stream", "+zrange",
    )  # fmt: skip
    assert brain.certs is not None
    settings = Settings(
        brain_redis_url=brain.url_for("oldreader", password), brain_questdb_url=qserver.url, symbols=("BTCUSDT",),
        redis_tls_ca=str(brain.certs.ca), redis_tls_cert=str(brain.certs.client_cert),
        redis_tls_key=str(brain.certs.client_key),
    )  # fmt: skip
    caplog.set_level("WARNING", logger="tickbridge.brain.tiered")
    async with TieredMarketData(settings, registry=CollectorRegistry(), follow=False) as md:
        for _ in range(3):
            assert (await md.recent("BTCUSDT", 10)).rows == []
    warnings = [r.getMessage() for r in caplog.records if "writer has not confirmed" in r.getMessage()]
    assert len(warnings) == 1 and "xinfo|groups" in warnings[0]


async def test_dead_letter_replay_as_the_consumer_user_keeps_warm_whole(
    brain: SecureRedisServer, passwords: dict[str, str], admin: aioredis.Redis
) -> None:
    """`c exec consumer tickbridge deadletters --replay` runs as `consumer`: each trade goes back to its stream,
    and into WARM only if it is inside WARM's window (an older one would make WARM claim trades it lacks); a
    newer one moves the window and trims WARM."""
    warm = keys.warm_key("BTCUSDT")
    newest = TS + 3_600_000_000
    await admin.zadd(warm, {f"1|1.0|1|BUY|{newest}": newest, f"2|1.0|1|BUY|{newest}": newest - 200_000_000})
    offsets = {10: -600_000_000, 11: -60_000_000, 12: +150_000_000}  # trade_id -> exchange time vs WARM's newest
    for trade_id, offset in offsets.items():
        t = Trade("BTCUSDT", "61000.5", "0.001", "SELL", newest + offset, trade_id, newest + offset + 7)
        fields = ["src_id", f"{trade_id}-0", "reason", "delivered 5 times", *encode_tick(t)]
        await admin.xadd(keys.CONSUMER_DEAD_LETTER, dict(zip(fields[::2], fields[1::2], strict=True)))
    settings = tls_settings(brain, "consumer", passwords)
    consumer = make_client(settings.brain_redis_url, settings)
    try:
        result = await deadletters.replay(consumer, await deadletters.read_all(consumer), warm_window_s=300)
    finally:
        await consumer.aclose()
    assert (result.replayed, result.failed) == (3, [])
    stream = await admin.xrange(keys.trades_key("BTCUSDT"))
    assert [int(f[b"trade_id"]) for _, f in stream] == [10, 11, 12]
    assert await admin.xlen(keys.CONSUMER_DEAD_LETTER) == 0
    # 10 is older than the window: not in WARM. 12 moved the window: 2 (350 s before 12) is trimmed.
    members = await admin.zrange(warm, 0, -1, withscores=True)
    assert [(int(m.split(b"|")[0]), int(s)) for m, s in members] == [
        (11, newest - 60_000_000), (1, newest), (12, newest + 150_000_000),
    ]  # fmt: skip


async def test_order_books_work_as_the_role_users_over_tls(
    brain: SecureRedisServer, passwords: dict[str, str], admin: aioredis.Redis
) -> None:
    """Issue 17 under the ACL: the consumer's ingest call keeps the book (book keys, wanted set), the forwarder
    moves the wanted symbols (its Brain user), and the reader reads the book (HOT and WARM) but cannot change it."""
    snap = BookSnapshot("BTCUSDT", TS, 10, (("2.00", "1"), ("1.00", "2")), (("3.00", "1"),), TS + 1)
    entries: list[list[str | int]] = [
        encode_depth(DepthDiff("BTCUSDT", TS, 3, 4, (("1.5", "1"),), (), TS)),  # before any book: asks for one
        encode_book(snap),
        encode_depth(DepthDiff("BTCUSDT", TS + 1, 11, 11, (("2.00", "0"), ("1.50", "5")), (), TS + 2)),
    ]
    forwarder_settings = tls_settings(brain, "forwarder", passwords)
    forwarder = make_client(forwarder_settings.brain_redis_url, forwarder_settings)
    consumer = BrainConsumer(tls_settings(brain, "consumer", passwords, symbols=("BTCUSDT",), consumer_name="c1"),
                             CollectorRegistry())  # fmt: skip
    task = asyncio.create_task(consumer.run())
    try:
        await forwarder.execute_command("XADD", STREAM, "1-1", *entries[0])  # type: ignore[no-untyped-call]
        await eventually(lambda: _is(admin.smembers(keys.BOOK_WANTED), {b"BTCUSDT"}), timeout=20, what="asked")
        vps = FakeVps()
        assert await relay_book_requests(forwarder, vps) == 1 and vps.requests == {b"BTCUSDT"}
        assert await admin.smembers(keys.BOOK_WANTED) == set()
        for i, fields in enumerate(entries[1:], start=2):
            await forwarder.execute_command("XADD", STREAM, f"1-{i}", *fields)  # type: ignore[no-untyped-call]
        await eventually(lambda: _is(admin.hget(keys.book_keys("BTCUSDT")[0], "last_update_id"), b"11"), timeout=20,
                         what="book at 11")  # fmt: skip
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)
        await forwarder.aclose()
    settings = tls_settings(brain, "reader", passwords, symbols=("BTCUSDT",))
    async with TieredMarketData(settings, registry=CollectorRegistry()) as md:
        for depth in (5, 50):  # HOT, then WARM
            book = await md.book("BTCUSDT", depth)
            assert book.valid and book.last_update_id == 11
            assert book.bids == (("1.50", "5"), ("1.00", "2")) and book.asks == (("3.00", "1"),)
        for command in (["HSET", keys.book_keys("BTCUSDT")[0], "valid", "1"], ["DEL", keys.book_keys("BTCUSDT")[1]],
                        ["SADD", keys.BOOK_WANTED, "BTCUSDT"]):  # fmt: skip
            with pytest.raises(redis.exceptions.NoPermissionError):
                await md.redis.execute_command(*command)


class FakeVps:
    """Stands in for the VPS Redis of the relay (its own ACL is checked in test_security_tls_acl)."""

    def __init__(self) -> None:
        self.requests: set[bytes] = set()

    async def sadd(self, key: str, *members: bytes) -> int:
        assert key == keys.BOOK_REQUESTS
        self.requests.update(members)
        return len(members)


async def _is(awaitable: Any, expected: object) -> bool:
    return bool(await awaitable == expected)
