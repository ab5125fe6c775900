"""`tickbridge check <role>`: the compose healthcheck of a role (exit 0 healthy, 1 not).

A role is healthy when its own `/metrics` endpoint (METRICS_PORT, else the role's default port)
answers within the timeout with the role's `tickbridge_<role>_*` series. The endpoint lives in the
role's process, so a dead or restarting process fails the check, and a process of another role (or one
that has not registered its metrics yet) does too. No Redis or QuestDB credentials are needed for that.
A stuck event loop is the role's own Watchdog's job (it crashes the process).

`--heartbeat` also requires the role's heartbeat key (`tickbridge:heartbeat:<role>:<CONSUMER_NAME>`,
SET with a 15 s TTL by the Brain roles' monitor loop) in the Brain Redis, read with the role's own
credentials: the /metrics endpoint is served by a thread, so only the key proves the event loop runs.

It runs every few seconds in the role's container, on the role's CPU: without `--heartbeat` and with
METRICS_PORT set (as compose does) it imports neither pydantic nor redis.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING

from prometheus_client.parser import text_string_to_metric_families

from tickbridge.core import keys
from tickbridge.core.metrics import NAMESPACE

if TYPE_CHECKING:
    from tickbridge.core.settings import Settings

#: Roles with a /metrics endpoint (the keys of settings.DEFAULT_METRICS_PORTS, kept here to stay light).
ROLES = ("collector", "forwarder", "consumer", "writer", "sim", "forwarder-live")
#: Roles that keep a heartbeat key in the Brain Redis (keys.heartbeat_key, TTL 15 s).
HEARTBEAT_ROLES = ("consumer", "writer")


@dataclass(frozen=True)
class CheckResult:
    """Outcome of one health check."""

    healthy: bool
    reason: str


def evaluate(role: str, text: str) -> CheckResult:
    """Judge a role's `/metrics` text: the role's own series are there."""
    prefix = f"{NAMESPACE}_{role.replace('-', '_')}_"  # forwarder-live: tickbridge_forwarder_live_*
    try:
        names = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    except ValueError as exc:
        return CheckResult(False, f"unparseable /metrics: {exc}")
    own = {name for name in names if name.startswith(prefix)}
    if not own:
        return CheckResult(False, f"no {prefix}* series: not a {role} process, or not started yet")
    return CheckResult(True, f"{len(own)} {prefix}* series")


def fetch(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        body: bytes = resp.read()
    return body.decode("utf-8", errors="replace")


def check_role(role: str, port: int, host: str = "127.0.0.1", timeout: float = 3.0) -> CheckResult:
    """Fetch and judge `http://host:port/metrics` of `role`."""
    url = f"http://{host}:{port}/metrics"
    try:
        text = fetch(url, timeout)
    except (urllib.error.URLError, OSError, TimeoutError) as exc:
        return CheckResult(False, f"{url}: {exc}")
    return evaluate(role, text)


def check_heartbeat(role: str, settings: Settings, timeout: float = 3.0) -> CheckResult:
    """Healthy if the role's heartbeat key exists (its monitor loop refreshed it within the TTL)."""
    if role not in HEARTBEAT_ROLES:
        return CheckResult(False, f"{role} keeps no heartbeat key (only {', '.join(HEARTBEAT_ROLES)})")
    if not settings.consumer_name:
        return CheckResult(False, "CONSUMER_NAME is not set: the heartbeat key name is unknown")
    import redis  # here, not at module level: only --heartbeat needs it

    key = keys.heartbeat_key(role, settings.consumer_name)
    kwargs: dict[str, object] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if settings.brain_redis_url.startswith("rediss://"):
        kwargs.update(ssl_ca_certs=settings.redis_tls_ca, ssl_certfile=settings.redis_tls_cert,
                      ssl_keyfile=settings.redis_tls_key)  # fmt: skip
    try:
        with redis.Redis.from_url(settings.brain_redis_url, **kwargs) as client:
            value = client.get(key)
    except (redis.RedisError, OSError) as exc:
        return CheckResult(False, f"heartbeat {key}: {exc}")
    if value is None:
        return CheckResult(False, f"heartbeat {key} expired: the event loop is stuck or the role is not running")
    return CheckResult(True, f"heartbeat {key} fresh")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `tickbridge check` (the CLI's sub-parser)."""
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--port", type=int, help="metrics port (default: METRICS_PORT, else the role's default)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for /metrics")
    parser.add_argument("--heartbeat", action="store_true", help="also require the heartbeat key (consumer, writer)")
    parser.add_argument("-q", "--quiet", action="store_true", help="print nothing when healthy")


def _settings() -> Settings:
    """Settings, or exit 1 with the config error line (an unhealthy check, not a traceback)."""
    from pydantic import ValidationError

    from tickbridge.core.settings import Settings, config_error_line

    try:
        return Settings()
    except ValidationError as exc:
        print(f"unhealthy: {config_error_line(exc)}", file=sys.stderr)
        raise SystemExit(1) from None


def run_command(args: argparse.Namespace) -> None:
    """Exit 0 if the role is healthy, 1 if not (one line on stderr says why)."""
    port = args.port
    env_port = os.environ.get("METRICS_PORT", "")
    if port is None and env_port.isdigit():
        port = int(env_port)
    settings = _settings() if port is None or args.heartbeat else None
    if port is None:
        assert settings is not None
        port = settings.metrics_port_for(args.role)
    result = check_role(args.role, port, args.host, args.timeout)
    if result.healthy and settings is not None and args.heartbeat:
        beat = check_heartbeat(args.role, settings, args.timeout)
        result = CheckResult(beat.healthy, f"{result.reason}; {beat.reason}")
    if not result.healthy:
        print(f"unhealthy: {args.role}: {result.reason}", file=sys.stderr)
        raise SystemExit(1)
    if not args.quiet:
        print(f"healthy: {args.role}: {result.reason}")
    raise SystemExit(0)
