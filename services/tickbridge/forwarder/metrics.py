"""Prometheus metrics of the forwarder (`tickbridge_forwarder_*`)."""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry

from tickbridge.core.metrics import HopLatency, counter, gauge, histogram

MODES: tuple[str, ...] = ("direct", "ram_backlog", "disk_spill", "replay")
#: Why the forwarder refuses the Brain stream: its top is in the future, or is an entry the VPS never held
#: (or holds with other fields), or the Brain lost entries its consumer group had not received yet.
REFUSAL_REASONS: tuple[str, ...] = ("future_top", "foreign_top", "lost_entries")


class ForwarderMetrics:
    """Every forwarder series; one instance per process (or per test, with a fresh registry)."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        r = registry
        self.sent = counter("forwarder_sent_total", "Entries newly appended to the Brain stream", registry=r)
        self.already_delivered = counter(
            "forwarder_already_delivered_total",
            "Entries the Brain already held (XADD ID at or below its top)",
            registry=r,
        )
        self.replayed = counter("forwarder_replayed_total", "Entries replayed from the QuestDB buffer", registry=r)
        self.spilled = counter("forwarder_spilled_total", "Entries moved from Redis to the QuestDB buffer", registry=r)
        self.retries = counter("forwarder_retries_total", "Retries after a failed step", ("target",), registry=r)
        self.errors = counter("forwarder_errors_total", "Failed steps", ("target",), registry=r)
        self.dropped = counter(
            "forwarder_dropped_total",
            "Undelivered ticks dropped because the disk buffer budget was exceeded",
            registry=r,
        )
        self.buffer_missing = counter(
            "forwarder_buffer_missing_total",
            "Spilled entries the buffer replay did not get back (lost from the QuestDB buffer; range in the log)",
            registry=r,
        )
        self.buffer_quarantined = counter(
            "forwarder_buffer_quarantined_total",
            "Buffer rows the replay could not use (corrupt payload or ID, not spilled by us): quarantined, not sent",
            registry=r,
        )
        self.rewinds = counter(
            "forwarder_rewinds_total",
            "Brain stream top found behind the checkpoint (resent from the VPS copy)",
            registry=r,
        )
        self.brain_refusals = counter(
            "forwarder_brain_refusals_total",
            "Times the forwarder started refusing the Brain stream (a top it did not write, or lost entries)",
            ("reason",),
            registry=r,
        )
        self.brain_refused = gauge(
            "forwarder_brain_refused",
            "1 while the forwarder refuses the Brain stream for this reason (nothing is sent or trimmed on its word)",
            ("reason",),
            registry=r,
        )
        self.brain_group_missing = gauge(
            "forwarder_brain_group_missing",
            "1 while CONSUMER_GROUP is not on the Brain stream (the VPS then trims by time, not by the group)",
            registry=r,
        )
        self.brain_group_ms = gauge(
            "forwarder_brain_group_delivered_ms",
            "Millisecond part of the last ID CONSUMER_GROUP received on the Brain (the VPS keeps what is above)",
            registry=r,
        )
        self.connected = gauge("forwarder_connected", "1 if the link works", ("target",), registry=r)
        self.mode = gauge("forwarder_mode", "1 for the current mode", ("mode",), registry=r)
        self.send_rate = gauge("forwarder_send_rate", "Entries delivered per second (last interval)", registry=r)
        self.backlog_entries = gauge(
            "forwarder_backlog_entries", "Undelivered entries (buffer + Redis, Redis part estimated)", registry=r
        )
        self.backlog_oldest_age = gauge(
            "forwarder_backlog_oldest_age_seconds", "Age of the oldest undelivered entry (by its ID)", registry=r
        )
        self.backlog_refreshed = gauge(
            "forwarder_backlog_refreshed_timestamp_seconds",
            "When the backlog gauges were last refreshed (by the monitor task, independent of the send loop)",
            registry=r,
        )
        self.replay_eta = gauge("forwarder_replay_eta_seconds", "Backlog / drain rate (0 when caught up)", registry=r)
        self.redis_bytes = gauge("forwarder_redis_stream_bytes", "MEMORY USAGE of the VPS stream", registry=r)
        self.buffer_rows = gauge("forwarder_buffer_rows", "Rows held in the QuestDB buffer", registry=r)
        self.buffer_undelivered = gauge(
            "forwarder_buffer_undelivered_rows", "Buffer rows not yet delivered", registry=r
        )
        self.buffer_bytes = gauge("forwarder_buffer_bytes", "Disk size of the QuestDB buffer partitions", registry=r)
        self.buffer_hours = gauge("forwarder_buffer_hours", "Time span held in the QuestDB buffer", registry=r)
        self.ram_budget = gauge("forwarder_ram_budget_bytes", "RAM_BUFFER_BYTES (VPS stream budget)", registry=r)
        self.disk_budget = gauge("forwarder_disk_budget_bytes", "DISK_BUFFER_BYTES (QuestDB buffer budget)", registry=r)
        self.checkpoint_ms = gauge("forwarder_checkpoint_ms", "Millisecond part of the confirmed entry ID", registry=r)
        self.batch_seconds = histogram("forwarder_batch_seconds", "Brain XADD batch round trip", registry=r)
        self.brain_stream_latency = HopLatency(
            "forwarder_brain_stream_latency_seconds",
            "Hop collector -> Brain stream: the Brain confirmed the XADD minus the collector's recv_ts, per tick newly "
            "delivered (VPS clock on both ends; replayed ticks count with their age)",
            registry=r,
        )
        for reason in REFUSAL_REASONS:
            self.brain_refusals.labels(reason)
            self.brain_refused.labels(reason).set(0)
        for target in ("brain", "vps", "questdb"):
            self.connected.labels(target).set(0)
            self.retries.labels(target)
            self.errors.labels(target)
        self.set_mode("direct")

    def set_mode(self, mode: str) -> None:
        for name in MODES:
            self.mode.labels(name).set(1 if name == mode else 0)
