"""`tickbridge status` against hosts secured as compose deploys them (issue 19): the Brain's Redis TLS-only
with client certificates and ACL users, both QuestDBs with logins (the Brain's with its read-only PG
user). Run as an operator would (`tickbridge status --once`, the `monitor` ACL users), every figure is
there; a wrong password or a server that does not answer is a line naming the source and the reason,
never a blank.
"""

from __future__ import annotations

import asyncio
import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis

from tickbridge.core import keys
from tickbridge.core.questdb_io import QuestDBHttp
from tickbridge.core.settings import Settings
from tickbridge.core.wire import TRADES_DDL
from tickbridge.forwarder.buffer import SpillBuffer
from tickbridge.ops.acl import acl_variables, render_acl
from tickbridge_dev.devstack.servers import QuestDBServer, free_port
from tickbridge_dev.devstack.tls import BRAIN_ACL, VPS_ACL, CertPaths, SecureRedisServer, make_certs

pytestmark = pytest.mark.timeout(180)

USER, READER = "tickbridge", "tbreader"
STREAM, GROUP = keys.DEFAULT_STREAM_KEY, keys.DEFAULT_CONSUMER_GROUP
#: Every figure of the table (`--host both`, no simulator or Prometheus given).
FIGURES = [
    "VPS stream length",
    "forwarder mode",
    "forwarder confirmed ID",
    "VPS QuestDB buffer rows",
    "Brain stream length",
    "Brain consumer lag / pending",
    "Brain QuestDB trades rows",
]


@dataclass
class Hosts:
    workdir: Path
    certs: CertPaths
    passwords: dict[str, str]
    vps_redis: SecureRedisServer
    brain_redis: SecureRedisServer
    vps_questdb: QuestDBServer
    brain_questdb: QuestDBServer
    questdb_password: str
    reader_password: str

    def url(self, host: str, user: str, password: str | None = None) -> str:
        server = self.vps_redis if host == "vps" else self.brain_redis
        return server.url_for(user, password or self.passwords[f"{host.upper()}_REDIS_{user.upper()}_PASSWORD"])

    def admin(self, host: str) -> redis.Redis:
        tls = {}
        if host == "brain":
            tls = {"ssl_ca_certs": str(self.certs.ca), "ssl_certfile": str(self.certs.client_cert),
                   "ssl_keyfile": str(self.certs.client_key)}  # fmt: skip
        return redis.Redis.from_url(self.url(host, "admin"), socket_timeout=10, **tls)

    def operator_env(self) -> dict[str, str]:
        """What an operator gives `tickbridge status` for both hosts: the `monitor` users (the VPS password
        from a file, as compose mounts it; the Brain's in its URL), the client certificate, the QuestDB logins
        (the Brain's read-only one)."""
        monitor_file = self.workdir / "vps_redis_monitor_password"
        monitor_file.write_text(self.passwords["VPS_REDIS_MONITOR_PASSWORD"] + "\n")
        monitor_file.chmod(0o400)
        questdb_file = self.workdir / "questdb_password"
        questdb_file.write_text(self.questdb_password + "\n")
        questdb_file.chmod(0o400)
        return {
            "VPS_REDIS_URL": f"redis://monitor@127.0.0.1:{self.vps_redis.port}/0",
            "VPS_REDIS_PASSWORD_FILE": str(monitor_file),
            "BRAIN_REDIS_URL": self.url("brain", "monitor"),
            **self.certs.client_env(),
            "VPS_QUESTDB_URL": self.vps_questdb.url,
            "BRAIN_QUESTDB_URL": self.brain_questdb.url,
            "QUESTDB_USER": USER,
            "QUESTDB_PASSWORD_FILE": str(questdb_file),
            "QUESTDB_READER_USER": READER,
            "QUESTDB_READER_PASSWORD": self.reader_password,
            "BRAIN_QUESTDB_PG_URL": f"postgresql://127.0.0.1:{self.brain_questdb.pg_port}/qdb",
        }


def questdb_with_logins(workdir: Path, password: str, reader_password: str | None = None) -> QuestDBServer:
    conf = {"http.user": USER, "http.password": password, "pg.user": USER, "pg.password": password}
    if reader_password is not None:
        conf |= {"pg.readonly.user.enabled": "true", "pg.readonly.user": READER,
                 "pg.readonly.password": reader_password}  # fmt: skip
    return QuestDBServer(workdir=workdir, extra_conf=conf)


async def seed_questdb(hosts: Hosts) -> None:
    """Tables as the writer and the forwarder make them, a few trades applied."""
    settings = Settings(_env_file=None, questdb_user=USER, questdb_password=hosts.questdb_password)  # type: ignore[call-arg]
    buffer = SpillBuffer(hosts.vps_questdb.url, settings)
    brain = QuestDBHttp(hosts.brain_questdb.url, settings)
    try:
        await buffer.ensure_table()
        await brain.exec(TRADES_DDL)
        await brain.exec(
            "INSERT INTO trades VALUES "
            + ", ".join(f"(now(), 'binance_spot', 'BTCUSDT', 'buy', 1.0, 2.0, {i}, now())" for i in range(3))
        )
        await brain.wait_applied("trades")
    finally:
        await buffer.close()
        await brain.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hosts]:
    workdir = tmp_path_factory.mktemp("status")
    certs = make_certs(workdir / "certs")
    passwords = {n: secrets.token_urlsafe(24) for n in acl_variables(VPS_ACL.read_text() + BRAIN_ACL.read_text())}
    questdb_password, reader_password = secrets.token_hex(24), secrets.token_hex(24)
    h = Hosts(
        workdir=workdir,
        certs=certs,
        passwords=passwords,
        vps_redis=SecureRedisServer(
            aclfile=render_acl(VPS_ACL, workdir / "vps.acl", passwords), workdir=workdir / "vps-redis"
        ),
        brain_redis=SecureRedisServer(
            aclfile=render_acl(BRAIN_ACL, workdir / "brain.acl", passwords),
            certs=certs,
            plain_port=False,
            workdir=workdir / "brain-redis",
        ),
        vps_questdb=questdb_with_logins(workdir / "vps-questdb", questdb_password),
        brain_questdb=questdb_with_logins(workdir / "brain-questdb", questdb_password, reader_password),
        questdb_password=questdb_password,
        reader_password=reader_password,
    )
    servers = [h.vps_redis, h.brain_redis, h.vps_questdb, h.brain_questdb]
    try:
        for server in servers:
            server.start()
        with h.admin("vps") as vps, h.admin("brain") as brain:
            ids = [vps.xadd(STREAM, {"k": "t", "n": str(i)}) for i in range(5)]
            vps.hset(keys.FORWARDER_STATE, mapping={"mode": "direct", "confirmed_id": ids[-1]})
            for i in range(4):
                brain.xadd(STREAM, {"k": "t", "n": str(i)})
            brain.xgroup_create(STREAM, GROUP, id="0")
        asyncio.run(seed_questdb(h))
        yield h
    finally:
        for server in reversed(servers):
            server.stop()


def status(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`tickbridge status ARGS` as a separate process, from a directory without `.env`."""
    base = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd), "COLUMNS": "160"}
    return subprocess.run([sys.executable, "-m", "tickbridge", "status", *args], env={**base, **env}, cwd=cwd,
                          capture_output=True, text=True, timeout=90, check=False)  # fmt: skip


def figure(out: str, label: str) -> str:
    """The figure cell of a row of the printed table."""
    for line in out.splitlines():
        cells = [c.strip() for c in re.split(r"[│┃]", line)]
        if label in cells:
            return cells[cells.index(label) + 1]
    raise AssertionError(f"no row {label!r} in:\n{out}")


def test_status_shows_every_figure_of_a_tls_acl_deployment(hosts: Hosts, tmp_path: Path) -> None:
    proc = status(hosts.operator_env(), "--once", "--interval", "0.5", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "could not read" not in out and "?" not in out, out
    figures = {label: figure(out, label) for label in FIGURES}
    assert figures == {
        "VPS stream length": "5",
        "forwarder mode": "direct",
        "forwarder confirmed ID": figures["forwarder confirmed ID"],
        "VPS QuestDB buffer rows": "0",
        "Brain stream length": "4",
        "Brain consumer lag / pending": "4 / 0",
        "Brain QuestDB trades rows": "3",
    }, out
    assert re.fullmatch(r"\d+-\d+", figures["forwarder confirmed ID"]), figures
    # Nothing secret is printed.
    for secret in (hosts.passwords["BRAIN_REDIS_MONITOR_PASSWORD"], hosts.reader_password, hosts.questdb_password):
        assert secret not in proc.stdout + proc.stderr


def test_status_of_one_compose_host_reads_only_that_host(hosts: Hosts, tmp_path: Path) -> None:
    """On a compose host only its own servers are reachable: `--host brain` reads only the Brain's."""
    env = hosts.operator_env()
    env["VPS_REDIS_URL"] = f"redis://monitor@127.0.0.1:{free_port()}/0"  # not reachable from the Brain
    proc = status(env, "--once", "--host", "brain", "--interval", "0", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert figure(proc.stdout, "Brain QuestDB trades rows") == "3"
    assert "VPS" not in proc.stdout and "could not read" not in proc.stdout


def test_status_names_each_source_it_could_not_read_and_why(hosts: Hosts, tmp_path: Path) -> None:
    wrong_redis, wrong_questdb = secrets.token_hex(24), secrets.token_hex(24)
    env = hosts.operator_env()
    env.pop("VPS_REDIS_PASSWORD_FILE")
    env.pop("QUESTDB_PASSWORD_FILE")
    env |= {
        "VPS_REDIS_URL": hosts.url("vps", "monitor", wrong_redis),  # a wrong password
        "QUESTDB_PASSWORD": wrong_questdb,  # the VPS QuestDB refuses it
        "BRAIN_QUESTDB_PG_URL": f"postgresql://127.0.0.1:{free_port()}/qdb",  # nothing listens
    }
    proc = status(env, "--once", "--interval", "0", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("could not read ")]
    by_source = {line.split(" (", 1)[0].removeprefix("could not read "): line for line in lines}
    assert set(by_source) == {"VPS Redis", "VPS QuestDB", "Brain QuestDB"}, proc.stdout
    assert re.search(r"WRONGPASS|invalid username-password", by_source["VPS Redis"], re.I), by_source
    assert re.search(r"401|unauthori[sz]ed|credentials|auth", by_source["VPS QuestDB"], re.I), by_source
    assert re.search(r"refused|connect call failed", by_source["Brain QuestDB"], re.I), by_source
    assert "as tbreader" in by_source["Brain QuestDB"]
    # The Brain's Redis still answered: its figures are there; the failed ones are marked, not blank.
    assert figure(proc.stdout, "Brain stream length") == "4"
    assert figure(proc.stdout, "VPS stream length") == "?"
    assert wrong_redis not in proc.stdout + proc.stderr and wrong_questdb not in proc.stdout + proc.stderr


def test_status_without_the_client_certificate_says_so(hosts: Hosts, tmp_path: Path) -> None:
    """The Brain's TLS port refuses a client without our certificate: the reason names TLS, not a blank."""
    env = hosts.operator_env()
    for name in ("REDIS_TLS_CERT", "REDIS_TLS_KEY"):
        env.pop(name)
    proc = status(env, "--once", "--host", "brain", "--interval", "0", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("could not read Brain Redis"))
    assert re.search(r"ssl|tls|certificate|reset|closed", line, re.I), line


def test_status_shows_the_live_lane_process() -> None:
    """Issue 16: the live lane (its own process under compose) shows on, idle or not reporting."""
    from tickbridge.ops.status import live_lane_line

    now = 1_800_000_000.0
    assert live_lane_line({}, now).startswith("no report")
    on = {b"live_updated": b"1799999999.8", b"live_cursor": b"1799999999500-3"}
    assert live_lane_line(on, now).startswith("ON:") and "0.5s behind" in live_lane_line(on, now)
    assert live_lane_line({b"live_updated": b"1799999999.8", b"live_cursor": b""}, now).startswith("idle")
    assert live_lane_line({b"live_updated": b"1799999990"}, now).startswith("NOT REPORTING for 10s")
