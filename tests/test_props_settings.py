"""Property tests of the configuration surface (issue 7): the settings loader and ACL rendering.

Whatever a variable holds, a role either starts with a valid configuration or exits with exactly one
line naming the variable; whatever the passwords are, the rendered ACL file holds only their hashes and
a real redis-server lets each user in with its own password and no other.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tickbridge.core.settings import Settings, load_settings
from tickbridge.ops.acl import acl_variables, password_hash, render_acl_text
from tickbridge_dev.devstack.tls import VPS_ACL, SecureRedisServer

pytestmark = pytest.mark.timeout(120 if settings().max_examples <= 1000 else 1800)

VARIABLES = [
    "SYMBOLS", "VPS_REDIS_URL", "BRAIN_REDIS_URL", "VPS_QUESTDB_URL", "BINANCE_WS_URL", "STREAM_KEY",
    "RAM_BUFFER_BYTES", "CONSUMER_BATCH", "METRICS_PORT", "LOG_LEVEL", "WARM_WINDOW_S", "DEPTH_SNAPSHOT_LIMIT",
    "CONSUMER_MAX_DELIVERIES", "FORWARD_BATCH", "REDIS_TLS_CA", "QUESTDB_PASSWORD",
]  # fmt: skip
# Environment values cannot hold NUL; anything else can come from a hand-edited .env.
chars = st.characters(codec="utf-8", exclude_characters="\x00")
env_values = st.text(chars, max_size=80) | st.sampled_from(
    ["", " ", "-1", "0", "1e400", "nan", "inf", "9" * 5000, "http://u:p@h", "redis://", "rediss://:pw@h:0/0",
     "BTCUSDT,BTCUSDT", "btcusdt", "A" * 600, "DEBUG\n", "1_000", "0x10", "１２"]
)  # fmt: skip


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for name in VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


@given(values=st.dictionaries(st.sampled_from(VARIABLES), env_values, min_size=1, max_size=3))
def test_loader_starts_or_names_one_variable_in_one_line(values: dict[str, str]) -> None:
    err = io.StringIO()
    with environment(values), contextlib.redirect_stderr(err):
        try:
            loaded: Settings | None = load_settings()
            code = 0
        except SystemExit as exc:
            loaded, code = None, int(exc.code or 0)
    text = err.getvalue()
    if loaded is not None:
        assert text == ""
        return
    assert code == 2
    assert text.endswith("\n") and text.count("\n") == 1, repr(text)
    match = re.match(r"config error: ([A-Z_]+): ", text)
    assert match and match.group(1) in values, f"{text!r} does not name one of {sorted(values)}"
    assert "Traceback" not in text


# What the ACL renderer accepts: at least 16 characters, no `change-me` placeholder.
passwords = st.text(chars, min_size=16, max_size=40).filter(lambda pw: "change-me" not in pw.lower())


@given(st.lists(passwords, min_size=4, max_size=4, unique=True))
def test_rendered_acl_holds_only_hashes(values: list[str]) -> None:
    names = acl_variables(VPS_ACL.read_text())
    env = dict(zip(names, values, strict=True))
    rendered = render_acl_text(VPS_ACL.read_text(), env)
    assert "#@" not in rendered
    for name, value in env.items():
        assert "#" + password_hash(value) in rendered, name
    assert len(re.findall(r"#[0-9a-f]{64}\b", rendered)) == len(names)


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SecureRedisServer, Path, dict[str, str]]]:
    """One server for every example: each example renders new passwords and `ACL LOAD`s them."""
    workdir = tmp_path_factory.mktemp("acl")
    aclfile = workdir / "users.acl"
    current = {name: secrets.token_hex(12) for name in acl_variables(VPS_ACL.read_text())}
    aclfile.write_text(render_acl_text(VPS_ACL.read_text(), current))
    server = SecureRedisServer(aclfile=aclfile, workdir=workdir / "redis")
    server.start()
    yield server, aclfile, current
    server.stop()


def auth_reply(server: SecureRedisServer, user: str, password: str) -> bytes:
    """Raw `AUTH user password` on a fresh connection (a client library would retry refusals)."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(hiredis.pack_command(("AUTH", user.encode(), password.encode())))  # type: ignore[arg-type]
        return sock.recv(256)


@settings(max_examples=20, deadline=None)
@given(values=st.lists(passwords, min_size=4, max_size=4, unique=True))
def test_real_redis_admits_each_user_with_its_own_password_only(
    values: list[str], acl_server: tuple[SecureRedisServer, Path, dict[str, str]]
) -> None:
    server, aclfile, current = acl_server
    names = acl_variables(VPS_ACL.read_text())
    env = dict(zip(names, values, strict=True))
    aclfile.write_text(render_acl_text(VPS_ACL.read_text(), env))
    assert auth_reply(server, "admin", current["VPS_REDIS_ADMIN_PASSWORD"]) == b"+OK\r\n"
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        admin_pw = current["VPS_REDIS_ADMIN_PASSWORD"].encode()
        sock.sendall(hiredis.pack_command(("AUTH", b"admin", admin_pw)) + hiredis.pack_command(("ACL", "LOAD")))  # type: ignore[arg-type]
        replies = b""
        while replies.count(b"\r\n") < 2:
            chunk = sock.recv(256)
            assert chunk, "connection closed"
            replies += chunk
        assert replies == b"+OK\r\n+OK\r\n", replies
    current.update(env)
    for name in names:
        user = name.split("_")[2].lower()
        for other, password in env.items():
            reply = auth_reply(server, user, password)
            if other == name:
                assert reply == b"+OK\r\n", (user, reply)
            else:
                assert reply.startswith(b"-WRONGPASS"), (user, reply)


# ---- placeholders and short secrets (issue 14, item 7) -------------------------------------------------

GOOD = secrets.token_hex(24)
#: Every secret the settings read, as a `.env` line would set it, with a placeholder and a short value.
SECRET_CASES = [
    ("VPS_REDIS_URL", "redis://collector:change-me-vps-redis-collector-password@redis:6379/0"),
    ("VPS_REDIS_URL", "redis://collector:short@redis:6379/0"),
    ("BRAIN_REDIS_URL", "rediss://forwarder:change-me-brain-redis-forwarder-password@brain:6380/0"),
    ("BRAIN_REDIS_URL", f"rediss://forwarder:{GOOD}@change-me-brain.example.net:6380/0"),
    ("BRAIN_REDIS_URL", "redis://reader:0123456789abcde@localhost:6379/0"),
    ("QUESTDB_USER", "change-me-questdb-user"),
    ("QUESTDB_PASSWORD", "change-me-questdb-password"),
    ("QUESTDB_PASSWORD", "admin"),
    ("QUESTDB_PASSWORD", "CHANGE-ME-questdb-password-0123456789"),
    ("QUESTDB_READER_USER", "change-me-questdb-reader-user"),
    ("QUESTDB_READER_PASSWORD", "change-me-questdb-reader-password"),
    ("QUESTDB_READER_PASSWORD", "quest"),
]


def _load(values: dict[str, str]) -> tuple[Settings | None, int, str]:
    err = io.StringIO()
    with environment(values), contextlib.redirect_stderr(err):
        for name in {name for name, _ in SECRET_CASES} - set(values):
            os.environ.pop(name, None)
        os.environ.pop("METRICS_BIND", None)
        try:
            return load_settings(), 0, err.getvalue()
        except SystemExit as exc:
            return None, int(exc.code or 0), err.getvalue()


@pytest.mark.parametrize(("name", "value"), SECRET_CASES)
def test_placeholder_and_short_secrets_are_refused_at_start_with_one_line(name: str, value: str) -> None:
    loaded, code, text = _load({name: value})
    assert loaded is None and code == 2, f"{name}={value!r} was accepted"
    assert text.count("\n") == 1 and text.startswith(f"config error: {name}: "), text
    assert "openssl rand" in text or "placeholder" in text, text
    assert "0123456789abcde" not in text and "short@" not in text  # the refused password is not printed


def test_generated_secrets_are_accepted() -> None:
    loaded, code, text = _load({
        "VPS_REDIS_URL": f"redis://collector:{secrets.token_urlsafe(24)}@127.0.0.1:6379/0",
        "BRAIN_REDIS_URL": f"rediss://forwarder:{secrets.token_hex(8)}@brain.example.net:6380/0",  # 16: the minimum
        "QUESTDB_USER": "tickbridge", "QUESTDB_PASSWORD": secrets.token_hex(24),
        "QUESTDB_READER_USER": "reader", "QUESTDB_READER_PASSWORD": secrets.token_hex(24),
    })  # fmt: skip
    assert loaded is not None and code == 0 and text == "", text
    # No password in a URL (a local Redis without ACLs) is no secret to check.
    assert _load({"VPS_REDIS_URL": "redis://127.0.0.1:6379/0"})[0] is not None


def test_metrics_bind_defaults_to_loopback() -> None:
    loaded, _, text = _load({})
    assert loaded is not None, text
    assert loaded.metrics_bind == "127.0.0.1"
