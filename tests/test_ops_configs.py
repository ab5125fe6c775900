"""The committed server configs, run on real servers: redis/vps.conf, redis/brain.conf, questdb/*/server.conf.

Each server starts from the committed file, with only what differs on this machine overridden on the
command line (port, bind address, directories, certificate paths): what is tested is what compose mounts.
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.exceptions

from tickbridge.ops import secrets_init
from tickbridge.ops.acl import render_acl
from tickbridge_dev.devstack.servers import (
    QUESTDB_TUNING,
    REPO_ROOT,
    QuestDBServer,
    RedisServer,
    free_port,
    wait_until,
)
from tickbridge_dev.devstack.tls import make_certs

pytestmark = pytest.mark.timeout(180)

PASSWORDS = {
    name: f"pw-{name.lower()}"
    for name in set(re.findall(r"#@([A-Z0-9_]+)@", "".join(p.read_text() for p in (REPO_ROOT / "redis").glob("*.acl"))))
}


class ConfRedis(RedisServer):
    """redis-server started from a committed config file; the command line overrides host-specific paths."""

    def __init__(self, conf: Path, overrides: list[str], workdir: Path) -> None:
        super().__init__(workdir=workdir)
        self.conf = conf
        self.overrides = overrides

    def command(self) -> list[str]:
        return [
            shutil.which("redis-server") or "redis-server", str(self.conf),
            "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir), "--daemonize", "no",
            *self.overrides,
        ]  # fmt: skip


@pytest.fixture
def vps_redis(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ConfRedis]:
    # Rendered by the compose `init` step's code, from the environment, as in a deployment.
    for name, value in PASSWORDS.items():
        monkeypatch.setenv(name, value)
    acl = tmp_path / "acl" / "users.acl"
    secrets_init.main(["--acl", str(REPO_ROOT / "redis" / "users.vps.acl"), str(acl)])
    assert acl.stat().st_mode & 0o777 == 0o600
    server = ConfRedis(REPO_ROOT / "redis" / "vps.conf", ["--aclfile", str(acl)], tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def _client(port: int, user: str, password: str, **kwargs: object) -> redis.Redis:
    return redis.Redis(port=port, username=user, password=password, socket_timeout=15, **kwargs)  # type: ignore[arg-type]


def test_vps_redis_conf_durability_and_memory(vps_redis: ConfRedis) -> None:
    admin = _client(vps_redis.port, "admin", PASSWORDS["VPS_REDIS_ADMIN_PASSWORD"])
    config = {
        k: v
        for part in ("appendonly", "appendfsync", "maxmemory*", "save", "stream-node-*")
        for k, v in admin.config_get(part).items()
    }
    assert config["appendonly"] == "yes"
    # 64 KB stream nodes (issue 17's bytes: ~12 % less memory per depth update than Redis's 4 KB).
    assert (config["stream-node-max-bytes"], config["stream-node-max-entries"]) == ("65536", "100")
    assert config["appendfsync"] == "everysec"
    assert config["maxmemory-policy"] == "noeviction"
    assert int(config["maxmemory"]) == 1100 * 2**20
    assert config["save"] == ""
    # Every client authenticates: the default user is off.
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=vps_redis.port, socket_timeout=5).ping()
    collector = _client(vps_redis.port, "collector", PASSWORDS["VPS_REDIS_COLLECTOR_PASSWORD"])
    entry_id = collector.xadd("market:vps:stream", {"symbol": "BTCUSDT", "type": "TRADE"})
    forwarder = _client(vps_redis.port, "forwarder", PASSWORDS["VPS_REDIS_FORWARDER_PASSWORD"])
    assert [e[0] for e in forwarder.xrange("market:vps:stream")] == [entry_id]
    # The AOF is written as configured (everysec) and survives a restart with the entry.
    vps_redis.restart()
    assert forwarder.xlen("market:vps:stream") == 1


def test_brain_redis_conf_tls_requires_client_certificate(tmp_path: Path) -> None:
    certs = make_certs(tmp_path / "certs")
    acl = render_acl(REPO_ROOT / "redis" / "users.brain.acl", tmp_path / "users.acl", PASSWORDS)
    # The server's files as the Brain's `init` step hands them to redis (keys 0600, certificates 0644).
    tls = tmp_path / "acl" / "tls"
    secrets_init.main(["--tls", str(certs.directory), str(tls), "ca.crt", "server.crt", "server.key"])
    assert (tls / "server.key").stat().st_mode & 0o777 == 0o600
    assert (tls / "server.crt").stat().st_mode & 0o777 == 0o644
    tls_port = free_port()
    overrides = [
        "--aclfile", str(acl), "--tls-port", str(tls_port),
        "--tls-cert-file", str(tls / "server.crt"), "--tls-key-file", str(tls / "server.key"),
        "--tls-ca-cert-file", str(tls / "ca.crt"),
    ]  # fmt: skip
    server = ConfRedis(REPO_ROOT / "redis" / "brain.conf", overrides, tmp_path / "redis")
    server.start()
    try:
        admin = _client(server.port, "admin", PASSWORDS["BRAIN_REDIS_ADMIN_PASSWORD"])
        assert admin.config_get("tls-auth-clients")["tls-auth-clients"] == "yes"
        assert admin.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
        assert admin.config_get("appendfsync")["appendfsync"] == "everysec"
        # Without a client certificate the TLS handshake is refused.
        assert not _tls_ping_without_client_cert(tls_port, certs.ca)
        # With the certificate AND the forwarder's password the VPS may append to the stream.
        tls = dict(ssl=True, ssl_ca_certs=str(certs.ca), ssl_certfile=str(certs.client_cert),
                   ssl_keyfile=str(certs.client_key))  # fmt: skip
        forwarder = _client(tls_port, "forwarder", PASSWORDS["BRAIN_REDIS_FORWARDER_PASSWORD"], **tls)
        forwarder.xadd("market:vps:stream", {"symbol": "BTCUSDT"}, id="1-1")
        assert admin.xlen("market:vps:stream") == 1
        with pytest.raises(redis.exceptions.AuthenticationError):
            _client(tls_port, "forwarder", "wrong", **tls).ping()
    finally:
        server.stop()


def test_secrets_init_names_a_missing_password(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("VPS_REDIS_ADMIN_PASSWORD", raising=False)
    with pytest.raises(SystemExit) as exc:
        secrets_init.main(["--acl", str(REPO_ROOT / "redis" / "users.vps.acl"), str(tmp_path / "users.acl")])
    assert exc.value.code == 2
    assert "VPS_REDIS_ADMIN_PASSWORD" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        secrets_init.main(["--tls", str(tmp_path / "nowhere"), str(tmp_path / "tls"), "ca.crt"])
    assert "make certs" in capsys.readouterr().err


def _tls_ping_without_client_cert(port: int, ca: Path) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    try:
        with (
            socket.create_connection(("127.0.0.1", port), timeout=2) as raw,
            ctx.wrap_socket(raw, server_hostname="localhost") as sock,
        ):
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except (ssl.SSLError, OSError):
        return False


class AuthQuestDB(QuestDBServer):
    """QuestDB with the credentials compose passes (QDB_HTTP_USER / QDB_HTTP_PASSWORD)."""

    def env(self) -> dict[str, str]:
        return {**os.environ, "QDB_HTTP_USER": "qdb-user", "QDB_HTTP_PASSWORD": "qdb-password"}


@pytest.mark.parametrize("host", ["vps", "brain"])
def test_questdb_server_conf_starts_and_exports_metrics(host: str, tmp_path: Path) -> None:
    conf = {}
    for line in (REPO_ROOT / "questdb" / host / "server.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, _, value = line.partition("=")
            conf[key.strip()] = value.strip()
    # Bind addresses are the compose network's; this machine uses the fixture's free loopback ports.
    binds = {k for k in conf if k.endswith(".bind.to")}
    assert binds == {"http.net.bind.to", "http.min.net.bind.to", "pg.net.bind.to"}
    assert conf["metrics.enabled"] == "true" and conf["http.min.net.bind.to"].endswith(":9003")
    # One source for the 2-core worker tuning: what the native stack runs and measures is what compose runs.
    assert {k: conf.get(k) for k in QUESTDB_TUNING} == QUESTDB_TUNING
    server = AuthQuestDB(workdir=tmp_path / "questdb", extra_conf={k: v for k, v in conf.items() if k not in binds})
    server.start()
    try:
        # As in compose: Basic auth on 9000 (QDB_HTTP_USER/PASSWORD), health and /metrics on 9003 without it.
        with urllib.request.urlopen(f"http://127.0.0.1:{server.min_port}/", timeout=30) as resp:
            assert resp.status == 200

        def metrics() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{server.min_port}/metrics", timeout=30) as resp:
                return str(resp.read().decode())

        # Some gauges register a moment after /ping answers: poll for the ones the alerts and panels use.
        wait_until(
            lambda: all(m in metrics() for m in ("questdb_suspended_tables", "questdb_memory_rss")), 60, "metrics"
        )
        with pytest.raises(urllib.error.HTTPError) as denied:
            urllib.request.urlopen(f"{server.url}/exec?query=SELECT%201", timeout=30)
        assert denied.value.code == 401
        request = urllib.request.Request(f"{server.url}/exec?query=SELECT%201")
        request.add_header("Authorization", "Basic " + base64.b64encode(b"qdb-user:qdb-password").decode())
        with urllib.request.urlopen(request, timeout=30) as resp:
            assert resp.status == 200

        # QuestDB names keys it does not recognise ("Invalid settings ... probable typos") in its log, which
        # questdb/log.conf sends to standard output (the native server's questdb.log). Stop the server first: it
        # flushes the log.
        server.stop()
        log = server.log_path.read_text(errors="replace")
        assert "resolved RAM usage limit" in log, log[-500:]
        assert "Invalid settings" not in log, log[log.find("Invalid settings") :][:500]
        # questdb/log.conf: INFO off (its logging thread cost more CPU than the commits), start-up advisories on.
        assert not re.search(r"^\S+ I ", log, re.M), re.findall(r"^\S+ I .*$", log, re.M)[:3]
        if host == "vps":
            assert "resolved RAM usage limit: 512.0 MiB" in log
    finally:
        server.stop()
