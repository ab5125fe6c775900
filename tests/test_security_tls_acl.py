"""The VPS -> Brain link against real redis-servers with TLS and the committed ACL files (issue 7).

Nobody who does not belong gets in: plaintext, no certificate, another CA's certificate, the default
user, a wrong password are all refused; each role's user can run what the role needs and nothing else.
"""

from __future__ import annotations

import secrets
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, NoPermissionError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

from tickbridge.brain.common import load_functions
from tickbridge.core import keys
from tickbridge.core.redis_io import execute_packed, make_client
from tickbridge.core.settings import Settings
from tickbridge.core.tick import Trade
from tickbridge.core.wire import encode_tick
from tickbridge.ops.acl import AclRenderError, acl_variables, render_acl, render_acl_text
from tickbridge_dev.devstack.servers import REPO_ROOT, ServerError
from tickbridge_dev.devstack.tls import BRAIN_ACL, CERTS_SCRIPT, VPS_ACL, CertPaths, SecureRedisServer, make_certs

pytestmark = pytest.mark.timeout(60)

STREAM = "market:vps:stream"
GROUP = "brain-consumer-group"
TRADES = "market:binance_spot:trades:BTCUSDT"
DEPTH = "market:binance_spot:depth:BTCUSDT"
WARM = "market:binance_spot:warm:BTCUSDT"
TS = 1_723_161_255_343_000
TRADE_FIELDS = encode_tick(Trade("BTCUSDT", "61000.10", "0.002", "BUY", TS, 1, TS + 5))
REFUSED = (RedisConnectionError, ConnectionError, OSError, ssl.SSLError)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    return make_certs(tmp_path_factory.mktemp("pki") / "certs")


@pytest.fixture(scope="module")
def other_certs(tmp_path_factory: pytest.TempPathFactory) -> CertPaths:
    """A second, unrelated private CA with its own client certificate (an outsider)."""
    return make_certs(tmp_path_factory.mktemp("pki-other") / "certs")


@pytest.fixture
def passwords() -> dict[str, str]:
    names = acl_variables(VPS_ACL.read_text()) + acl_variables(BRAIN_ACL.read_text())
    return {name: secrets.token_urlsafe(24) for name in names}


@pytest.fixture
def secure_factory(tmp_path: Path) -> Iterator[Callable[..., SecureRedisServer]]:
    started: list[SecureRedisServer] = []

    def start(**kwargs: Any) -> SecureRedisServer:
        server = SecureRedisServer(workdir=tmp_path / f"sredis{len(started)}", **kwargs)
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def vps(
    secure_factory: Callable[..., SecureRedisServer], passwords: dict[str, str], tmp_path: Path
) -> SecureRedisServer:
    """The VPS Redis: plain port on loopback, ACLs on."""
    return secure_factory(aclfile=render_acl(VPS_ACL, tmp_path / "vps.acl", passwords))


@pytest.fixture
def brain(
    secure_factory: Callable[..., SecureRedisServer], passwords: dict[str, str], certs: CertPaths, tmp_path: Path
) -> SecureRedisServer:
    """The Brain Redis: TLS only (client certificates required), ACLs on."""
    return secure_factory(
        aclfile=render_acl(BRAIN_ACL, tmp_path / "brain.acl", passwords), certs=certs, plain_port=False
    )


def tls_settings(ca: Path | None = None, cert: Path | None = None, key: Path | None = None) -> Settings:
    return Settings(
        redis_tls_ca=str(ca) if ca else None,
        redis_tls_cert=str(cert) if cert else None,
        redis_tls_key=str(key) if key else None,
    )


def client_for(server: SecureRedisServer, host: str, user: str, passwords: dict[str, str]) -> aioredis.Redis:
    """What the role itself builds: `make_client(url, settings)` with its user and the TLS files."""
    password = passwords[f"{host.upper()}_REDIS_{user.upper()}_PASSWORD"]
    settings = tls_settings(*(
        (server.certs.ca, server.certs.client_cert, server.certs.client_key) if server.certs else ()
    ))  # fmt: skip
    return make_client(server.url_for(user, password), settings, timeout=5)


# -- certificates ------------------------------------------------------------------------------------


def test_certs_script_issues_a_chain_keeps_it_and_keeps_keys_private(tmp_path: Path) -> None:
    out = tmp_path / "certs"
    paths = make_certs(out)
    first_ca = paths.ca.read_bytes()
    for leaf, purpose in ((paths.server_cert, "sslserver"), (paths.client_cert, "sslclient")):
        subprocess.run(["openssl", "verify", "-purpose", purpose, "-CAfile", str(paths.ca), str(leaf)], check=True,
                       capture_output=True)  # fmt: skip
    for key in (paths.server_key, paths.client_key, out / "ca.key"):
        assert key.stat().st_mode & 0o077 == 0, f"{key.name} readable by others"
    # A second run keeps the CA (re-issuing it would invalidate every deployed certificate).
    make_certs(out)
    assert paths.ca.read_bytes() == first_ca
    # FORCE=1 rotates everything.
    subprocess.run(["bash", str(CERTS_SCRIPT), str(out)], check=True, capture_output=True,
                   env={"PATH": "/usr/bin:/bin", "FORCE": "1"})  # fmt: skip
    assert paths.ca.read_bytes() != first_ca


def test_generated_certificates_and_env_files_are_ignored_by_git() -> None:
    for path in ("certs/ca.key", "certs/client.key", ".env"):
        result = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", path], check=False)
        assert result.returncode == 0, f"{path} is not git-ignored: a secret could be committed"


# -- TLS ---------------------------------------------------------------------------------------------


async def test_plaintext_to_the_tls_port_is_refused(brain: SecureRedisServer, passwords: dict[str, str]) -> None:
    # Raw bytes: the server expects a TLS handshake and drops the connection without answering.
    with socket.create_connection(("127.0.0.1", brain.tls_port), timeout=5) as sock:
        sock.sendall(b"PING\r\n")
        try:
            reply = sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            reply = b""
    assert b"PONG" not in reply and b"NOAUTH" not in reply
    # A client configured for plaintext (redis://) cannot talk to it either.
    url = f"redis://forwarder:{passwords['BRAIN_REDIS_FORWARDER_PASSWORD']}@127.0.0.1:{brain.tls_port}/0"
    client = make_client(url, None, timeout=3)
    try:
        with pytest.raises(REFUSED):
            await client.ping()
    finally:
        await client.aclose()
    assert brain.plain_port is False  # and nothing listens in plaintext at all


async def assert_refused(client: aioredis.Redis) -> None:
    try:
        with pytest.raises(REFUSED):
            await client.xadd(STREAM, {"x": "1"}, id="9-1")
    finally:
        await client.aclose()


async def test_client_without_a_certificate_is_refused(brain: SecureRedisServer, passwords: dict[str, str]) -> None:
    assert brain.certs is not None
    url = brain.url_for("forwarder", passwords["BRAIN_REDIS_FORWARDER_PASSWORD"])
    await assert_refused(make_client(url, tls_settings(brain.certs.ca), timeout=3))


async def test_client_certificate_from_another_ca_is_refused(
    brain: SecureRedisServer, passwords: dict[str, str], other_certs: CertPaths
) -> None:
    assert brain.certs is not None
    url = brain.url_for("forwarder", passwords["BRAIN_REDIS_FORWARDER_PASSWORD"])
    # Trusts the real server, but presents a certificate our CA never signed, with the right password.
    settings = tls_settings(brain.certs.ca, other_certs.client_cert, other_certs.client_key)
    await assert_refused(make_client(url, settings, timeout=3))


async def test_server_not_signed_by_our_ca_is_refused_by_the_client(
    brain: SecureRedisServer, passwords: dict[str, str], other_certs: CertPaths
) -> None:
    """An impostor Brain (here: the real one seen through another CA) never receives the password."""
    assert brain.certs is not None
    url = brain.url_for("forwarder", passwords["BRAIN_REDIS_FORWARDER_PASSWORD"])
    settings = tls_settings(other_certs.ca, brain.certs.client_cert, brain.certs.client_key)
    await assert_refused(make_client(url, settings, timeout=3))


async def test_server_certificate_for_another_name_is_refused(
    secure_factory: Callable[..., SecureRedisServer], passwords: dict[str, str], tmp_path: Path
) -> None:
    """Signed by our CA but issued for another host: the client checks the name, not only the CA."""
    certs = make_certs(tmp_path / "other-name", server_san="DNS:brain.invalid")
    server = secure_factory(aclfile=render_acl(BRAIN_ACL, tmp_path / "b.acl", passwords), certs=certs,
                            plain_port=False)  # fmt: skip
    url = server.url_for("forwarder", passwords["BRAIN_REDIS_FORWARDER_PASSWORD"])
    await assert_refused(make_client(url, tls_settings(certs.ca, certs.client_cert, certs.client_key), timeout=3))


async def test_forwarder_appends_over_tls_with_its_user(brain: SecureRedisServer, passwords: dict[str, str]) -> None:
    client = client_for(brain, "brain", "forwarder", passwords)
    try:
        assert await client.xadd(STREAM, dict(zip(TRADE_FIELDS[::2], TRADE_FIELDS[1::2], strict=True)), id="5-1")
        # The same ID again is recognised (not a permission problem): exactly-once still works.
        with pytest.raises(ResponseError, match="equal or smaller"):
            await client.xadd(STREAM, {"x": "1"}, id="5-1")
        assert (await client.xinfo_stream(STREAM))["length"] == 1  # XINFO, not XLEN: the forwarder's own read
    finally:
        await client.aclose()


# -- authentication ----------------------------------------------------------------------------------


async def test_default_user_and_wrong_passwords_are_refused(vps: SecureRedisServer, passwords: dict[str, str]) -> None:
    anonymous = make_client(f"redis://127.0.0.1:{vps.port}/0", None, timeout=3)
    try:
        with pytest.raises(AuthenticationError):
            await anonymous.ping()
        with pytest.raises((AuthenticationError, ResponseError)):
            await anonymous.execute_command("AUTH", "default", "")  # type: ignore[no-untyped-call]
    finally:
        await anonymous.aclose()
    for user, password in (("collector", "wrong"), ("default", ""), ("nobody", "x"),
                           ("collector", passwords["VPS_REDIS_FORWARDER_PASSWORD"])):  # fmt: skip
        client = make_client(vps.url_for(user, password), None, timeout=3)
        try:
            with pytest.raises(AuthenticationError):
                await client.ping()
        finally:
            await client.aclose()


def test_unrendered_acl_template_cannot_start_a_server(tmp_path: Path) -> None:
    """The committed file used as-is must not give anyone a known password: redis-server refuses it."""
    server = SecureRedisServer(aclfile=VPS_ACL, workdir=tmp_path / "r")
    server.startup_timeout = 10
    with pytest.raises(ServerError):
        server.start()


def test_acl_rendering_names_the_missing_variable_and_stores_only_hashes(passwords: dict[str, str]) -> None:
    text = VPS_ACL.read_text()
    missing = dict(passwords)
    del missing["VPS_REDIS_FORWARDER_PASSWORD"]
    with pytest.raises(AclRenderError, match="VPS_REDIS_FORWARDER_PASSWORD"):
        render_acl_text(text, missing)
    with pytest.raises(AclRenderError, match="VPS_REDIS_MONITOR_PASSWORD"):
        render_acl_text(text, {**passwords, "VPS_REDIS_MONITOR_PASSWORD": ""})
    rendered = render_acl_text(text, passwords)
    assert not any(pw in rendered for pw in passwords.values())
    assert "#@" not in rendered


@pytest.mark.parametrize("value", ["change-me-vps-redis-monitor-password", "Change-Me-please-0123456789", "hunter2"])
def test_acl_rendering_refuses_placeholder_and_short_passwords(passwords: dict[str, str], value: str) -> None:
    """`.env.example`'s placeholders can never become live Redis passwords (the compose `init` step renders
    the ACL with this function, so Redis would not start), nor can a guessable short one."""
    with pytest.raises(AclRenderError, match=r"^config error: VPS_REDIS_MONITOR_PASSWORD: ") as exc:
        render_acl_text(VPS_ACL.read_text(), {**passwords, "VPS_REDIS_MONITOR_PASSWORD": value})
    assert value not in str(exc.value)


@pytest.mark.parametrize("template", [VPS_ACL, BRAIN_ACL], ids=["vps", "brain"])
def test_committed_acl_files_hold_no_secret_and_no_open_user(template: Path) -> None:
    lines = template.read_text().splitlines()
    default = next(line.split() for line in lines if line.startswith("user default "))
    assert "off" in default and "on" not in default and "nopass" not in default
    for line in lines:
        tokens = line.split()
        assert tokens[0] == "user", line
        assert "nopass" not in tokens, f"{tokens[1]} has no password"
        assert not any(t.startswith(">") for t in tokens), f"{tokens[1]}: plaintext password in the repo"
        if tokens[1] != "default":
            assert sum(t.startswith("#@") for t in tokens) == 1, f"{tokens[1]}: password must come from the env"


# -- least privilege per role ------------------------------------------------------------------------

Cmd = Sequence[str | int]

#: What each role's code runs on each host (allowed) and a selection of what it must not (denied).
COMMON_DENIED: list[Cmd] = [
    ["FLUSHALL"], ["FLUSHDB"], ["KEYS", "*"], ["CONFIG", "GET", "*"], ["CONFIG", "SET", "appendonly", "no"],
    ["XDEL", STREAM, "1-1"], ["DEL", STREAM], ["EVAL", "return 1", "0"], ["ACL", "LIST"], ["SAVE"],
    ["FUNCTION", "FLUSH"], ["PUBLISH", "news", "x"], ["SET", "unrelated:key", "1"], ["REPLICAOF", "NO", "ONE"],
    ["CLIENT", "KILL", "TYPE", "normal"], ["MIGRATE", "127.0.0.1", "1", STREAM, "0", "1000"],
]  # fmt: skip

LUA_LIB = """#!lua name=tbsec
redis.register_function('deliver', function(keys, args)
  redis.call('XADD', keys[2], '*', 'price', args[1])
  redis.call('ZADD', keys[3], args[2], args[1])
  return redis.call('XACK', keys[1], 'brain-consumer-group', args[3])
end)
redis.register_function('forge', function(keys, args)
  return redis.call('XADD', keys[1], '*', 'forged', '1')
end)
"""

#: What redis_exporter 1.45 sends as `monitor` (the compose `redis-exporter` service); CONFIG GET stays denied.
EXPORTER_CMDS: list[Cmd] = [
    ["CLIENT", "SETNAME", "redis_exporter"], ["INFO", "ALL"], ["LATENCY", "LATEST"], ["SLOWLOG", "LEN"],
    ["SLOWLOG", "GET", "1"], ["SELECT", "0"], ["XINFO", "STREAM", STREAM], ["XINFO", "GROUPS", STREAM],
]  # fmt: skip

#: Keys the roles use besides the streams above.
LAST_IDS = "tickbridge:collector:last_trade_id"
LAST_BATCH = "tickbridge:collector:last_batch"
FWD_STATE = "tickbridge:forwarder:state"
C_DEAD = "tickbridge:deadletter:consumer"
W_DEAD = "tickbridge:deadletter:writer"
C_BEAT = "tickbridge:heartbeat:consumer:c1"
W_BEAT = "tickbridge:heartbeat:writer:w1"
WGROUP = "tickbridge-writer"

#: Per user: every command its code sends (allowed; where not obvious, the code that sends it), then what it
#: must not run: each right the user had before issue 14's narrowing (none of its code sends it) and other
#: roles' keys. CLIENT SETNAME/ID are denied everywhere: `make_client` sets no name (redis-py 8 connects with
#: HELLO 3 AUTH, which every user may send, and CLIENT SETINFO, an unknown command on Redis 7.0).
ROLE_CASES: dict[tuple[str, str], tuple[list[Cmd], list[Cmd]]] = {
    ("vps", "collector"): (  # collector/service.py (start) and collector/publisher.py (batches, lost replies, probes)
        [["HGETALL", LAST_IDS], ["ZRANGE", WARM, -1, -1, "WITHSCORES"],  # start: last trade IDs and times
         ["SPOP", keys.BOOK_REQUESTS, 1024],  # the Brain's whole-book requests (issue 17)
         ["XADD", STREAM, "*", *TRADE_FIELDS],
         ["XADD", "tickbridge:deadletter:collector", "MAXLEN", "~", 10000, "*", "raw", "{bad"],
         ["ZADD", WARM, TS, "t1"], ["ZREMRANGEBYSCORE", WARM, "-inf", f"({TS - 1}"], ["HSET", LAST_IDS, "BTCUSDT", 1],
         ["SET", LAST_BATCH, "token"],  # in the MULTI: the batch token ...
         ["GET", LAST_BATCH],  # ... read back after an EXEC whose reply was lost
         ["XLEN", STREAM], ["XLEN", "tickbridge:deadletter:collector"], ["HGET", LAST_IDS, "-"], ["ZCARD", WARM],
         ["PING"]],  # redis-py's health check
        [["HMGET", LAST_IDS, "BTCUSDT"], ["ZRANGEBYSCORE", WARM, "-inf", "+inf"], ["EXPIRE", LAST_BATCH, 10],
         ["PEXPIRE", LAST_BATCH, 10], ["DISCARD"], ["CLIENT", "SETNAME", "x"], ["CLIENT", "ID"],
         ["SET", "tickbridge:heartbeat:collector:vps1", "1", "EX", 10], ["SET", STREAM, "x"], ["SET", WARM, "x"],
         ["SET", LAST_IDS, "x"], ["HSET", WARM, "a", 1], ["HSET", "tickbridge:collector:other", "a", 1],
         ["XADD", WARM, "*", "a", 1], ["ZADD", STREAM, 1, "x"],
         ["XTRIM", STREAM, "MAXLEN", 0], ["XRANGE", STREAM, "-", "+"], ["HSET", FWD_STATE, "a", 1],
         ["SET", "tickbridge:heartbeat:forwarder:x", "1"], ["XADD", C_DEAD, "*", "a", 1]],
    ),
    ("vps", "forwarder"): (  # exactly what forwarder/service.py sends (issue 14)
        [["XRANGE", STREAM, "-", "+", "COUNT", 10], ["XREVRANGE", STREAM, "+", "-", "COUNT", 1],
         ["XREAD", "COUNT", 10, "STREAMS", STREAM, "0"], ["XLEN", STREAM],
         ["MEMORY", "USAGE", STREAM], ["XTRIM", STREAM, "MINID", "0"], ["HSET", FWD_STATE, "acked", "1-1"],
         ["SADD", keys.BOOK_REQUESTS, "BTCUSDT"],  # relayed whole-book requests (issue 17)
         ["HGETALL", FWD_STATE], ["HDEL", FWD_STATE, "spill_pending"], ["PING"]],
        [["XADD", STREAM, "*", "forged", 1], ["ZADD", WARM, 1, "x"], ["HSET", LAST_IDS, "BTCUSDT", 0],
         ["XREADGROUP", "GROUP", GROUP, "c", "STREAMS", STREAM, ">"], ["XINFO", "STREAM", STREAM],
         ["HGET", FWD_STATE, "acked"], ["SET", "tickbridge:heartbeat:forwarder:vps1", "1"],
         ["CLIENT", "SETNAME", "x"]],
    ),
    ("vps", "monitor"): (
        [["PING"], ["INFO", "memory"], ["XLEN", STREAM], ["XINFO", "STREAM", STREAM], ["MEMORY", "USAGE", STREAM],
         ["DBSIZE"], ["SCAN", "0", "MATCH", "tickbridge:heartbeat:*"], ["TTL", "tickbridge:heartbeat:collector:x"],
         ["HGETALL", "tickbridge:forwarder:state"], *EXPORTER_CMDS],
        [["SET", "tickbridge:heartbeat:monitor:x", "1"], ["XADD", STREAM, "*", "a", 1], ["XTRIM", STREAM, "MAXLEN",
         0], ["HSET", "tickbridge:forwarder:state", "acked", "0-0"], ["XRANGE", STREAM, "-", "+"]],
    ),
    ("brain", "forwarder"): (  # exactly what forwarder/service.py sends (issue 14): no group creation
        [["XADD", STREAM, "7-1", *TRADE_FIELDS], ["XINFO", "STREAM", STREAM], ["XINFO", "GROUPS", STREAM],
         ["SRANDMEMBER", keys.BOOK_WANTED, 1024], ["SREM", keys.BOOK_WANTED, "BTCUSDT"],  # book requests (issue 17)
         ["PING"]],
        [["XGROUP", "CREATE", STREAM, "stray", "0"], ["XGROUP", "CREATECONSUMER", STREAM, GROUP, "f"],
         ["XSETID", STREAM, "99-1"], ["XLEN", STREAM], ["XREVRANGE", STREAM, "+", "-", "COUNT", 1],
         ["SET", "tickbridge:heartbeat:forwarder:vps1", "1", "EX", 10],
         ["XREADGROUP", "GROUP", GROUP, "f", "STREAMS", STREAM, ">"], ["XACK", STREAM, GROUP, "1-1"],
         ["XTRIM", STREAM, "MAXLEN", 0], ["XGROUP", "DESTROY", STREAM, GROUP], ["XGROUP", "SETID", STREAM, GROUP,
         "$"], ["XADD", TRADES, "*", *TRADE_FIELDS], ["FUNCTION", "LOAD", LUA_LIB], ["XRANGE", STREAM, "-", "+"]],
    ),
    ("brain", "consumer"): (  # brain/consumer.py + brain.lua (functions run with the caller's rights), and as
        # this user `tickbridge deadletters [--replay]` and `tickbridge check consumer --heartbeat` (compose)
        [["FUNCTION", "LOAD", "REPLACE", LUA_LIB], ["XGROUP", "CREATE", STREAM, "other-group", "0", "MKSTREAM"],
         ["XREADGROUP", "GROUP", GROUP, "consumer-1", "COUNT", 10, "STREAMS", STREAM, ">"],
         ["XAUTOCLAIM", STREAM, GROUP, "consumer-1", 0, "0-0", "COUNT", 10],
         ["XPENDING", STREAM, GROUP, "-", "+", 10, "consumer-1"],  # delivery counts of recovered entries
         ["FCALL", "deliver", 3, STREAM, TRADES, WARM, "61000.1", TS, "1-1"],
         # inside the ingest and replay functions:
         ["XADD", TRADES, "*", *TRADE_FIELDS], ["XADD", DEPTH, "*", "bids", "[]"],
         ["XADD", C_DEAD, "MAXLEN", "=", 10000, "*", "raw", "x"], ["XLEN", C_DEAD], ["XACK", STREAM, GROUP, "1-1"],
         ["XDEL", TRADES, "1-1"], ["XDEL", C_DEAD, "1-1"], ["ZADD", WARM, TS, "t1"],
         # the group as a cursor (issue 20): XREAD from it, moved by the ingest call
         ["XREAD", "COUNT", 10, "STREAMS", STREAM, "0-0"], ["XINFO", "STREAM", STREAM],
         ["XGROUP", "SETID", STREAM, GROUP, "0-0", "ENTRIESREAD", 0],
         ["ZRANGE", WARM, -1, -1, "WITHSCORES"], ["ZREMRANGEBYSCORE", WARM, "-inf", f"({TS - 1}"],
         ["XRANGE", C_DEAD, "-", "+", "COUNT", 10],  # tickbridge deadletters (and the replay function)
         # the monitor loop (metrics, heartbeat, trimming):
         ["XINFO", "GROUPS", STREAM], ["XPENDING", STREAM, GROUP], ["XREVRANGE", STREAM, "+", "-", "COUNT", 1],
         ["XRANGE", STREAM, "(0-1", "+", "COUNT", 1], ["SET", C_BEAT, "1", "EX", 15],
         ["INFO", "memory"],  # BrainRedisMemoryHigh's gauges (issue 14); INFO's other sections stay denied
         ["XTRIM", STREAM, "MINID", "~", "0-0"],
         ["GET", C_BEAT],  # tickbridge check consumer --heartbeat (the container's health check)
         ["PING"]],
        [["XCLAIM", STREAM, GROUP, "c", 0, "1-1"], ["XINFO", "CONSUMERS", STREAM, GROUP],
         ["XGROUP", "CREATECONSUMER", STREAM, GROUP, "c"], ["DISCARD"], ["XGROUP", "SETID", TRADES, GROUP, "0-0"],
         ["HSET", "tickbridge:consumer:x", "a", 1], ["HGET", "tickbridge:consumer:x", "a"],
         ["HGETALL", "tickbridge:consumer:x"], ["GET", "tickbridge:consumer:x"], ["SET", "tickbridge:consumer:x", 1],
         ["EXPIRE", C_BEAT, 10], ["PEXPIRE", C_BEAT, 10], ["FUNCTION", "LIST"], ["FCALL_RO", "forge", 1, STREAM],
         ["CLIENT", "SETNAME", "x"], ["CLIENT", "ID"], ["XLEN", STREAM],
         ["SET", STREAM, "x"], ["SET", TRADES, "x"], ["SET", WARM, "x"],  # SET would replace any key: heartbeat only
         # the writer's per-symbol streams: append and undo only (no reading, group, or trimming)
         ["XTRIM", TRADES, "MAXLEN", 0], ["XRANGE", TRADES, "-", "+"], ["XGROUP", "CREATE", TRADES, "stray", "0"],
         ["XREADGROUP", "GROUP", WGROUP, "c", "STREAMS", TRADES, ">"], ["XACK", TRADES, WGROUP, "1-1"],
         ["ZADD", TRADES, 1, "x"],
         ["XADD", STREAM, "*", "forged", 1], ["FCALL", "forge", 1, STREAM], ["XGROUP", "DESTROY", STREAM, GROUP],
         ["INFO", "server"], ["INFO"],
         ["DEL", TRADES], ["FUNCTION", "DELETE", "tbsec"], ["HSET", FWD_STATE, "a", 1],
         ["XDEL", STREAM, "1-1"], ["XADD", WARM, "*", "a", 1]],
    ),
    ("brain", "writer"): (  # brain/writer*.py, and as this user `tickbridge check writer --heartbeat` (compose)
        [["XGROUP", "CREATE", TRADES, WGROUP, "0", "MKSTREAM"],
         ["XREAD", "COUNT", 10, "STREAMS", TRADES, "0-0"],  # from its group's position (issue 20)
         ["XGROUP", "SETID", TRADES, WGROUP, "0-0", "ENTRIESREAD", 0],  # moved once QuestDB confirmed
         ["XINFO", "STREAM", TRADES], ["XRANGE", TRADES, "(0-0", "+", "COUNT", 1],  # the group's lag kept valid
         ["XACK", TRADES, WGROUP, "1-1"], ["XPENDING", TRADES, WGROUP],  # an older writer's pending list
         ["XINFO", "GROUPS", TRADES],
         ["XTRIM", TRADES, "MINID", "~", "0-0"], ["SET", W_BEAT, "1", "EX", 15],
         ["SCAN", "0", "MATCH", "market:*:trades:*", "COUNT", 1000, "TYPE", "stream"],
         ["TYPE", TRADES],  # a skipped key (not a stream) is looked at again: WriterKeySkipped clears
         ["XADD", W_DEAD, "*", "stream", TRADES, "src_id", "1-1", "reason", "x"],  # in a MULTI with the SETIDs
         ["GET", W_BEAT],  # tickbridge check writer --heartbeat (the container's health check)
         ["PING"]],
        [["XCLAIM", TRADES, WGROUP, "w", 0, "1-1"], ["XGROUP", "CREATECONSUMER", TRADES, WGROUP, "w"],
         ["XREADGROUP", "GROUP", WGROUP, "w1", "COUNT", 10, "STREAMS", TRADES, ">"],
         ["XAUTOCLAIM", TRADES, WGROUP, "w1", 0, "0-0"], ["XLEN", TRADES], ["DISCARD"],
         ["HSET", "tickbridge:writer:x", "a", 1], ["HGET", "tickbridge:writer:x", "a"],
         ["HGETALL", "tickbridge:writer:x"], ["GET", "tickbridge:writer:x"], ["SET", "tickbridge:writer:x", 1],
         ["EXPIRE", W_BEAT, 10], ["PEXPIRE", W_BEAT, 10], ["CLIENT", "SETNAME", "x"], ["CLIENT", "ID"],
         ["SET", TRADES, "x"], ["XDEL", W_DEAD, "1-1"],
         ["XADD", TRADES, "*", "forged", 1], ["XREADGROUP", "GROUP", GROUP, "w", "STREAMS", STREAM, ">"],
         ["XADD", STREAM, "*", "a", 1], ["DEL", TRADES], ["ZADD", WARM, 1, "x"], ["FUNCTION", "LOAD", LUA_LIB]],
    ),
    ("brain", "reader"): (  # brain/tiered.py (TieredMarketData) and brain/query.py (`tickbridge query`)
        [["XINFO", "STREAM", TRADES],  # HOT prefill: the stream's last ID
         ["ZRANGE", WARM, -50, -1, "WITHSCORES"], ["ZRANGE", WARM, 0, TS, "BYSCORE", "LIMIT", 0, 10, "WITHSCORES"],
         ["XREAD", "COUNT", 1000, "STREAMS", TRADES, "0"],  # HOT follower
         ["XINFO", "STREAM", DEPTH], ["XREAD", "COUNT", 1000, "STREAMS", DEPTH, "0"],  # HOT books (issue 17)
         ["FCALL_RO", "tickbridge_book_read", 4, *keys.book_keys("BTCUSDT"), 20],  # book() (WARM)
         ["XINFO", "GROUPS", TRADES], ["XPENDING", TRADES, WGROUP], ["XRANGE", TRADES, "-", "+", "COUNT", 10],
         ["PING"]],  # `tickbridge query`'s probe, redis-py's health check
        [["XREVRANGE", TRADES, "+", "-", "COUNT", 1], ["XLEN", TRADES], ["ZRANGEBYSCORE", WARM, "-inf", "+inf"],
         ["ZCARD", WARM], ["TYPE", TRADES], ["EXISTS", TRADES], ["CLIENT", "SETNAME", "x"], ["CLIENT", "ID"],
         ["XRANGE", STREAM, "-", "+"], ["XINFO", "STREAM", STREAM], ["HSET", keys.book_keys("BTCUSDT")[0], "valid", 1],
         ["FCALL", "tickbridge_brain_ingest", 1, STREAM], ["SMEMBERS", "tickbridge:book:wanted"],
         ["XRANGE", C_DEAD, "-", "+"], ["GET", C_BEAT],
         ["XADD", TRADES, "*", "a", "b"], ["ZADD", WARM, 1, "x"], ["XACK", TRADES, WGROUP, "1-1"],
         ["XREADGROUP", "GROUP", WGROUP, "r", "STREAMS", TRADES, ">"], ["XGROUP", "CREATE", TRADES, "r", "0"]],
    ),
    ("brain", "monitor"): (
        [["PING"], ["INFO", "memory"], ["XLEN", STREAM], ["XINFO", "GROUPS", STREAM], ["XPENDING", STREAM, GROUP],
         ["MEMORY", "USAGE", STREAM], ["DBSIZE"], ["SCAN", "0"], ["TTL", "tickbridge:heartbeat:writer:w1"],
         ["ZRANGE", WARM, -100, -1, "WITHSCORES"], ["XREAD", "COUNT", 10, "STREAMS", TRADES, "0"],
         ["XREVRANGE", TRADES, "+", "-", "COUNT", 1], *EXPORTER_CMDS],
        [["XADD", STREAM, "*", "a", 1], ["XACK", STREAM, GROUP, "1-1"], ["SET", "tickbridge:heartbeat:x", "1"],
         ["XREADGROUP", "GROUP", GROUP, "m", "STREAMS", STREAM, ">"], ["XGROUP", "CREATE", TRADES, "m", "0"]],
    ),
}  # fmt: skip


#: The roles whose code sends MULTI/EXEC (the collector's batches, the writer's dead letters).
USES_MULTI = {("vps", "collector"), ("brain", "writer")}


async def prepare(admin: aioredis.Redis, host: str, user: str) -> None:
    """What the other roles would have created before this one runs."""
    await admin.xadd(STREAM, dict(zip(TRADE_FIELDS[::2], TRADE_FIELDS[1::2], strict=True)), id="1-1")
    if host == "brain":
        await admin.xgroup_create(STREAM, GROUP, id="0")
        await admin.xadd(TRADES, {"seed": "1"}, id="1-1")
        await admin.xadd(DEPTH, {"seed": "1"}, id="1-1")
        await load_functions(admin)  # the reader's book read (issue 17) calls the library's read-only function
        if user != "writer":  # the writer creates its group itself
            await admin.xgroup_create(TRADES, WGROUP, id="0")


@pytest.mark.parametrize(("host", "user"), list(ROLE_CASES), ids=[f"{h}-{u}" for h, u in ROLE_CASES])
async def test_role_user_has_what_it_needs_and_nothing_more(
    host: str, user: str, request: pytest.FixtureRequest, passwords: dict[str, str]
) -> None:
    server: SecureRedisServer = request.getfixturevalue(host)
    admin = client_for(server, host, "admin", passwords)
    client = client_for(server, host, user, passwords)
    allowed, denied = ROLE_CASES[(host, user)]
    problems: list[str] = []
    try:
        await prepare(admin, host, user)
        for cmd in allowed:
            # As the roles send them (`execute_packed`: raw replies, errors in place): each must succeed.
            (reply,) = await execute_packed(client, [cmd])
            if isinstance(reply, NoPermissionError):
                problems.append(f"{user} needs {cmd[:3]} but was denied: {reply}")
            elif isinstance(reply, ResponseError):
                problems.append(f"{user}: {cmd[:3]} failed: {reply}")
        async with client.pipeline(transaction=True) as pipe:
            pipe.ping()
            try:
                await pipe.execute()
                multi = True
            except NoPermissionError:
                multi = False
        if multi != ((host, user) in USES_MULTI):
            problems.append(f"{user} {'may run' if multi else 'needs'} MULTI/EXEC")
        before = await admin.dbsize()
        for cmd in [*denied, *COMMON_DENIED]:
            try:
                await client.execute_command(*cmd)  # type: ignore[no-untyped-call]
            except NoPermissionError:
                continue
            except ResponseError as exc:
                if "NOPERM" in str(exc) or "no permissions" in str(exc) or "can't access" in str(exc):
                    continue
                problems.append(f"{user} may run {cmd[:3]} (it failed only on {exc})")
            else:
                problems.append(f"{user} may run {cmd[:3]}")
        assert await admin.dbsize() == before, "a denied command changed the data"
        assert await admin.xlen(STREAM) >= 1, "the stream was damaged"
    finally:
        await client.aclose()
        await admin.aclose()
    assert not problems, "\n".join(problems)
