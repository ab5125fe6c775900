"""The whole pipeline with the production security on (issue 7): ACL users on both Redis servers, the
Brain's Redis TLS-only with client certificates, every role a separate process with only its own
credentials. Every trade arrives exactly once, in order, and no role was denied anything it needed
(Redis' ACL LOG stays empty)."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tickbridge_dev.devstack.demo import drain_and_check
from tickbridge_dev.devstack.stack import StackConfig
from tickbridge_dev.devstack.tls import SecureNativeStack, SecureRedisServer

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SYMBOLS = ("BTCUSDT", "ETHUSDT", "SOLUSDT")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureNativeStack]:
    s = SecureNativeStack(
        StackConfig(symbols=SYMBOLS, rate=300, with_prometheus=False, workdir=tmp_path_factory.mktemp("sstack"))
    )
    s.start()
    try:
        yield s
    finally:
        s.cleanup()


def admin(stack: SecureNativeStack, host: str) -> redis.Redis:
    server = stack.vps_redis if host == "vps" else stack.brain_redis
    assert isinstance(server, SecureRedisServer)
    kwargs = {}
    if server.certs is not None:
        kwargs = {"ssl_ca_certs": str(server.certs.ca), "ssl_certfile": str(server.certs.client_cert),
                  "ssl_keyfile": str(server.certs.client_key)}  # fmt: skip
    return redis.Redis.from_url(stack.user_url(host, "admin"), socket_timeout=10, **kwargs)


def acl_denials(stack: SecureNativeStack) -> list[str]:
    out = []
    for host in ("vps", "brain"):
        client = admin(stack, host)
        try:
            for entry in client.acl_log(count=50):
                if entry.get("username") in ("admin",):
                    continue
                out.append(f"{host}: {entry.get('username')} denied {entry.get('reason')} {entry.get('object')}")
        finally:
            client.close()
    return out


def test_pipeline_over_tls_with_acls_delivers_every_trade_exactly_once(stack: SecureNativeStack) -> None:
    stack.wait_for(lambda: stack.brain_sql("SELECT count() FROM trades")[0][0] > 300, 120, "trades in QuestDB")
    time.sleep(3)  # a few more seconds of flow through every hop (and every role's periodic commands)
    report = drain_and_check(stack)
    assert report.ok, report.summary()
    assert report.expected > 300
    assert all(proc.alive() for proc in stack.roles.values())
    # Each role is connected as its own user, not as an admin or the default user.
    users = {}
    for host in ("vps", "brain"):
        client = admin(stack, host)
        try:
            users[host] = {c["user"] for c in client.client_list()} - {"admin"}
        finally:
            client.close()
    assert users == {"vps": {"collector", "forwarder"}, "brain": {"forwarder", "consumer", "writer"}}, users
    denials = acl_denials(stack)
    assert not denials, "a role needed a command its ACL user lacks:\n" + "\n".join(denials)
    stack.sim_fault("resume")


def test_the_live_brain_refuses_plaintext_and_anonymous_clients(stack: SecureNativeStack) -> None:
    brain = stack.brain_redis
    assert isinstance(brain, SecureRedisServer) and not brain.plain_port
    with socket.create_connection(("127.0.0.1", brain.tls_port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        try:
            reply = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert b"PONG" not in reply
    vps = redis.Redis(port=stack.vps_redis.port, socket_timeout=5)
    try:
        with pytest.raises(redis.AuthenticationError):
            vps.ping()
    finally:
        vps.close()


def test_status_reads_every_figure_of_the_live_secure_pipeline(stack: SecureNativeStack, tmp_path: Path) -> None:
    """`tickbridge status --once` as an operator runs it against the deployed shape (issue 19): the `monitor`
    ACL user on both Redis servers, the Brain's over TLS with the client certificate. Every figure is there
    and the monitor user was refused nothing."""
    env = {
        "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "COLUMNS": "160",
        "VPS_REDIS_URL": stack.user_url("vps", "monitor"), "BRAIN_REDIS_URL": stack.user_url("brain", "monitor"),
        **stack.certs.client_env(),
        "VPS_QUESTDB_URL": stack.vps_questdb.url, "BRAIN_QUESTDB_URL": stack.brain_questdb.url,
    }  # fmt: skip
    proc = subprocess.run([sys.executable, "-m", "tickbridge", "status", "--once", "--interval", "0.5"], env=env,
                          cwd=tmp_path, capture_output=True, text=True, timeout=90, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "could not read" not in proc.stdout and "?" not in proc.stdout, proc.stdout
    rows = {}
    for line in proc.stdout.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line) if c.strip()]
        if len(cells) >= 2:
            rows[cells[0]] = cells[1]
    assert rows["forwarder mode"] == "direct" and re.fullmatch(r"\d+-\d+", rows["forwarder confirmed ID"]), rows
    assert int(rows["Brain QuestDB trades rows"].replace(",", "")) > 300, rows
    for label in ("VPS stream length", "VPS QuestDB buffer rows", "Brain stream length"):
        assert re.fullmatch(r"[\d,]+", rows[label]), (label, rows)
    assert re.fullmatch(r"[\d,]+ / [\d,]+", rows["Brain consumer lag / pending"]), rows
    assert not [d for d in acl_denials(stack) if d.split(": ", 1)[1].startswith("monitor ")], acl_denials(stack)
