"""`make demo` leaves nothing running however it ends: Ctrl-C, SIGTERM, or the terminal closing (SIGHUP)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from tickbridge_dev.devstack.servers import wait_until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM, signal.SIGINT], ids=["hup", "term", "int"])
def test_demo_stops_every_process_on_a_signal(sig: signal.Signals, tmp_path: Path) -> None:
    log = tmp_path / "demo.log"
    with log.open("wb") as out:
        demo = subprocess.Popen(
            [sys.executable, "-m", "tickbridge_dev.devstack.demo", "--symbols", "BTCUSDT,ETHUSDT", "--rate", "100"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    children: list[psutil.Process] = []
    try:
        wait_until(lambda: b"pipeline up" in log.read_bytes(), 120, f"demo (log {log})", demo)
        children = psutil.Process(demo.pid).children(recursive=True)
        names = {c.name() for c in children}
        assert {"redis-server", "java"} <= names and len(children) >= 10, names  # servers, roles, sim, prometheus
        demo.send_signal(sig)
        demo.wait(90)
        _, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, [(p.pid, p.name()) for p in alive]
        assert b"all processes stopped" in log.read_bytes()
    finally:
        # A demo that did not stop must not leave its stack running for the rest of the suite (servers and
        # roles loading a 2-core machine make later timing tests fail): kill its session and every child seen.
        if demo.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(10)
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
