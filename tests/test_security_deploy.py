"""Deployment hardening, checked statically on the committed compose files and configs (issue 7).

Every service binds only where it must; role containers run non-root on read-only root file systems
without capabilities; secrets have no defaults, reach only the containers whose user they are, and
nothing secret is committed.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tickbridge.devstack.servers import REPO_ROOT

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


@pytest.mark.parametrize("host", HOSTS)
def test_secrets_have_no_default_and_reach_only_their_own_user(host: str) -> None:
    text = compose_text(host)
    defaulted = re.findall(r"\$\{([A-Z0-9_]*(?:PASSWORD|SECRET|TOKEN)[A-Z0-9_]*):?-", text)
    assert not defaulted, f"secret variables with a default value: {defaulted}"
    for name, svc in services(host).items():
        role = role_of(svc)
        for var in set(SECRET_VAR.findall(env_text(svc))):
            m = REDIS_PASSWORD_VAR.match(var)
            if m is None:
                continue
            user = m.group(2).lower()
            if role is not None:
                assert user == role, f"{name} ({role}) receives {var}: another user's password"
            else:
                assert name == "init", f"{name} receives the Redis password {var}"


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
    assert "GF_SECURITY_ADMIN_PASSWORD=${GRAFANA_ADMIN_PASSWORD:?" in env


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
