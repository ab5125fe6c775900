"""Fuzz of the Brain consumer (issue 14): random entries straight onto the Brain stream of a real Redis.

Entries with 0 to 20,000 fields of random bytes, and valid ticks broken in every way a peer could break
them, are XADDed between good trades and order-book diffs while a consumer runs. Every good tick must land
exactly once, in order, in its per-symbol stream; every other entry must be dead-lettered (once); the group
must drain (lag 0, nothing pending) and no key outside the configured symbols' may appear.

Seeded (the seed is printed on failure): `make test` runs one seed, `make fuzz` (hypothesis profile "long")
runs ten.
"""

from __future__ import annotations

import random

import pytest
import redis.asyncio as aioredis
from hypothesis import settings as hypothesis_settings
from prometheus_client import CollectorRegistry

from conftest import ServiceRunner, eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.brain.loadgen import make_depth, make_trade
from tickbridge.core import keys
from tickbridge.core.redis_io import ensure_group, execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.wire import encode_tick
from tickbridge.devstack.servers import RedisServer

LONG = hypothesis_settings().max_examples > 1000
SEEDS = list(range(1, 11)) if LONG else [20261204]
pytestmark = pytest.mark.timeout(1800 if LONG else 90)

STREAM = keys.DEFAULT_STREAM_KEY
GROUP = keys.DEFAULT_CONSUMER_GROUP
SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")
TS = 1_763_900_000_000_000


def _bytes(rng: random.Random, lo: int, hi: int) -> bytes:
    return rng.randbytes(rng.randint(lo, hi))


def _invalid_bytes(rng: random.Random) -> bytes:
    """Random bytes with at least one byte >= 0x80: never a valid value of any contract field (all ASCII)."""
    raw = bytearray(_bytes(rng, 0, 24))
    raw.insert(rng.randint(0, len(raw)), rng.randint(0x80, 0xFF))
    return bytes(raw)


def _pairs(fields: list[bytes]) -> list[tuple[bytes, bytes]]:
    return list(zip(fields[::2], fields[1::2], strict=True))


def _flat(pairs: list[tuple[bytes, bytes]]) -> list[bytes]:
    return [x for pair in pairs for x in pair]


class Generator:
    """Good ticks (with the expected per-symbol order) and junk, from one seed."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.trade_ids = dict.fromkeys(SYMBOLS, 0)
        self.depth_id = 0

    def good_trade(self) -> tuple[str, list[bytes]]:
        sym = self.rng.choice(SYMBOLS)
        self.trade_ids[sym] += 1
        tid = self.trade_ids[sym]
        fields = [str(x).encode() for x in encode_tick(make_trade(sym, tid, TS + tid))]
        if self.rng.random() < 0.1:  # valid in another field order: written (in the contract's order)
            pairs = _pairs(fields)
            self.rng.shuffle(pairs)
            fields = _flat(pairs)
        return keys.trades_key(sym), fields

    def good_depth(self) -> tuple[str, list[bytes]]:
        self.depth_id += 10
        return keys.depth_key("ETHUSDT"), [
            str(x).encode() for x in encode_tick(make_depth("ETHUSDT", self.depth_id, TS))
        ]

    def _field_count(self) -> int:
        r = self.rng.random()
        if r < 0.6:
            return self.rng.randint(0, 24)
        if r < 0.85:
            return self.rng.randint(25, 4_000)
        return self.rng.randint(4_000, 20_000)

    def random_entry(self) -> list[bytes]:
        n = self._field_count()
        fields = [_bytes(self.rng, 0, 12) for _ in range(n + n % 2)]
        if self.rng.random() < 0.05 and fields:
            fields[-1] = _bytes(self.rng, 50_000, 200_000)  # one oversize value
        return fields or [b"", b""]  # XADD needs one pair: 0 fields is the empty name and value

    def broken_tick(self) -> list[bytes]:
        """A valid trade or diff broken in one way (so it can never be valid)."""
        base = self.good_trade()[1] if self.rng.random() < 0.8 else self.good_depth()[1]
        pairs = _pairs(base)
        how = self.rng.randrange(6)
        if how == 0:  # a value replaced by random bytes
            i = self.rng.randrange(len(pairs))
            pairs[i] = (pairs[i][0], _invalid_bytes(self.rng))
        elif how == 1:  # extra fields with random names (a few or thousands)
            k = self.rng.choice([1, 2, 50, 3_000, 9_000])
            pairs += [(_invalid_bytes(self.rng), _bytes(self.rng, 0, 8)) for _ in range(k)]
        elif how == 2:  # a field missing (a diff without recv_ts is valid: the contract has none)
            del pairs[self.rng.choice([i for i, (name, _) in enumerate(pairs) if name != b"recv_ts"])]
        elif how == 3:  # a field twice
            name, _ = self.rng.choice(pairs)
            pairs.append((name, _invalid_bytes(self.rng)))
        elif how == 4:  # a valid-looking symbol outside SYMBOLS
            i = next(i for i, (name, _) in enumerate(pairs) if name == b"symbol")
            pairs[i] = (b"symbol", b"Z%dUSDT" % self.rng.randrange(10_000))
        else:  # a field name with random bytes in place of a contract name
            i = self.rng.randrange(len(pairs))
            pairs[i] = (_invalid_bytes(self.rng), pairs[i][1])
        if self.rng.random() < 0.2:
            self.rng.shuffle(pairs)
        return _flat(pairs)


async def _append(client: aioredis.Redis, fields: list[bytes]) -> bytes:
    (reply,) = await execute_packed(client, [["XADD", STREAM, "*", *fields]])
    if isinstance(reply, BaseException):
        raise reply
    assert isinstance(reply, bytes)
    return reply


@pytest.mark.parametrize("seed", SEEDS)
async def test_fuzz_brain_consumer_writes_every_good_tick_once_and_never_stalls(
    seed: int, redis_server: RedisServer, services: ServiceRunner
) -> None:
    client = make_client(redis_server.url)
    try:
        await _run(seed, client, redis_server, services)
    except BaseException:
        print(f"fuzz seed {seed}")
        raise
    finally:
        await client.aclose()


async def _run(seed: int, client: aioredis.Redis, redis_server: RedisServer, services: ServiceRunner) -> None:
    await ensure_group(client, STREAM, GROUP)
    settings = Settings(
        brain_redis_url=redis_server.url, symbols=SYMBOLS, consumer_name="fuzz", consumer_batch=64,
        consumer_claim_idle_ms=1000, consumer_max_deliveries=2,
    )  # fmt: skip
    registry = CollectorRegistry()
    services.start(BrainConsumer(settings, registry, monitor_interval_s=0.2))

    gen = Generator(seed)
    expected: dict[str, list[bytes]] = {}
    junk: set[bytes] = set()
    for _ in range(2_000):
        r = gen.rng.random()
        if r < 0.6:
            key, fields = gen.good_trade() if r < 0.55 else gen.good_depth()
            expected.setdefault(key, []).append(await _append(client, fields))
        else:
            junk.add(await _append(client, gen.random_entry() if gen.rng.random() < 0.5 else gen.broken_tick()))

    async def drained() -> bool:
        info = (await client.xinfo_groups(STREAM))[0]
        return bool(info["pending"] == 0 and info["lag"] == 0)

    await eventually(drained, timeout=60, what="the group drained (lag 0, nothing pending)")
    for key, ids in expected.items():
        rows = await client.xrange(key)
        assert [fields[b"src_id"] for _, fields in rows] == ids, f"{key}: not every good tick exactly once, in order"
    letters = [fields[b"src_id"] for _, fields in await client.xrange(keys.CONSUMER_DEAD_LETTER)]
    assert len(letters) == len(set(letters)) and set(letters) == junk, "every other entry dead-lettered once"
    allowed = {STREAM, *expected, *(keys.warm_key(s) for s in SYMBOLS)}
    created = {k.decode(errors="replace") for k in await client.keys("market:*")}
    assert created <= allowed, created - allowed
    assert registry.get_sample_value("tickbridge_consumer_dead_letters_total") == len(junk)
