"""redis_exporter as deployed (issue 19): Debian's `prometheus-redis-exporter` 1.45 (the compose image's version)
against a real `redis-server` with the committed ACL, logged in as `monitor` with its password in a
`REDIS_PASSWORD_FILE`, over TLS with the client certificate to a Brain-like Redis (no plain port): every
`redis_*` series the rules and dashboards use (the catalog) is exported, stream metrics included, and a
wrong password shows as `redis_up 0` (what VPSRedisDown / BrainRedisDown read)."""

from __future__ import annotations

import secrets
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tickbridge.ops.acl import acl_variables, render_acl
from tickbridge_dev.deploy.catalog import EXPORTER_SERIES
from tickbridge_dev.deploy.commands import NATIVE_COMMANDS, command_matches
from tickbridge_dev.devstack.servers import RedisExporterServer, wait_until
from tickbridge_dev.devstack.stack import StackConfig
from tickbridge_dev.devstack.tls import BRAIN_ACL, VPS_ACL, CertPaths, SecureNativeStack, SecureRedisServer, make_certs

pytestmark = pytest.mark.timeout(120)

STREAM = "market:vps:stream"
GROUP = "brain-consumer-group"


def samples(url: str) -> dict[str, float]:
    """`name{labels}` -> value of an exporter's /metrics."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def names(metrics: dict[str, float]) -> set[str]:
    return {key.partition("{")[0] for key in metrics}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def passwords() -> dict[str, str]:
    return {name: secrets.token_hex(24) for name in acl_variables(VPS_ACL.read_text() + BRAIN_ACL.read_text())}


@pytest.fixture(scope="module")
def brain_redis(
    tmp_path_factory: pytest.TempPathFactory, certs: CertPaths, passwords: dict[str, str]
) -> Iterator[SecureRedisServer]:
    """The Brain's shape: ACL, TLS with client certificates only, AOF."""
    workdir = tmp_path_factory.mktemp("brain-redis")
    server = SecureRedisServer(aclfile=render_acl(BRAIN_ACL, workdir / "acl" / "users.acl", passwords), certs=certs,
                               plain_port=False, appendonly=True, workdir=workdir / "run",
                               extra=["--maxmemory", "64mb"])  # fmt: skip
    server.start()
    admin = ["redis-cli", "--tls", "--cacert", str(certs.ca), "--cert", str(certs.client_cert), "--key",
             str(certs.client_key), "-p", str(server.tls_port), "--user", "admin", "--pass",
             passwords["BRAIN_REDIS_ADMIN_PASSWORD"], "--no-auth-warning"]  # fmt: skip
    for cmd in (["XADD", STREAM, "*", "price", "1"], ["XGROUP", "CREATE", STREAM, GROUP, "0"]):
        subprocess.run([*admin, *cmd], check=True, capture_output=True, timeout=10)
    yield server
    server.stop()


def exporter_for(server: SecureRedisServer, certs: CertPaths, password: str, workdir: Path) -> RedisExporterServer:
    return RedisExporterServer(f"rediss://127.0.0.1:{server.tls_port}", user="monitor", password=password,
                               tls=(certs.ca, certs.client_cert, certs.client_key), streams=(STREAM,),
                               workdir=workdir)  # fmt: skip


def test_the_native_exporter_is_the_compose_program(tmp_path: Path) -> None:
    argv = RedisExporterServer("redis://127.0.0.1:1", workdir=tmp_path).command()
    assert command_matches(argv, NATIVE_COMMANDS["redis-exporter"])
    assert command_matches(["/redis_exporter", "-redis-only-metrics"], NATIVE_COMMANDS["redis-exporter"])
    version = subprocess.run([argv[0], "-version"], capture_output=True, text=True, timeout=10)
    assert "Exporter 1.45." in version.stdout + version.stderr


def test_monitor_user_over_tls_exports_every_series_the_rules_and_panels_use(
    brain_redis: SecureRedisServer, certs: CertPaths, passwords: dict[str, str], tmp_path: Path
) -> None:
    exporter = exporter_for(brain_redis, certs, passwords["BRAIN_REDIS_MONITOR_PASSWORD"], tmp_path)
    exporter.start()
    try:
        # The password is in a 0600 file, never in argv or the environment.
        assert passwords["BRAIN_REDIS_MONITOR_PASSWORD"] not in " ".join(exporter.command())
        assert oct(exporter.password_file.stat().st_mode & 0o777) == "0o600"
        metrics = samples(exporter.url)
        assert metrics["redis_up"] == 1
        assert metrics['redis_exporter_last_scrape_error{err=""}'] == 0
        missing = EXPORTER_SERIES["redis_exporter"] - names(metrics)
        assert not missing, f"redis_exporter 1.45 does not export {sorted(missing)}"
        # The stream is read under the ACL (SELECT, XINFO STREAM/GROUPS/CONSUMERS as `monitor`).
        assert metrics[f'redis_stream_length{{db="db0",stream="{STREAM}"}}'] == 1
        assert metrics[f'redis_stream_groups{{db="db0",stream="{STREAM}"}}'] == 1
        assert metrics["redis_memory_max_bytes"] == 64 * 2**20
        assert metrics["redis_aof_enabled"] == 1 and metrics["redis_aof_last_write_status"] == 1
        assert "redis_slowlog_length" in metrics  # SLOWLOG LEN granted too
    finally:
        exporter.stop()


def test_a_wrong_password_is_redis_up_0(brain_redis: SecureRedisServer, certs: CertPaths, tmp_path: Path) -> None:
    exporter = exporter_for(brain_redis, certs, "wrong-" + secrets.token_hex(12), tmp_path)
    exporter.start()
    try:
        wait_until(lambda: samples(exporter.url).get("redis_up") == 0, 20, "redis_up 0")
    finally:
        exporter.stop()


def test_vps_monitor_user_plain(passwords: dict[str, str], tmp_path: Path) -> None:
    server = SecureRedisServer(aclfile=render_acl(VPS_ACL, tmp_path / "acl" / "users.acl", passwords),
                               appendonly=True, workdir=tmp_path / "redis")  # fmt: skip
    server.start()
    try:
        exporter = RedisExporterServer(f"redis://127.0.0.1:{server.port}", user="monitor",
                                       password=passwords["VPS_REDIS_MONITOR_PASSWORD"], streams=(STREAM,),
                                       workdir=tmp_path / "exporter")  # fmt: skip
        exporter.start()
        try:
            metrics = samples(exporter.url)
            assert metrics["redis_up"] == 1 and metrics["redis_connected_clients"] >= 1
            assert metrics['redis_exporter_last_scrape_error{err=""}'] == 0
        finally:
            exporter.stop()
    finally:
        server.stop()


def test_the_secure_native_stack_gives_its_exporters_the_monitor_user_and_tls(tmp_path: Path) -> None:
    """SecureNativeStack (ACLs everywhere, the Brain's Redis on TLS only) starts its exporters as compose does."""
    stack = SecureNativeStack(StackConfig(workdir=tmp_path))
    try:
        stack.brain_redis.start()
        stack.vps_redis.start()
        for host in ("vps", "brain"):
            exporter = stack.redis_exporter(host)
            assert exporter.user == "monitor" and (exporter.tls is not None) == (host == "brain")
            exporter.start()
            try:
                metrics = samples(exporter.url)
                assert metrics["redis_up"] == 1, host
                assert metrics['redis_exporter_last_scrape_error{err=""}'] == 0, host
            finally:
                exporter.stop()
    finally:
        # Started here, not by stack.start(): the stack's stop() only stops what it started itself.
        stack.brain_redis.stop()
        stack.vps_redis.stop()
        stack.cleanup()
