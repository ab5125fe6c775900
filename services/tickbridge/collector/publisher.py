"""Batches of ticks -> one MULTI/EXEC round trip on the VPS Redis.

Per batch: `XADD STREAM_KEY *` per tick, `ZADD` to the WARM key per trade, `HSET` of the last trade ID
per symbol (a restarted collector back-fills from there), dead letters (`XADD ... MAXLEN ~`), periodic
WARM trims, and a `SET` of the batch token. The token makes a retry after an ambiguous failure (the
connection dropped after EXEC was sent) exactly-once: if Redis already holds it, that EXEC ran.

EXEC runs every queued command even when one fails (e.g. WRONGTYPE: someone SET the stream key to a
string), and Redis has no rollback; the collector's ACL allows neither scripts nor WATCH to make the
transaction conditional. So "the EXEC ran" is not "the batch is in": the publisher checks every reply. A
batch is written only when every command in it succeeded; the failed ones are retried (only those: the
XADDs that succeeded must not be repeated), with backoff, counted in `redis_errors`. A command's outcome
is the same for every command on its key within one EXEC (a key's type cannot change inside it, and XADD
`*` fails only on the key's type or an exhausted ID space), so retrying the failed ones keeps their order.
If the stream's XADDs failed, the HSET of the last trade IDs in the same EXEC claimed ticks that are not
in the stream: it is put back at once, before anything else, and before each retry the keys are probed
(XLEN/ZCARD/HGET) so a broken key is not written to again until it is fixed.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, NamedTuple

import hiredis
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from tickbridge.collector.metrics import CollectorMetrics
from tickbridge.core import keys
from tickbridge.core.backoff import Backoff
from tickbridge.core.metrics import HopCounts
from tickbridge.core.rawlink import RawRedis, RawReplyError
from tickbridge.core.redis_io import TRANSIENT_ERRORS, Command, execute_packed
from tickbridge.core.tick import BookReset, BookSnapshot, DepthDiff, Trade
from tickbridge.core.wire import (
    TRADE_FIELDS,
    TRADE_TYPE,
    collector_dead_letter,
    encode_book,
    encode_depth,
    encode_reset,
    encode_trade,
    encode_warm_member,
    now_us,
)

log = logging.getLogger(__name__)

LAST_BATCH_KEY = keys.COLLECTOR_LAST_BATCH
DEAD_LETTER_MAXLEN = 10_000
TRIM_INTERVAL_S = 1.0
#: A link failure, or an error reply such as OOM or LOADING: retry the same batch, never drop it.
_RETRY_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError)
#: An error reply in place: redis-py's (probes, restores) or the lean connection's (the batches).
_REPLY_ERRORS = (ResponseError, RawReplyError)


class Packed(NamedTuple):
    """A command already in RESP (`data`), with its name and key (`cmd[0]`, `cmd[1]`) for the retry logic."""

    name: str
    key: str
    data: bytes


def pack_batch(commands: list[Command]) -> bytes:
    """RESP of a batch whose commands are tuples (packed by hiredis) or `Packed` (as they are)."""
    return b"".join([c.data if type(c) is Packed else hiredis.pack_command(tuple(c)) for c in commands])  # type: ignore[arg-type]


async def execute_batch(client: aioredis.Redis, commands: list[Command], timeout: float = 10.0) -> list[Any]:
    """`execute_packed` with one deadline for the whole batch (a transaction of thousands of commands)."""
    return await execute_packed(client, pack_batch(commands), len(commands), deadline=timeout)


def _bulk(text: str) -> str:
    return f"${len(text.encode())}\r\n{text}\r\n"


class TradePacker:
    """The RESP of a trade's `XADD <stream> * <fields>` and of its WARM `ZADD` pair, by one string format each.

    `hiredis.pack_command` of `encode_trade`'s list cost ~4.6 µs per trade, the largest single item of the
    collector's CPU at 10,000/s (py-spy, issue 20); this costs ~2. Every value is ASCII (`Trade` validates
    symbol, decimals, side and exchange; the rest are ints), so a string's length is its byte count. `ok` is
    False when the format does not reproduce `hiredis.pack_command(encode_trade(...))` for a sample trade
    (the contract's field order changed): the publisher then packs every trade the generic way.
    """

    def __init__(self, stream: str) -> None:
        head = f"*{3 + 2 * len(TRADE_FIELDS)}\r\n{_bulk('XADD')}{_bulk(stream)}{_bulk('*')}"
        parts = [_bulk(name) + (_bulk(TRADE_TYPE) if name == "type" else "$%d\r\n%s\r\n") for name in TRADE_FIELDS]
        self._xadd = head + "".join(parts)
        self.stream = stream
        sample = Trade("BTCUSDT", "61837.63", "0.02", "SELL", 1723161255342000, 3735683259, 1723161255343123)
        data, pair = self.xadd(sample)
        xadd: Any = ("XADD", stream, "*", *encode_trade(sample))
        zadd: Any = ("ZADD", "k", sample.timestamp, encode_warm_member(sample))
        self.ok = data == hiredis.pack_command(xadd) and pack_zadd("k", [pair]).data == hiredis.pack_command(zadd)

    def xadd(self, t: Trade) -> tuple[bytes, str]:
        """The XADD's RESP, and the WARM pair `score member` as RESP bulk strings (a part of a ZADD)."""
        sym, ex, price, vol, side = t.symbol, t.exchange, t.price, t.volume, t.side
        ts, tid, rts = str(t.timestamp), str(t.trade_id), str(t.recv_ts)
        data = self._xadd % (
            len(sym), sym, len(ex), ex, len(price), price, len(vol), vol, len(side), side,
            len(ts), ts, len(tid), tid, len(rts), rts,
        )  # fmt: skip
        member = f"{tid}|{price}|{vol}|{side}|{rts}"  # = encode_warm_member(t) (test_collector_service)
        return data.encode(), f"${len(ts)}\r\n{ts}\r\n${len(member)}\r\n{member}\r\n"


def _pair(score: int, member: str) -> str:
    text = str(score)
    return f"${len(text)}\r\n{text}\r\n{_bulk(member)}"


def pack_zadd(key: str, pairs: list[str]) -> Packed:
    """A `ZADD key score member ...` of pairs from `TradePacker.xadd`."""
    return Packed("ZADD", key, (f"*{2 + 2 * len(pairs)}\r\n$4\r\nZADD\r\n{_bulk(key)}" + "".join(pairs)).encode())


@dataclass(frozen=True, slots=True)
class FrameDeadLetter:
    reason: str
    detail: str
    raw: bytes
    recv_ts: int


Item = Trade | DepthDiff | BookSnapshot | BookReset | FrameDeadLetter


class StreamPublisher:
    """Owns the bounded batch queue and the Redis write loop."""

    def __init__(
        self,
        client: aioredis.Redis,
        stream_key: str,
        metrics: CollectorMetrics,
        *,
        warm_window_s: float = 300.0,
        max_batches: int = 64,
        max_batch_items: int = 5000,
        linger_s: float = 0.0,
        last_ids: dict[str, int] | None = None,
        exchange: str = keys.EXCHANGE,
        raw: RawRedis | None = None,
    ) -> None:
        self.client = client
        #: The batches go through this lean connection when given (`core.rawlink`: replies parsed in one C
        #: loop: ~33 instead of ~85 core-µs for a transaction of 13 trades, 0.5 instead of 1.8 ms for 1,000);
        #: the rare reads of the retry logic through `client`.
        self.raw = raw
        #: Each exchange's collector keeps its own WARM keys, last trade IDs and batch token (issue 18).
        self.exchange = exchange
        self.last_ids_key = keys.for_exchange(keys.COLLECTOR_LAST_TRADE_IDS, exchange)
        self.last_batch_key = keys.for_exchange(LAST_BATCH_KEY, exchange)
        self.stream_key = stream_key
        self.metrics = metrics
        self.warm_window_us = int(warm_window_s * 1_000_000)
        self.max_batch_items = max_batch_items
        self.linger_s = linger_s
        self.queue: asyncio.Queue[list[Item] | None] = asyncio.Queue(maxsize=max_batches)
        self._token_prefix = uuid.uuid4().hex[:12]
        self._seq = 0
        self._latest_ts: dict[str, int] = {}
        self._last_trim: dict[str, float] = {}
        #: The last trade ID per symbol that the hash holds after the last batch that was fully written.
        self._stored: dict[str, int] = dict(last_ids or {})
        self.written = 0  # ticks appended (tests, bench)
        #: Hop collector -> VPS stream per symbol (only configured symbols reach the publisher: bounded).
        self._latency: dict[str, HopCounts] = {}
        packer = TradePacker(stream_key)
        if not packer.ok:  # pragma: no cover - a changed trade layout (test_collector_service checks `ok`)
            log.warning("trade entries packed the generic way: the fast format does not match encode_trade")
        self._packer: TradePacker | None = packer if packer.ok else None
        #: One for the publisher, reset per batch: a new one per batch seeded a `random.Random` from the OS each
        #: time (~5 % of the publisher's CPU at 1,200/s, py-spy).
        self._backoff = Backoff(base=0.05, cap=2.0)
        #: Waiting for a batch (nothing in flight): the processor hands a long burst over in parts only then.
        self.waiting = False

    async def put(self, batch: list[Item]) -> None:
        """Enqueue a batch; waits when the queue is full (the caller stops reading: TCP backpressure)."""
        if self.queue.full():
            self.metrics.queue_full.labels("writer").inc()
        await self.queue.put(batch)

    async def close_input(self) -> None:
        await self.queue.put(None)

    async def run(self) -> None:
        """Write batches until the `None` sentinel; never drops a batch (retries with backoff)."""
        done = False
        while not done:
            self.waiting = True
            first = await self.queue.get()
            self.waiting = False
            if first is None:
                break
            items = list(first)
            if len(items) < self.max_batch_items and self.queue.empty() and self.linger_s:
                await asyncio.sleep(self.linger_s)  # off by default: the batch is what came in during the last write
            while len(items) < self.max_batch_items and not self.queue.empty():
                more = self.queue.get_nowait()
                if more is None:
                    done = True
                    break
                items.extend(more)
            if items:
                await self._write(items)
        await self._final_trim()

    async def _final_trim(self) -> None:
        """Trim every WARM key once more on shutdown (periodic trims may lag a fast replay)."""
        cmds: list[Command] = [
            ("ZREMRANGEBYSCORE", keys.warm_key(symbol, self.exchange), "-inf", f"({ts - self.warm_window_us}")
            for symbol, ts in self._latest_ts.items()
        ]
        try:
            await execute_packed(self.client, cmds)
        except _RETRY_ERRORS as exc:
            log.warning("final WARM trim failed: %s", exc)

    def _commands(self, items: list[Item]) -> tuple[list[Command], dict[str, int]]:
        """The batch's data commands (without MULTI, the HSET of `last_ids` and the token) and `last_ids`."""
        stream = self.stream_key
        cmds: list[Command] = []
        last_ids: dict[str, int] = {}
        warm: dict[str, list[str]] = {}  # one ZADD per symbol and batch: its `score member` pairs as RESP
        latest = self._latest_ts
        packer = self._packer
        for item in items:
            if isinstance(item, Trade):
                symbol = item.symbol
                if packer is not None:
                    data, pair = packer.xadd(item)
                    cmds.append(Packed("XADD", stream, data))
                else:
                    cmds.append(("XADD", stream, "*", *encode_trade(item)))
                    pair = _pair(item.timestamp, encode_warm_member(item))
                pairs = warm.get(symbol)
                if pairs is None:
                    pairs = warm[symbol] = []
                pairs.append(pair)
                last_ids[symbol] = item.trade_id
                if item.timestamp > latest.get(symbol, 0):
                    latest[symbol] = item.timestamp
            elif isinstance(item, DepthDiff):
                cmds.append(("XADD", stream, "*", *encode_depth(item)))
            elif isinstance(item, BookSnapshot):
                cmds.append(("XADD", stream, "*", *encode_book(item)))
            elif isinstance(item, BookReset):
                cmds.append(("XADD", stream, "*", *encode_reset(item)))
            else:
                cmds.append(
                    ("XADD", keys.COLLECTOR_DEAD_LETTER, "MAXLEN", "~", DEAD_LETTER_MAXLEN, "*",
                     *collector_dead_letter(item.reason, item.detail, item.raw, item.recv_ts))
                )  # fmt: skip
        cmds.extend(pack_zadd(keys.warm_key(symbol, self.exchange), pairs) for symbol, pairs in warm.items())
        now = time.monotonic()
        for symbol in last_ids:
            if now - self._last_trim.get(symbol, 0.0) >= TRIM_INTERVAL_S:
                self._last_trim[symbol] = now
                cutoff = latest[symbol] - self.warm_window_us
                cmds.append(("ZREMRANGEBYSCORE", keys.warm_key(symbol, self.exchange), "-inf", f"({cutoff}"))
        return cmds, last_ids

    async def _write(self, items: list[Item]) -> None:
        """Write one batch; returns once every command of it succeeded (never drops, never repeats one)."""
        self._seq += 1
        data, last_ids = self._commands(items)
        st = _Batch(data, [("HSET", self.last_ids_key, *_flat(last_ids))] if last_ids else [])
        backoff = self._backoff
        backoff.reset()
        confirmed_us = 0  # when the batch was confirmed in the stream (set as the loop ends)
        failures = 0
        while True:
            try:
                if st.restore:
                    await self._restore_last_ids(last_ids, items)
                    st.restore = False
                if st.ambiguous and await self._settle_lost_reply(st):
                    confirmed_us = now_us()
                    break
                if st.suspect and (broken := await self._probe([*st.pending, *st.commit])):
                    raise _FailedInside(f"keys {sorted(broken)} still of the wrong type")
                if await self._send(st):
                    confirmed_us = now_us()
                    break
            except _FailedInside as exc:
                st.suspect = True
                failures += 1
                self.metrics.redis_errors.inc()
                if failures == 1:
                    log.error("stream write: %s; the batch (%d items) is not written, retrying until fixed", exc,
                              len(items))  # fmt: skip
                if not st.restore:  # a restore goes first, at once: until then a restart would skip ticks
                    await asyncio.sleep(backoff.next())
            except _RETRY_ERRORS as exc:
                self.metrics.redis_errors.inc()
                delay = backoff.next()
                log.warning("stream write failed (%s), retrying the batch in %.2fs", exc, delay)
                await asyncio.sleep(delay)
        if failures:
            log.info("stream write: the batch is in after %d failed attempts", failures)
        self._stored.update(last_ids)
        n = 0
        latency = self._latency
        for item in items:
            if not isinstance(item, FrameDeadLetter):
                n += 1
                child = latency.get(item.symbol)
                if child is None:
                    child = latency[item.symbol] = self.metrics.vps_stream_latency.child(item.symbol)
                child.observe_us(confirmed_us - item.recv_ts)
        self.written += n
        self.metrics.batch_size.observe(n)

    async def _send(self, st: _Batch) -> bool:
        """One MULTI/EXEC of what is pending; True when every command in it succeeded."""
        st.attempt += 1
        st.token = f"{self._token_prefix}:{self._seq}:{st.attempt}"  # per attempt: "it ran" means this one
        st.ambiguous = True  # until its reply is read
        cmds: list[Command] = [("MULTI",), *st.pending, *st.commit, ("SET", self.last_batch_key, st.token), ("EXEC",)]
        if self.raw is not None:
            replies = await self.raw.execute_packed(pack_batch(cmds), len(cmds))
        else:
            replies = await execute_batch(self.client, cmds)
        st.ambiguous = False
        result = replies[-1]
        if isinstance(result, _REPLY_ERRORS):
            raise ResponseError(str(result))  # EXECABORT: nothing ran
        failed = [i for i, reply in enumerate(result) if isinstance(reply, _REPLY_ERRORS)]
        if not failed:
            return True
        n = len(st.pending)
        # The HSET succeeded although the stream's XADDs failed: the stored IDs claim ticks that are not in it.
        stream_failed = any(st.pending[i][1] == self.stream_key for i in failed if i < n)
        st.restore = stream_failed and bool(st.commit) and not isinstance(result[n], _REPLY_ERRORS)
        first = result[failed[0]]
        st.pending = [st.pending[i] for i in failed if i < n]  # the others are in: never send them again
        raise _FailedInside(f"{len(failed)} of {len(result)} commands failed inside MULTI/EXEC: {first}")

    async def _settle_lost_reply(self, st: _Batch) -> bool:
        """After an EXEC whose reply was lost: True when it ran and every command in it succeeded."""
        ran = await self.client.get(self.last_batch_key) == st.token.encode()
        st.ambiguous = False
        if not ran:
            return False  # send it again
        # It ran, but which of its commands failed is unknown: a key of the wrong type now was so in that EXEC
        # (one fixed in the moment since would be taken as written: that needs a lost reply and an operator's
        # fix within milliseconds of each other).
        broken = await self._probe([*st.pending, *st.commit])
        if not broken:
            return True
        st.restore = bool(st.commit) and self.stream_key in broken and self.last_ids_key not in broken
        st.pending = [c for c in st.pending if c[1] in broken]
        raise _FailedInside(f"keys {sorted(broken)} failed in an EXEC whose reply was lost")

    async def _probe(self, cmds: list[Command]) -> set[str]:
        """The keys of `cmds` that are of the wrong type now (a read that fails just as the write would)."""
        kinds: dict[str, str] = {}
        for cmd in cmds:
            kinds.setdefault(str(cmd[1]), str(cmd[0]))
        probes: list[Command] = []
        for key, kind in kinds.items():
            if kind == "XADD":
                probes.append(("XLEN", key))
            elif kind == "HSET":
                probes.append(("HGET", key, "-"))
            else:  # ZADD, ZREMRANGEBYSCORE
                probes.append(("ZCARD", key))
        replies = await execute_batch(self.client, probes)
        return {key for key, reply in zip(kinds, replies, strict=True) if isinstance(reply, ResponseError)}

    async def _restore_last_ids(self, last_ids: dict[str, int], items: list[Item]) -> None:
        """Put back the last trade IDs an EXEC advanced although its XADDs failed: what the hash held before,
        or, for a symbol it did not hold, the ID before the batch's first trade (a restart back-fills it)."""
        first: dict[str, int] = {}
        for item in items:
            if isinstance(item, Trade) and item.symbol not in first:
                first[item.symbol] = item.trade_id
        restored = {s: self._stored.get(s, first[s] - 1) for s in last_ids}
        reply = (await execute_batch(self.client, [("HSET", self.last_ids_key, *_flat(restored))]))[0]
        if isinstance(reply, ResponseError):  # the hash was replaced meanwhile: nothing of ours left in it
            log.error("stream write: could not restore the last trade IDs: %s", reply)


@dataclass(slots=True)
class _Batch:
    """The retry state of one batch."""

    pending: list[Command]  # data commands not yet known to be applied
    commit: list[Command]  # the HSET of the last trade IDs: in every attempt, with the XADDs it vouches for
    attempt: int = 0
    token: str = ""
    ambiguous: bool = False  # an EXEC was sent and its reply lost: did it run?
    suspect: bool = False  # a command failed inside an EXEC: probe the keys before sending again
    restore: bool = False  # the stored last IDs claim ticks that are not in the stream: put them back first


class _FailedInside(Exception):
    """A command failed inside an EXEC that ran (or a key the batch writes to is of the wrong type)."""


def _flat(ids: dict[str, int]) -> list[str | int]:
    flat: list[str | int] = []
    for symbol, trade_id in ids.items():
        flat += [symbol, trade_id]
    return flat
