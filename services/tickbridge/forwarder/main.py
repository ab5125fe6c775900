"""`tickbridge forwarder`: entry point."""

from __future__ import annotations

import argparse
import os

from tickbridge.core import keys
from tickbridge.core.lifecycle import run_service, setup_logging, tune_gc
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import load_settings
from tickbridge.forwarder.live_process import LiveLaneProcess
from tickbridge.forwarder.service import Forwarder

#: Buffer table name override (tests sharing one QuestDB); the contract name is `vps_buffer`.
TABLE_ENV = "FORWARDER_BUFFER_TABLE"
#: Entries per spill transaction (default 50,000).
SPILL_BATCH_ENV = "FORWARDER_SPILL_BATCH"
#: `0` turns the fast-forward live lane off (to measure its cost: `make bench-forwarder`, chaos A/B).
LIVE_LANE_ENV = "FORWARDER_LIVE_LANE"


def run_command(args: argparse.Namespace) -> None:
    """Run the forwarder until SIGTERM/SIGINT (configuration from the environment / `.env`)."""
    settings = load_settings()
    setup_logging(settings.log_level)
    if settings.forwarder_lane == "live":
        serve_metrics(settings.metrics_port_for("forwarder-live"), settings.metrics_bind)
        run_service(lambda: LiveLaneProcess(settings))
        return
    serve_metrics(settings.metrics_port_for("forwarder"), settings.metrics_bind)
    table = os.environ.get(TABLE_ENV, keys.buffer_table_for(settings.exchange))
    tune_gc()
    spill_batch = int(os.environ.get(SPILL_BATCH_ENV, "50000"))
    # FORWARDER_LANE=ordered: the lane runs in its own process (FORWARDER_LANE=live); this one reports its backlog.
    lane_here = settings.forwarder_lane == "both"
    live_lane = lane_here and os.environ.get(LIVE_LANE_ENV, "1") != "0"
    run_service(lambda: Forwarder(settings, buffer_table=table, spill_batch=spill_batch, live_lane=live_lane,
                                  lane_figures=not lane_here))  # fmt: skip
