"""`tickbridge check <role>`, the compose healthcheck: exit 0 for a live role, 1 for a dead, wrong or stuck one."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
import redis
from prometheus_client import CollectorRegistry, start_http_server

from conftest import eventually
from tickbridge.brain.consumer import BrainConsumer
from tickbridge.core import keys
from tickbridge.core.metrics import counter
from tickbridge.core.settings import DEFAULT_METRICS_PORTS, Settings
from tickbridge.devstack.servers import RedisServer, free_port, wait_until
from tickbridge.ops import check as check_mod
from tickbridge.ops.check import check_heartbeat, check_role, evaluate

pytestmark = pytest.mark.timeout(120)


def _run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tickbridge", "check", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **(env or {})},
    )


@pytest.fixture
def collector_endpoint() -> Iterator[tuple[int, CollectorRegistry]]:
    """A real /metrics endpoint serving a collector-like registry."""
    registry = CollectorRegistry()
    counter("collector_ticks", "ticks", ("symbol",), registry=registry).labels("BTCUSDT").inc(3)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    yield port, registry
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_roles_are_the_settings_roles() -> None:
    assert set(check_mod.ROLES) == set(DEFAULT_METRICS_PORTS)


def test_evaluate_requires_the_roles_series() -> None:
    text = "# TYPE tickbridge_collector_ticks_total counter\ntickbridge_collector_ticks_total 5\n"
    assert evaluate("collector", text).healthy
    # Another role's endpoint (or a process that registered nothing yet) is not this role.
    assert not evaluate("forwarder", text).healthy
    assert not evaluate("collector", "").healthy
    assert not evaluate("collector", "garbage{{{\n").healthy


def test_check_against_a_live_endpoint_then_a_dead_one(collector_endpoint: tuple[int, CollectorRegistry]) -> None:
    port, _ = collector_endpoint
    assert check_role("collector", port, timeout=10).healthy
    assert not check_role("consumer", port, timeout=10).healthy
    # Nothing listening: unhealthy, quickly.
    started = time.monotonic()
    assert not check_role("collector", free_port(), timeout=2).healthy
    assert time.monotonic() - started < 10


def test_cli_exit_codes_and_metrics_port_from_env(collector_endpoint: tuple[int, CollectorRegistry]) -> None:
    port, _ = collector_endpoint
    ok = _run_check("collector", "--timeout", "10", env={"METRICS_PORT": str(port)})
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("healthy: collector")
    assert _run_check("collector", "--port", str(port), "--timeout", "10", "--quiet").stdout == ""
    wrong = _run_check("forwarder", "--port", str(port), "--timeout", "10")
    assert wrong.returncode == 1 and wrong.stderr.startswith("unhealthy: forwarder")
    dead = _run_check("collector", "--port", str(free_port()))
    assert dead.returncode == 1 and "unhealthy" in dead.stderr
    # A broken configuration is "unhealthy" (exit 1), never a traceback.
    bad = _run_check("collector", env={"METRICS_PORT": "not-a-port"})
    assert bad.returncode == 1 and bad.stderr.startswith("unhealthy: config error: METRICS_PORT")


def test_check_a_real_role_process() -> None:
    """`tickbridge sim` (a role needing no Redis) is healthy while it runs and unhealthy once stopped."""
    metrics_port, ws_port = free_port(), free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickbridge", "sim", "--port", str(ws_port), "--metrics-port", str(metrics_port),
         "--symbols", "BTCUSDT", "--rate", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        wait_until(lambda: check_role("sim", metrics_port, timeout=10).healthy, 60, "sim healthy", proc)
        assert _run_check("sim", "--port", str(metrics_port), "--timeout", "10").returncode == 0
    finally:
        proc.terminate()
        proc.wait(20)
    assert _run_check("sim", "--port", str(metrics_port)).returncode == 1


def test_a_native_role_serves_metrics_on_loopback_unless_told_otherwise(tmp_path: Path) -> None:
    """METRICS_BIND defaults to 127.0.0.1 (compose sets 0.0.0.0 for its Prometheus): a role started from a
    checkout does not publish /metrics on every interface of the host."""
    metrics_port, ws_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if k != "METRICS_BIND"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickbridge", "sim", "--port", str(ws_port), "--metrics-port", str(metrics_port),
         "--symbols", "BTCUSDT", "--rate", "10"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env, cwd=tmp_path,
    )  # fmt: skip
    try:
        wait_until(lambda: check_role("sim", metrics_port, timeout=10).healthy, 60, "sim healthy", proc)
        listening = {
            c.laddr.ip for c in psutil.Process(proc.pid).net_connections("tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == metrics_port
        }  # fmt: skip
        assert listening == {"127.0.0.1"}
    finally:
        proc.terminate()
        proc.wait(20)


async def test_heartbeat_of_a_real_consumer(redis_server: RedisServer) -> None:
    """`--heartbeat` follows the consumer's own heartbeat key: fresh while it runs, expired once it stops."""
    settings = Settings(_env_file=None, brain_redis_url=redis_server.url, consumer_name="consumer-1")  # type: ignore[call-arg]
    assert not check_heartbeat("consumer", settings).healthy  # not started yet
    consumer = BrainConsumer(settings, CollectorRegistry(), monitor_interval_s=0.2)

    async def beating() -> bool:
        return check_heartbeat("consumer", settings).healthy

    task = asyncio.create_task(consumer.run())
    try:
        await eventually(beating, 20, what="consumer heartbeat")
    finally:
        consumer.request_stop()
        await asyncio.wait_for(task, 30)
    # After the role stopped, the key expires (TTL) and the check fails: simulate the expiry.
    client = redis.Redis.from_url(redis_server.url)
    assert client.ttl(keys.heartbeat_key("consumer", "consumer-1")) <= 15
    client.delete(keys.heartbeat_key("consumer", "consumer-1"))
    assert "expired" in check_heartbeat("consumer", settings).reason
    # Roles without a heartbeat key, or without a known instance name, are reported as such.
    assert not check_heartbeat("collector", settings).healthy
    anonymous = Settings(_env_file=None, brain_redis_url=redis_server.url)  # type: ignore[call-arg]
    assert "CONSUMER_NAME" in check_heartbeat("consumer", anonymous).reason
    dead = Settings(_env_file=None, brain_redis_url=f"redis://127.0.0.1:{free_port()}/0", consumer_name="c")  # type: ignore[call-arg]
    assert not check_heartbeat("consumer", dead, timeout=1).healthy
