"""Passwords from files (issue 19): compose hands every password to its container as a compose secret
(a file under /run/secrets) named by a `*_FILE` variable, so `docker inspect` shows none.

The settings take `VPS_REDIS_PASSWORD_FILE`/`BRAIN_REDIS_PASSWORD_FILE` (the password of the user in the
URL, which then carries none), `QUESTDB_PASSWORD_FILE` and `QUESTDB_READER_PASSWORD_FILE`; the plain
variables keep working (the native stack and the tests), both at once is one clear line. A file that is
missing, unreadable, open to every user, empty, or holds a placeholder or a short secret stops the role
with one line naming the variable, the secret not echoed. The compose `init` step renders the Redis ACLs
from the same files, and `make secrets` writes them.
"""

from __future__ import annotations

import contextlib
import io
import os
import secrets
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from tickbridge.core.settings import SECRET_FILES, Settings, load_settings
from tickbridge.ops import secrets_init
from tickbridge.ops.acl import acl_variables
from tickbridge_dev.devstack.servers import REPO_ROOT
from tickbridge_dev.devstack.tls import VPS_ACL, SecureRedisServer

pytestmark = pytest.mark.timeout(60)

#: The variables these tests set; every test starts without any of them.
NAMES = [name.upper() for name in SECRET_FILES] + [target.upper() for target in SECRET_FILES.values()]


def secret_file(directory: Path, name: str, content: str, mode: int = 0o400) -> Path:
    path = directory / name
    path.write_text(content)
    path.chmod(mode)
    return path


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    try:
        for name in NAMES:
            os.environ.pop(name, None)
        os.environ.update(values)
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def load(values: dict[str, str], cwd: Path) -> tuple[Settings | None, str]:
    """`load_settings()` as a role calls it (no `.env`: run from `cwd`); the settings or its one error line."""
    err = io.StringIO()
    here = Path.cwd()
    os.chdir(cwd)
    try:
        with environment(values), contextlib.redirect_stderr(err):
            try:
                return load_settings(), err.getvalue()
            except SystemExit as exc:
                assert exc.code == 2
                return None, err.getvalue()
    finally:
        os.chdir(here)


def test_files_supply_the_passwords_of_urls_and_questdb(tmp_path: Path) -> None:
    collector, brain = secrets.token_hex(24), "p@ss/w:rd-" + secrets.token_urlsafe(18)
    questdb, reader = secrets.token_hex(24), secrets.token_hex(24)
    settings, text = load(
        {
            "VPS_REDIS_URL": "redis://collector@redis:6379/0",
            "VPS_REDIS_PASSWORD_FILE": str(secret_file(tmp_path, "c", collector + "\n")),  # `echo` adds one
            "BRAIN_REDIS_URL": "rediss://forwarder@brain.example.net:6380/0",
            "BRAIN_REDIS_PASSWORD_FILE": str(secret_file(tmp_path, "b", brain, 0o440)),
            "QUESTDB_PASSWORD_FILE": str(secret_file(tmp_path, "q", questdb + "\r\n")),
            "QUESTDB_READER_PASSWORD_FILE": str(secret_file(tmp_path, "r", reader, 0o600)),
        },
        tmp_path,
    )
    assert settings is not None, text
    assert settings.vps_redis_url == f"redis://collector:{collector}@redis:6379/0"
    # Any character works: the password is quoted into the URL, and the client reads it back unquoted.
    pool = redis.ConnectionPool.from_url(settings.brain_redis_url)
    assert pool.connection_kwargs["username"] == "forwarder" and pool.connection_kwargs["password"] == brain
    assert settings.questdb_password == questdb and settings.questdb_reader_password == reader
    # A URL without a user takes the password for the default user.
    plain, _ = load({"VPS_REDIS_URL": "redis://127.0.0.1:6379/0",
                     "VPS_REDIS_PASSWORD_FILE": str(tmp_path / "c")}, tmp_path)  # fmt: skip
    assert plain is not None and plain.vps_redis_url == f"redis://:{collector}@127.0.0.1:6379/0"


def test_plain_variables_still_work_without_files(tmp_path: Path) -> None:
    password = secrets.token_hex(24)
    settings, text = load({"VPS_REDIS_URL": f"redis://collector:{password}@redis:6379/0",
                           "QUESTDB_PASSWORD": password}, tmp_path)  # fmt: skip
    assert settings is not None, text
    assert settings.vps_redis_url.endswith(f":{password}@redis:6379/0") and settings.questdb_password == password
    assert settings.vps_redis_password_file is None


@pytest.mark.parametrize(
    ("name", "given", "conflict"),
    [
        ("VPS_REDIS_PASSWORD_FILE", {"VPS_REDIS_URL": "redis://collector:{pw}@redis:6379/0"}, "VPS_REDIS_URL"),
        ("BRAIN_REDIS_PASSWORD_FILE", {"BRAIN_REDIS_URL": "rediss://forwarder:{pw}@brain:6380/0"}, "BRAIN_REDIS_URL"),
        ("QUESTDB_PASSWORD_FILE", {"QUESTDB_PASSWORD": "{pw}"}, "QUESTDB_PASSWORD"),
        ("QUESTDB_READER_PASSWORD_FILE", {"QUESTDB_READER_PASSWORD": "{pw}"}, "QUESTDB_READER_PASSWORD"),
    ],
)
def test_a_password_given_twice_is_one_line(tmp_path: Path, name: str, given: dict[str, str], conflict: str) -> None:
    password = secrets.token_hex(24)
    values = {k: v.format(pw=password) for k, v in given.items()}
    values[name] = str(secret_file(tmp_path, "pw", secrets.token_hex(24)))
    settings, text = load(values, tmp_path)
    assert settings is None
    assert text.count("\n") == 1 and text.startswith(f"config error: {name}: "), text
    assert conflict in text and password not in text


BAD_FILES = [
    # (file name, content, mode, what the line says)
    ("missing", None, 0o400, "not found"),
    ("open", "x" * 48, 0o444, "open to every user (mode 0444)"),
    ("writable", "x" * 48, 0o602, "open to every user"),
    ("empty", "", 0o400, "is empty"),
    ("newline", "\n", 0o400, "is empty"),
    ("two-lines", "a" * 24 + "\n" + "b" * 24 + "\n", 0o400, "more than one line"),
    ("placeholder", "change-me-questdb-password\n", 0o400, "placeholder"),
    ("short", "hunter2\n", 0o400, "7 characters is refused"),
    ("binary", "", 0o400, "not UTF-8"),
]


@pytest.mark.parametrize("variable", [name.upper() for name in SECRET_FILES])
@pytest.mark.parametrize(("file", "content", "mode", "reason"), BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_a_bad_secret_file_is_one_line_naming_the_variable(
    tmp_path: Path, variable: str, file: str, content: str | None, mode: int, reason: str
) -> None:
    path = tmp_path / file
    if file == "binary":
        path.write_bytes(b"\xff\xfe" + b"a" * 30)
        path.chmod(mode)
    elif content is not None:
        secret_file(tmp_path, file, content, mode)
    settings, text = load({variable: str(path)}, tmp_path)
    assert settings is None, f"{variable} accepted {file}"
    assert text.count("\n") == 1 and text.startswith(f"config error: {variable}: "), text
    assert reason in text and str(path) in text, text
    for secret in ("x" * 48, "a" * 24, "hunter2", "change-me-questdb-password"):
        assert secret not in text


def test_a_directory_is_not_a_secret_file(tmp_path: Path) -> None:
    settings, text = load({"QUESTDB_PASSWORD_FILE": str(tmp_path)}, tmp_path)
    assert settings is None and "not a regular file" in text and text.startswith("config error: QUESTDB_PASSWORD_FILE")


def test_a_file_the_process_may_not_read_is_one_line() -> None:
    """A file owned by another uid (the container's user was not given it): the role says so, in one line."""
    with tempfile.TemporaryDirectory() as directory:
        Path(directory).chmod(0o755)
        path = secret_file(Path(directory), "pw", secrets.token_hex(24) + "\n", 0o400)
        here = Path.cwd()
        os.chdir(directory)  # a directory nobody may enter, and come back from
        if os.geteuid() == 0:  # root reads anything: the check runs as nobody
            os.seteuid(65534)
        else:
            path.chmod(0o000)
        try:
            settings, text = load({"QUESTDB_PASSWORD_FILE": str(path)}, Path(directory))
        finally:
            if os.getuid() == 0:
                os.seteuid(0)
            os.chdir(here)
    assert settings is None and text.count("\n") == 1, text
    assert text.startswith("config error: QUESTDB_PASSWORD_FILE: ") and "not readable by uid" in text, text


def test_every_file_variable_is_documented() -> None:
    text = (REPO_ROOT / ".env.example").read_text()
    for name in SECRET_FILES:
        assert f"# {name.upper()}=" in text, name


# ---- the compose init step and `make secrets` -------------------------------------------------------------


def test_init_renders_the_acl_from_secret_files_and_redis_admits_a_role_configured_by_files(
    tmp_path: Path,
) -> None:
    """What compose does on the VPS, without Docker: `make secrets` writes the files, `init` renders the ACL
    from them (`*_FILE`), redis-server loads it, and the collector's settings (URL without a password, plus
    VPS_REDIS_PASSWORD_FILE) log it in as its own user."""
    env = {"ENV_FILE": str(tmp_path / "no.env"), "PATH": os.environ.get("PATH", "")}
    secrets_dir = tmp_path / "secrets"
    proc = subprocess.run(["bash", str(REPO_ROOT / "scripts" / "secrets.sh"), "vps", str(secrets_dir)], env=env,
                          capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    # The Brain's forwarder password is not made on the VPS: copied from the Brain.
    assert proc.returncode == 1 and "brain_redis_forwarder_password missing" in proc.stderr, proc.stderr
    for name in acl_variables(VPS_ACL.read_text()):
        path = secrets_dir / name.lower()
        assert path.stat().st_mode & 0o777 == 0o440, path
        if os.geteuid() == 0:
            assert path.stat().st_uid == 10001, path
        path.chmod(0o400)
        os.chown(path, os.geteuid(), os.getegid())  # the test reads them as the init step (root) would
    file_env = {f"{name}_FILE": str(secrets_dir / name.lower()) for name in acl_variables(VPS_ACL.read_text())}
    aclfile = tmp_path / "users.acl"
    with environment({}):
        saved = dict(os.environ)
        os.environ.update(file_env)
        try:
            secrets_init.main(["--acl", str(VPS_ACL), str(aclfile)])
        finally:
            os.environ.clear()
            os.environ.update(saved)
    assert "change-me" not in aclfile.read_text() and "#@" not in aclfile.read_text()
    server = SecureRedisServer(aclfile=aclfile, workdir=tmp_path / "redis")
    server.start()
    try:
        role_env = {
            "VPS_REDIS_URL": f"redis://collector@127.0.0.1:{server.port}/0",
            "VPS_REDIS_PASSWORD_FILE": file_env["VPS_REDIS_COLLECTOR_PASSWORD_FILE"],
        }
        settings, text = load(role_env, tmp_path)
        assert settings is not None, text
        with redis.Redis.from_url(settings.vps_redis_url, socket_timeout=5) as client:
            assert client.ping() and client.xlen("market:vps:stream") == 0  # logged in as collector (its keys)
    finally:
        server.stop()


def test_init_names_a_bad_or_doubled_secret_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    good = secret_file(tmp_path, "good", secrets.token_hex(24))
    bad = secret_file(tmp_path, "bad", "change-me-vps-redis-admin-password", 0o444)
    for env, reason in (
        ({"VPS_REDIS_ADMIN_PASSWORD_FILE": str(bad)}, "open to every user"),
        ({"VPS_REDIS_ADMIN_PASSWORD_FILE": str(good), "VPS_REDIS_ADMIN_PASSWORD": secrets.token_hex(24)}, "set too"),
    ):
        with pytest.raises(
            secrets_init.SecretFileError, match=f"^secrets-init: VPS_REDIS_ADMIN_PASSWORD_FILE: .*{reason}"
        ):
            secrets_init.resolve_secret_files(env)
    resolved = secrets_init.resolve_secret_files({"VPS_REDIS_ADMIN_PASSWORD_FILE": str(good), "OTHER_FILE": "/x"})
    assert resolved == {"VPS_REDIS_ADMIN_PASSWORD": good.read_text(), "OTHER_FILE": "/x"}


def test_make_secrets_keeps_files_and_carries_env_values_over(tmp_path: Path) -> None:
    carried = secrets.token_hex(20)
    (tmp_path / ".env").write_text(
        f"QUESTDB_PASSWORD={carried}\nGRAFANA_ADMIN_PASSWORD=change-me-grafana-admin-password\n"
    )
    env = {"PATH": os.environ.get("PATH", ""), "ENV_FILE": str(tmp_path / ".env")}
    if os.geteuid() == 0:  # as `sudo make secrets` runs it: the directory stays the operator's
        env |= {"SUDO_UID": "4242", "SUDO_GID": "4343"}
    script = ["bash", str(REPO_ROOT / "scripts" / "secrets.sh"), "brain", str(tmp_path / "secrets")]
    first = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert first.returncode == 0, first.stderr
    out = tmp_path / "secrets"
    assert (out / "questdb_password").read_text() == carried + "\n"
    grafana = (out / "grafana_admin_password").read_text().strip()
    assert len(grafana) == 48 and "change-me" not in grafana  # a placeholder is never carried over
    assert out.stat().st_mode & 0o777 == 0o700
    if os.geteuid() == 0:
        assert (out.stat().st_uid, out.stat().st_gid) == (4242, 4343)
        owners = {p.name: (p.stat().st_uid, p.stat().st_gid, p.stat().st_mode & 0o777) for p in out.iterdir()}
        assert owners["grafana_admin_password"] == owners["questdb_reader_password"] == (472, 4343, 0o440)
        assert owners["brain_redis_writer_password"] == owners["questdb_password"] == (10001, 4343, 0o440)
    before = {p.name: p.read_text() for p in out.iterdir()}
    assert len(before) == 9
    second = subprocess.run(script, env=env, capture_output=True, text=True, timeout=30, check=False)
    assert second.returncode == 0 and {p.name: p.read_text() for p in out.iterdir()} == before
