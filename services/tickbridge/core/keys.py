"""Every Redis key, stream and group name in one place (public names fixed by the contract)."""

from __future__ import annotations

EXCHANGE = "binance_spot"
#: Every `exchange` value the pipeline carries (issue 18). Each names Redis keys (`market:<exchange>:…`) and
#: QuestDB rows; the collector's adapters live in `collector/venues/`.
EXCHANGES = (EXCHANGE, "coinbase", "kraken")

#: Default stream on both hosts (override with STREAM_KEY).
DEFAULT_STREAM_KEY = "market:vps:stream"
#: Default Brain consumer group (override with CONSUMER_GROUP).
DEFAULT_CONSUMER_GROUP = "brain-consumer-group"

#: Malformed or unexpected exchange messages, with their raw payload (VPS).
COLLECTOR_DEAD_LETTER = "tickbridge:deadletter:collector"
#: Last trade ID appended per symbol (VPS hash): trade-gap detection across restarts.
COLLECTOR_LAST_TRADE_IDS = "tickbridge:collector:last_trade_id"
#: Token of the last batch the collector applied (a retried MULTI/EXEC is recognised, never doubled).
COLLECTOR_LAST_BATCH = "tickbridge:collector:last_batch"
#: Forwarder state on the VPS (hash): what the Brain confirmed, what went to the disk buffer.
FORWARDER_STATE = "tickbridge:forwarder:state"
#: Ledger of the spills still owed by the QuestDB buffer (VPS hash: first ID -> last ID, count, ts range),
#: checked on replay: what did not come back is reported missing with its range.
FORWARDER_LEDGER = "tickbridge:forwarder:ledger"
#: Buffer rows the replay could not use (corrupt payload, foreign ID), capped copies by entry ID (VPS hash).
FORWARDER_QUARANTINE = "tickbridge:forwarder:quarantine"
#: Entries that failed too often in the Brain consumer.
CONSUMER_DEAD_LETTER = "tickbridge:deadletter:consumer"
#: Writer consumer group on the Brain's per-symbol streams.
WRITER_GROUP = "tickbridge-writer"
#: Heartbeat keys (TTL) per role instance, read by `tickbridge check`.
HEARTBEAT_PREFIX = "tickbridge:heartbeat:"


def for_exchange(name: str, exchange: str = EXCHANGE) -> str:
    """A per-process key of `exchange`'s own pipeline (one collector, forwarder and consumer per exchange): the
    contract's name for Binance, so a single-exchange deployment is unchanged; `<name>:<exchange>` otherwise
    (`market:vps:stream:coinbase`, `tickbridge:forwarder:state:kraken`)."""
    return name if exchange == EXCHANGE else f"{name}:{exchange}"


def stream_key_for(exchange: str = EXCHANGE) -> str:
    """The VPS/Brain stream of one exchange: `market:vps:stream` (Binance, the contract's), else
    `market:vps:stream:<exchange>`."""
    return for_exchange(DEFAULT_STREAM_KEY, exchange)


def warm_key(symbol: str, exchange: str = EXCHANGE) -> str:
    """WARM cache sorted set: ticks of the last 5 minutes scored by exchange time (µs)."""
    return f"market:{exchange}:warm:{symbol}"


def trades_key(symbol: str, exchange: str = EXCHANGE) -> str:
    """Brain per-symbol trade stream, consumed by the writer."""
    return f"market:{exchange}:trades:{symbol}"


def depth_key(symbol: str, exchange: str = EXCHANGE) -> str:
    """Brain per-symbol order-book diff stream, consumed by the writer."""
    return f"market:{exchange}:depth:{symbol}"


def heartbeat_key(role: str, instance: str) -> str:
    return f"{HEARTBEAT_PREFIX}{role}:{instance}"


#: Writer dead letters: per-symbol entries that could not become a QuestDB row (Brain).
WRITER_DEAD_LETTER = "tickbridge:deadletter:writer"
#: SCAN patterns of the Brain's per-symbol streams (the writer discovers symbols outside SYMBOLS with them).
SYMBOL_STREAM_PATTERNS = ("market:*:trades:*", "market:*:depth:*")

#: Brain QuestDB tables (`trades` is the contract's).
TRADES_TABLE = "trades"
DEPTH_TABLE = "depth_updates"
#: Whole books (issue 17): the collector's BOOK entries, beside `depth_updates` (a past book = the newest
#: snapshot at or before t + the diffs after it).
BOOK_TABLE = "book_snapshots"
#: VPS QuestDB spill buffer (contract name; FORWARDER_BUFFER_TABLE overrides it for tests sharing a QuestDB).
VPS_BUFFER_TABLE = "vps_buffer"


def buffer_table_for(exchange: str = EXCHANGE) -> str:
    """The VPS spill buffer table of one exchange's forwarder: `vps_buffer` (Binance), else `vps_buffer_<exchange>`."""
    return VPS_BUFFER_TABLE if exchange == EXCHANGE else f"{VPS_BUFFER_TABLE}_{exchange}"


def symbol_stream_kind(stream: str) -> str:
    """`trades` or `depth` of a per-symbol stream name (`market:<exchange>:<kind>:<SYMBOL>`)."""
    parts = stream.split(":")
    return parts[2] if len(parts) == 4 else ""


def book_keys(symbol: str, exchange: str = EXCHANGE) -> tuple[str, str, str, str]:
    """The Brain's live order book of a symbol (issue 17): state hash (`last_update_id`, `timestamp`, `recv_ts`,
    `valid`, `reason`), bid and ask sorted sets (member = price string, score = price) and the quantities (hash,
    `b<price>` / `a<price>` -> quantity string)."""
    base = f"market:{exchange}:book:{symbol}"
    return base, f"{base}:bids", f"{base}:asks", f"{base}:qty"


#: Symbols whose Brain book waits for a snapshot (Brain set, written by the ingest function on a break; the
#: forwarder moves them to `BOOK_REQUESTS` on the VPS).
BOOK_WANTED = "tickbridge:book:wanted"
#: Symbols the collector appends a whole-book entry for (VPS set, polled by the collector).
BOOK_REQUESTS = "tickbridge:book:requests"

#: Brain hash of the catch-up state (issue 16): the forwarder's VPS backlog and live lane, the consumer's lag
#: and ordered frontier. Read by `TieredMarketData.catch_up()` and `tickbridge status`. One per exchange
#: (`catchup_key`): each exchange's forwarder and consumer catch up on their own.
CATCHUP = "tickbridge:catchup"


def catchup_key(exchange: str = EXCHANGE) -> str:
    """The catch-up hash of one exchange's pipeline: `tickbridge:catchup` (Binance, the contract's), else
    `tickbridge:catchup:<exchange>`."""
    return for_exchange(CATCHUP, exchange)


def live_stream_key(stream_key: str = DEFAULT_STREAM_KEY) -> str:
    """Brain stream of the fast-forward live lane (issue 16): the newest VPS entries, original IDs, capped.

    A disposable view beside the ordered stream: never consumed by a group, never checkpointed."""
    return f"{stream_key}:live"
