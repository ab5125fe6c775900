"""Deployment hardening, checked statically on the committed compose files and configs (issue 7).

Every service binds only where it must; role containers run non-root on read-only root file systems
without capabilities; secrets are compose secrets (files), never environment values, reach only the
containers whose user they are, and nothing secret is committed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tickbridge_dev.deploy.compose import load_compose, parse_env_file
from tickbridge_dev.devstack.servers import REPO_ROOT

pytestmark = pytest.mark.timeout(30)

HOSTS = ("vps", "brain")
ROLES = {"collector", "forwarder", "consumer", "writer"}
SECRET_VAR = re.compile(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN)[A-Z0-9_]*)")
REDIS_PASSWORD_VAR = re.compile(r"^(VPS|BRAIN)_REDIS_([A-Z]+)_PASSWORD$")


def compose_text(host: str) -> str:
    return (REPO_ROOT / f"compose.{host}.yml").read_text()


def services(host: str) -> dict[str, dict[str, Any]]:
    doc: dict[str, Any] = yaml.safe_load(compose_text(host))
    result: dict[str, dict[str, Any]] = doc["services"]
    return result


def role_of(svc: dict[str, Any]) -> str | None:
    cmd = svc.get("command") or []
    return str(cmd[1]) if isinstance(cmd, list) and len(cmd) > 1 and cmd[0] == "tickbridge" else None


def env_text(svc: dict[str, Any]) -> str:
    env = svc.get("environment") or {}
    items = env.items() if isinstance(env, dict) else (str(e).partition("=")[::2] for e in env)
    return "\n".join(f"{k}={v}" for k, v in items)


@pytest.mark.parametrize("host", HOSTS)
def test_only_the_brain_tls_port_is_published_beyond_loopback(host: str) -> None:
    exposed = []
    for name, svc in services(host).items():
        for port in svc.get("ports", []):
            parts = str(port).rsplit(":", 2)
            bind, container = (parts[0] if len(parts) == 3 else "0.0.0.0"), parts[-1]
            if bind != "127.0.0.1" and not (host == "brain" and name == "redis" and container == "6380"):
                exposed.append(f"{name}: {port}")
        if svc.get("network_mode") == "host":
            listen = " ".join(str(a) for a in svc.get("command", []) if "listen" in str(a))
            assert listen and not re.search(r"=(0\.0\.0\.0)?:", listen), f"{name} on the host network listens on all"
    assert not exposed, f"published beyond loopback on the {host}: {exposed}"


@pytest.mark.parametrize("host", HOSTS)
def test_prometheus_runs_without_the_lifecycle_api(host: str) -> None:
    """`--web.enable-lifecycle` lets anyone who reaches the port POST /-/quit or /-/reload: config changes
    take a restart (or SIGHUP) instead (docs/deploy-vps.md, Day-2)."""
    command = [str(a) for a in services(host)["prometheus"]["command"]]
    assert command and not [a for a in command if "lifecycle" in a], command


@pytest.mark.parametrize("host", HOSTS)
def test_role_containers_are_non_root_read_only_without_capabilities(host: str) -> None:
    found = set()
    for name, svc in services(host).items():
        role = role_of(svc)
        if role is None:
            continue
        found.add(role)
        assert svc.get("read_only") is True, f"{name}: root file system writable"
        assert svc.get("cap_drop") == ["ALL"], f"{name}: keeps capabilities"
        assert "no-new-privileges:true" in svc.get("security_opt", []), f"{name}: may gain privileges"
        assert str(svc.get("user", "10001")).split(":")[0] not in ("0", "root"), f"{name}: runs as root"
    assert found == ({"collector", "forwarder"} if host == "vps" else {"consumer", "writer"})
    dockerfile = (REPO_ROOT / "services" / "Dockerfile").read_text()
    final_user = re.findall(r"^USER\s+(\S+)", dockerfile, re.MULTILINE)[-1]
    assert final_user.split(":")[0] not in ("0", "root")


@pytest.mark.parametrize("host", HOSTS)
def test_root_one_shots_have_no_network_and_do_not_restart(host: str) -> None:
    for name, svc in services(host).items():
        if str(svc.get("user", "")).split(":")[0] in ("0", "root"):
            assert svc.get("network_mode") == "none", f"{name}: root container with a network"
            assert str(svc.get("restart")) == "no", f"{name}: root container restarts"


#: An environment variable that names a secret: its value must be a path (`*_FILE`), never the secret.
SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|PASSPHRASE|CREDENTIAL|_PASS$|(?:API|PRIVATE|TLS|ACCESS)_KEY$")
#: `scheme://user:password@` in any value (a URL carrying its password).
URL_WITH_PASSWORD = re.compile(r"[a-z][a-z0-9+.-]*://[^/\s@:]*:[^/\s@]+@", re.IGNORECASE)


def environment_leaks(host: str) -> list[str]:
    """Every `environment:` entry of a compose file that holds a secret (after interpolation from a filled
    `.env`): a value of a secret-named variable that is not a file path, a variable that interpolates a
    secret, a URL with a password."""
    env_example = parse_env_file(REPO_ROOT / ".env.example")
    filled = {k: f"s3cret-{k.lower()}" if k.endswith("PASSWORD") else v for k, v in env_example.items()}
    raw = services(host)
    leaks = []
    for name, svc in load_compose(REPO_ROOT / f"compose.{host}.yml", filled)["services"].items():
        env = svc.get("environment") or {}
        items = env.items() if isinstance(env, dict) else (str(e).partition("=")[::2] for e in env)
        raw_env = env_text(raw[name])
        for key, value in items:
            value = str(value)
            if key.endswith("_FILE"):  # `*_FILE` and Grafana's `*__FILE`: a path to a compose secret
                # redis_exporter 1.45 wants a JSON map {address: password}: its wrapper writes it on the
                # container's tmpfs from the compose secret (the test of the exporter checks the script).
                exporter_map = name == "redis-exporter" and key == "REDIS_PASSWORD_FILE" and value.startswith("/tmp/")
                if not value.startswith("/run/secrets/") and not exporter_map:
                    leaks.append(f"{name}: {key}={value} (a *_FILE is a path under /run/secrets)")
            elif SECRET_NAME.search(key) and not value.startswith("/"):
                leaks.append(f"{name}: {key} holds a value")
            if URL_WITH_PASSWORD.search(value) or "s3cret-" in value:
                leaks.append(f"{name}: {key} holds a password")
        leaks += [f"{name}: interpolates {var}" for var in SECRET_VAR.findall(raw_env)]
    return leaks


@pytest.mark.parametrize("host", HOSTS)
def test_no_password_appears_in_any_environment_block(host: str) -> None:
    """`docker inspect` shows a container's environment: every password and key reaches its container as a
    compose secret (a file under /run/secrets) named by a `*_FILE` variable, never as a value or in a URL."""
    assert environment_leaks(host) == []


def test_the_environment_check_has_teeth(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above fails for each way a secret has reached an environment block before."""
    text = compose_text("vps")
    for leak in (
        "      VPS_REDIS_URL: redis://collector:${VPS_REDIS_COLLECTOR_PASSWORD}@redis:6379/0\n",
        "      QUESTDB_PASSWORD: ${QUESTDB_PASSWORD}\n",
        "      GF_SECURITY_ADMIN_PASSWORD: hunter2hunter2hunter2\n",
        "      QUESTDB_PASSWORD_FILE: ./secrets/questdb_password\n",
    ):
        bad = text.replace("      METRICS_PORT: 9101\n", "      METRICS_PORT: 9101\n" + leak)
        (tmp_path / "compose.vps.yml").write_text(bad)
        (tmp_path / ".env.example").write_text((REPO_ROOT / ".env.example").read_text())
        monkeypatch.setattr(f"{__name__}.REPO_ROOT", tmp_path)
        assert environment_leaks("vps"), leak
        monkeypatch.undo()


@pytest.mark.parametrize("host", HOSTS)
def test_secrets_are_files_and_reach_only_their_own_user(host: str) -> None:
    """Each secret is a file under ./secrets (git-ignored); a role container gets only its own Redis user's
    password (and QuestDB's where it writes), the init step the passwords it hashes, Grafana its own."""
    doc: dict[str, Any] = yaml.safe_load(compose_text(host))
    declared = doc["secrets"]
    for secret, spec in declared.items():
        assert spec == {"file": f"./secrets/{secret}"}, f"{secret}: {spec}"
    text = compose_text(host)
    defaulted = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN)[A-Z0-9_]*):?-", text)
    assert not defaulted, f"secret variables with a default value: {defaulted}"
    for name, svc in services(host).items():
        given = set(svc.get("secrets", []))
        assert given <= set(declared), f"{name} uses undeclared secrets {given - set(declared)}"
        # A mounted secret is used: some *_FILE names it (QuestDB's entrypoint reads its own), or a provisioning
        # file the service mounts from the repository (Grafana's QuestDB data source: `$__file{...}`).
        mounted = "".join(
            (REPO_ROOT / src).read_text()
            for src in (str(v).split(":", 1)[0] for v in svc.get("volumes", []))
            if src.startswith("./") and (REPO_ROOT / src).is_file()
        )
        for secret in given:
            used_in = env_text(svc) + str(svc.get("entrypoint")) + mounted
            assert f"/run/secrets/{secret}" in used_in, f"{name}: {secret} unused"
        role = role_of(svc)
        for secret in given:
            m = re.fullmatch(r"(vps|brain)_redis_([a-z]+)_password", secret)
            if m is None:
                continue
            if role is not None:
                assert m.group(2) == role, f"{name} ({role}) receives {secret}: another user's password"
            elif name == "redis-exporter":  # it logs in as the read-only monitor user
                assert m.group(2) == "monitor", f"{name} receives {secret}: not the monitor's password"
            else:
                assert name == "init", f"{name} receives the Redis password {secret}"
    ignored = subprocess.run(["git", "-C", str(REPO_ROOT), "check-ignore", "-q", "secrets/questdb_password"],
                             check=False)  # fmt: skip
    assert ignored.returncode == 0, "secrets/ is not git-ignored"


def test_redis_configs_require_acl_users_and_mutual_tls_on_the_brain() -> None:
    for host in HOSTS:
        conf = (REPO_ROOT / "redis" / f"{host}.conf").read_text()
        assert re.search(r"^aclfile\s", conf, re.MULTILINE), f"{host}.conf: no ACL file"
        assert not re.search(r"^requirepass\s", conf, re.MULTILINE), f"{host}.conf: shared password"
    brain = (REPO_ROOT / "redis" / "brain.conf").read_text()
    assert re.search(r"^tls-auth-clients\s+yes", brain, re.MULTILINE)
    protocols = re.search(r"^tls-protocols\s+\"?([^\"\n]+)", brain, re.MULTILINE)
    assert protocols and set(protocols.group(1).split()) <= {"TLSv1.2", "TLSv1.3"}
    assert not re.search(r"^tls-port", (REPO_ROOT / "redis" / "vps.conf").read_text(), re.MULTILINE)


@pytest.mark.parametrize("host", HOSTS)
def test_grafana_has_no_anonymous_access_nor_sign_up(host: str) -> None:
    env = env_text(services(host)["grafana"])
    assert "GF_AUTH_ANONYMOUS_ENABLED=false" in env and "GF_USERS_ALLOW_SIGN_UP=false" in env
    assert "GF_SECURITY_ADMIN_PASSWORD__FILE=/run/secrets/grafana_admin_password" in env


def test_no_private_key_or_env_file_is_committed() -> None:
    files = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files"], capture_output=True, text=True, check=True)
    tracked = files.stdout.splitlines()
    assert not [f for f in tracked if f.endswith((".key", ".pem", ".p12")) or Path(f).name == ".env"]
    leaks = subprocess.run(["git", "-C", str(REPO_ROOT), "grep", "-l", "-E", "BEGIN ([A-Z]+ )?PRIVATE KEY"],
                           capture_output=True, text=True, check=False)  # fmt: skip
    assert leaks.stdout.strip() == "", f"private key material committed: {leaks.stdout}"


def test_every_threat_in_the_security_doc_names_tests_that_exist() -> None:
    """docs/security.md's threat table points each row at `file::test` (or `TODO(merge)` while a parallel
    branch adds it): a renamed or removed test fails here instead of leaving the doc pointing nowhere."""
    text = (REPO_ROOT / "docs" / "security.md").read_text()
    section = text.split("## Threats and the tests that cover them", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"^\| \d+ \|", line)]
    assert len(rows) >= 20
    for row in rows:
        pointer = row.rstrip(" |").rsplit(" | ", 1)[1]
        refs = re.findall(r"`(test_[a-z0-9_]+\.py)::(test_[a-z0-9_]+)`", pointer)
        assert refs or pointer.strip() == "TODO(merge)", f"row without a test: {row[:80]}"
        for file, name in refs:
            source = (REPO_ROOT / "tests" / file).read_text()
            assert re.search(rf"^(async )?def {name}\(", source, re.M), f"{file}::{name} does not exist"


@pytest.mark.parametrize("host", HOSTS)
def test_questdb_entrypoint_exports_its_passwords_from_the_secret_files(host: str, tmp_path: Path) -> None:
    """QuestDB reads `QDB_*` variables but no `*_FILE`: the entrypoint wrapper (root, before the image's
    entrypoint drops to the questdb user) exports them from the compose secrets; an empty file stops it."""
    svc = load_compose(REPO_ROOT / f"compose.{host}.yml", parse_env_file(REPO_ROOT / ".env.example"))["services"]
    entrypoint = svc["questdb"]["entrypoint"]
    wanted = {"QDB_HTTP_PASSWORD": "questdb_password", "QDB_PG_PASSWORD": "questdb_password"}
    if host == "brain":
        wanted["QDB_PG_READONLY_PASSWORD"] = "questdb_reader_password"
    values = {name: f"{name}-{host}-0123456789abcdef" for name in set(wanted.values())}
    for name, value in values.items():
        (tmp_path / name).write_text(value + "\n")
    script = (
        entrypoint[2]
        .replace("/run/secrets/", f"{tmp_path}/")
        .replace("install -D -m 0644 /etc/tickbridge/server.conf /var/lib/questdb/conf/server.conf", "true")
        .replace("/docker-entrypoint.sh", "/usr/bin/env")
    )
    assert script != entrypoint[2] and "install" not in script
    proc = subprocess.run(["bash", "-c", script, entrypoint[3]], capture_output=True, text=True, env={}, check=False)
    assert proc.returncode == 0, proc.stderr
    exported = dict(line.split("=", 1) for line in proc.stdout.splitlines() if line.startswith("QDB_"))
    assert exported == {var: values[secret] for var, secret in wanted.items()}
    (tmp_path / "questdb_password").write_text("")
    failed = subprocess.run(["bash", "-c", script, entrypoint[3]], capture_output=True, text=True, env={}, check=False)
    assert failed.returncode != 0 and "QDB_" not in failed.stdout
