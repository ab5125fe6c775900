"""The writer's state: metrics, the per-table batches and the fields every layer shares.

The writer is one service; its work is layered, each layer a class in a file of its own that uses only the
layers below it: this base (state, metrics, `TableBatch`), `writer_streams` (stream discovery, skipped keys,
group setup, the group positions), `writer_rows` (stream entries -> ILP rows), `writer_flushing` (the ILP
sender, a table in one transaction each, then the group moved past the batch with dead letters in one
MULTI), `writer_monitor` (backlog and suspended-table gauges, heartbeat, trimming), and `writer`
(`BrainWriter`: the write loop, reading).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from prometheus_client import REGISTRY, CollectorRegistry
from questdb.ingress import Buffer, IngressError, Sender
from redis.exceptions import ResponseError

from tickbridge.brain.common import instance_name
from tickbridge.core import keys
from tickbridge.core.groups import Cursor
from tickbridge.core.lifecycle import Service, Watchdog
from tickbridge.core.metrics import HopCounts, HopLatency, counter, gauge, histogram
from tickbridge.core.questdb_io import QuestDBError, QuestDBHttp
from tickbridge.core.redis_io import TRANSIENT_ERRORS
from tickbridge.core.settings import Settings

log = logging.getLogger("tickbridge.brain.writer")

#: Redis or QuestDB unavailable: keep the batch and retry.
OUTAGE_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, QuestDBError, IngressError)
#: What a monitor round may meet: logged, the next round tries again.
MONITOR_ERRORS: tuple[type[BaseException], ...] = (*TRANSIENT_ERRORS, ResponseError, QuestDBError)


class WriterMetrics:
    """Prometheus metrics of the writer."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.rows = counter("writer_rows_total", "Rows confirmed by QuestDB, by table", ("table",), registry=registry)
        self.batch_rows = histogram(
            "writer_batch_rows",
            "Rows per flushed batch",
            buckets=(1, 10, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000),
            registry=registry,
        )
        self.latency = histogram("writer_write_seconds", "ILP flush latency by table", ("table",), registry=registry)
        self.errors = counter("writer_errors_total", "Errors by kind", ("kind",), registry=registry)
        # Exported at 0 so dashboards show "none yet".
        for kind in ("redis_response", "questdb_flush", "wrong_type", "suspended"):
            self.errors.labels(kind)
        self.backlog = gauge(
            "writer_backlog_entries", "Entries in per-symbol streams not yet in QuestDB", registry=registry
        )
        self.buffered = gauge("writer_buffered_rows", "Rows held in memory awaiting a flush", registry=registry)
        self.skipped_keys = gauge(
            "writer_skipped_keys", "Per-symbol keys left out because they are not streams", registry=registry
        )
        self.suspended = gauge("writer_suspended_tables", "QuestDB WAL tables that are suspended", registry=registry)
        self.last_flush = gauge(
            "writer_last_flush_timestamp_seconds", "Unix time of the last confirmed flush", registry=registry
        )
        self.dead_letters = counter(
            "writer_dead_letters_total", "Entries that could not become rows", registry=registry
        )
        self.questdb_latency = HopLatency(
            "writer_questdb_latency_seconds",
            "Hop collector -> QuestDB: QuestDB confirmed the ILP transaction (not yet applied: WAL) minus the "
            "collector's recv_ts, per row (clocks of the Brain and the VPS, NTP assumed; negatives count as 0)",
            registry=registry,
        )


@dataclass
class TableBatch:
    """Rows of one table and the streams they came from (`recv`: their recv_ts per stream, for the hop latency)."""

    table: str
    buffer: Buffer
    rows: int = 0
    recv: dict[bytes, list[int]] = field(default_factory=dict)

    def clear(self) -> None:
        self.buffer.clear()
        self.rows = 0
        self.recv = {}


class WriterBase(Service):
    """State of the writer (see `BrainWriter`)."""

    name = "writer"

    def __init__(
        self,
        settings: Settings,
        registry: CollectorRegistry = REGISTRY,
        *,
        retry_timeout_ms: int = 5_000,
        monitor_interval_s: float = 2.0,
        discover_interval_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.settings = settings
        self._symbols = frozenset(settings.symbols)
        self._latency: dict[bytes, HopCounts | None] = {}
        self.metrics = WriterMetrics(registry)
        self.consumer = instance_name(settings, "writer")
        self.group = keys.WRITER_GROUP
        self.retry_timeout_ms = retry_timeout_ms
        self.monitor_interval_s = monitor_interval_s
        self.discover_interval_s = discover_interval_s
        self.streams: list[str] = []
        for sym in settings.symbols:
            self.streams += [keys.trades_key(sym), keys.depth_key(sym)]
        self.client: aioredis.Redis | None = None
        self.qdb = QuestDBHttp(settings.brain_questdb_url, settings)
        self.sender: Sender | None = None
        self.batches: dict[str, TableBatch] = {}
        self.watchdog = Watchdog(default_limit=300.0)
        self.written = 0
        #: WAL tables QuestDB reported suspended at the last check: nothing is flushed to them meanwhile.
        self.suspended_tables: set[str] = set()
        #: Tables whose rows were set aside because they were suspended: their streams are not read (the
        #: entries wait in Redis, after the group's position) until the table applies again, while the other
        #: table keeps flowing. A suspended `depth_updates` must not hold the trades back.
        self.held: set[str] = set()
        #: Streams with rows set aside (-> their tables): their group stays where it is until those tables
        #: apply again, and they are not read meanwhile.
        self._frozen: dict[bytes, set[str]] = {}
        #: Per stream: how far this writer has read (the group itself moves only after QuestDB confirmed).
        self.cursors: dict[bytes, Cursor] = {}
        #: Streams read since the last batch was handed over for flushing.
        self._advanced: set[bytes] = set()
        self._last_count_read = 0.0
        self._first_row_at: float | None = None
        self._need_recover = True
        self._last_discover = 0.0
        self._grouped: set[str] = set()
        #: Per-symbol keys that hold something other than a stream: left out of every read (one bad key
        #: must not stop the other symbols) and looked at again at each discovery.
        self._skipped: dict[str, None] = {}
        self._pending_dead: list[tuple[bytes, bytes, str]] = []
        self._flushing: asyncio.Task[None] | None = None
        #: The last read returned less than it asked for from every stream: nothing more is waiting.
        self._last_short = True
        self._last_flush_at = 0.0  # monotonic time the last flush started
        #: Rows per second handed to QuestDB, from the last batch and the time since the one before (sets the
        #: flush interval; 0 until the second batch: a light flow).
        self.flow_rows_per_s = 0.0
        self._texts: dict[bytes, str] = {}

    def _rows(self) -> int:
        return sum(b.rows for b in self.batches.values())
