"""Row building: per-symbol stream entries -> ILP rows in the per-table batches (a malformed entry is set aside
as a dead letter, acked with its record at the next flush).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import orjson
from questdb.ingress import IngressError

from tickbridge.brain.writer_base import TableBatch
from tickbridge.brain.writer_streams import WriterStreams
from tickbridge.core import keys
from tickbridge.core.wire import ilp_book, ilp_depth, ilp_trade, symbol_trade

log = logging.getLogger("tickbridge.brain.writer")

_EMPTY_LEVELS = np.empty((0, 2), dtype=np.float64)


class WriterRows(WriterStreams):
    """Turns stream entries into rows of the `trades` and `depth_updates` batches."""

    def _add(self, got: dict[bytes, list[Any]]) -> int:
        """Turn stream entries into ILP rows in the per-table buffers."""
        n = 0
        trades = self.batches[keys.TRADES_TABLE]
        text = self._text
        texts = self._texts
        dead: list[tuple[bytes, bytes, str]] = []
        cursors = self.cursors
        for stream, entries in got.items():
            if not entries:
                continue
            cursor = cursors[stream]
            cursor.position = entries[-1][0]
            if cursor.entries_read is not None:
                cursor.entries_read += len(entries)
            self._advanced.add(stream)
            for entry_id, fields in entries:
                if fields is None:
                    continue
                st = symbol_trade(fields)
                try:
                    if st is not None:  # the consumer's layout: no dict (the common case)
                        symbol, exchange, _, price, volume, side, timestamp, trade_id, recv = st
                        recv_ts = int(recv)
                        ilp_trade(
                            trades.buffer, texts.get(exchange) or text(exchange), texts.get(symbol) or text(symbol),
                            texts.get(side) or text(side), float(price), float(volume), int(trade_id), recv_ts,
                            int(timestamp),
                        )  # fmt: skip
                        batch = trades
                    else:
                        recv_ts, batch = self._add_by_name(dict(zip(fields[::2], fields[1::2], strict=False)))
                except (KeyError, ValueError, TypeError, IngressError, orjson.JSONDecodeError) as exc:
                    dead.append((stream, entry_id, f"{type(exc).__name__}: {exc}"[:300]))
                    continue
                batch.rows += 1
                batch.recv.setdefault(stream, []).append(recv_ts)
                n += 1
        if dead:
            # Appended in the MULTI that moves the group past them, so a crash cannot lose or repeat them.
            self._pending_dead.extend(dead)
        if n and self._first_row_at is None:
            self._first_row_at = time.monotonic()
        self.metrics.buffered.set(self._rows())
        return n

    def _add_by_name(self, f: dict[bytes, bytes]) -> tuple[int, TableBatch]:
        """A per-symbol entry in another field order (or a depth diff) into its table's buffer: its `recv_ts`
        and batch. Raises what a malformed entry raises (KeyError, ValueError, ...): it is dead-lettered."""
        kind = f[b"type"]
        if kind == b"TRADE":
            recv_ts = int(f[b"recv_ts"])
            batch = self.batches[keys.TRADES_TABLE]
            ilp_trade(
                batch.buffer, exchange=f[b"exchange"].decode(), symbol=f[b"symbol"].decode(), side=f[b"side"].decode(),
                price=float(f[b"price"]), volume=float(f[b"volume"]), trade_id=int(f[b"trade_id"]), recv_ts=recv_ts,
                timestamp=int(f[b"timestamp"]),
            )  # fmt: skip
        elif kind == b"DEPTH":
            recv_ts = int(f.get(b"recv_ts") or f[b"timestamp"])
            batch = self.batches[keys.DEPTH_TABLE]
            ilp_depth(
                batch.buffer, exchange=f[b"exchange"].decode(), symbol=f[b"symbol"].decode(),
                first_update_id=int(f[b"first_update_id"]), last_update_id=int(f[b"last_update_id"]),
                bids=_levels(f[b"bids"]), asks=_levels(f[b"asks"]), recv_ts=recv_ts, timestamp=int(f[b"timestamp"]),
            )  # fmt: skip
        elif kind in (b"BOOK", b"RESYNC"):  # a whole book or a book reset, between the diffs (issue 17)
            recv_ts = int(f[b"recv_ts"])
            batch = self.batches[keys.BOOK_TABLE]
            whole = kind == b"BOOK"
            bids, asks = (_levels(f[b"bids"]), _levels(f[b"asks"])) if whole else (_EMPTY_LEVELS, _EMPTY_LEVELS)
            ilp_book(
                batch.buffer, exchange=f[b"exchange"].decode(), symbol=f[b"symbol"].decode(),
                last_update_id=int(f[b"last_update_id"]), valid=whole, bids=bids, asks=asks,
                recv_ts=recv_ts, timestamp=int(f[b"timestamp"]),
            )  # fmt: skip
        else:
            raise ValueError(f"unknown type {kind[:20]!r}")
        return recv_ts, batch

    def _text(self, raw: bytes) -> str:
        """Decode a symbol-like value once (few distinct values)."""
        value = self._texts.get(raw)
        if value is None:
            value = raw.decode()
            if len(self._texts) < 10_000:
                self._texts[raw] = value
        return value


def table_of(stream: str) -> str:
    """The QuestDB table a per-symbol stream goes to (`market:<exchange>:depth:<SYMBOL>` or trades)."""
    return keys.DEPTH_TABLE if keys.symbol_stream_kind(stream) == "depth" else keys.TRADES_TABLE


def _levels(raw: bytes) -> Any:
    levels = orjson.loads(raw)
    if not levels:
        return _EMPTY_LEVELS
    return np.array(levels, dtype=np.float64)
