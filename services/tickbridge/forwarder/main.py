"""`tickbridge forwarder`: entry point."""

from __future__ import annotations

import os

from tickbridge.core import keys
from tickbridge.core.lifecycle import run_service, setup_logging, tune_gc
from tickbridge.core.metrics import serve_metrics
from tickbridge.core.settings import load_settings
from tickbridge.forwarder.service import Forwarder

#: Buffer table name override (tests sharing one QuestDB); the contract name is `vps_buffer`.
TABLE_ENV = "FORWARDER_BUFFER_TABLE"
#: Entries per spill transaction (default 50,000).
SPILL_BATCH_ENV = "FORWARDER_SPILL_BATCH"


def main(argv: list[str]) -> None:
    """Run the forwarder until SIGTERM/SIGINT."""
    if argv and argv[0] in {"-h", "--help"}:
        print("usage: tickbridge forwarder  (configured by the environment: see docs and .env.example)")
        raise SystemExit(0)
    settings = load_settings()
    setup_logging(settings.log_level)
    serve_metrics(settings.metrics_port_for("forwarder"), settings.metrics_bind)
    table = os.environ.get(TABLE_ENV, keys.VPS_BUFFER_TABLE)
    tune_gc()
    spill_batch = int(os.environ.get(SPILL_BATCH_ENV, "50000"))
    run_service(lambda: Forwarder(settings, buffer_table=table, spill_batch=spill_batch))
