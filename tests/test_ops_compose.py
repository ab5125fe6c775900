"""The compose files, checked without Docker: what `docker compose config` and a first `up` would catch.

Both files validate against the Compose Specification schema after `${VAR}` interpolation from
`.env.example`; every service runs what the native stack runs (tickbridge_dev.deploy.commands) or is listed as
compose-only with a reason; images are pinned (QuestDB at the version the tests run); long-running
services have healthchecks, restart policies, memory limits and named volumes for their state; the VPS
fits 4 GB and pins cores as designed; every role's environment builds a valid `Settings`.
"""

from __future__ import annotations

import copy
import json
import re
import secrets
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from tickbridge.core import keys
from tickbridge.core.settings import DEFAULT_METRICS_PORTS, DEFAULT_SYMBOLS, Settings
from tickbridge_dev.deploy.commands import COMPOSE_ONLY, NATIVE_COMMANDS, command_matches
from tickbridge_dev.deploy.compose import (
    InterpolationError,
    effective_command,
    interpolate,
    load_compose,
    native_process,
    parse_env_file,
    referenced_variables,
)
from tickbridge_dev.devstack.servers import QUESTDB_VERSION, REPO_ROOT

pytestmark = pytest.mark.timeout(60)

SCHEMA = REPO_ROOT / "schemas" / "compose-spec.json"
ENV_EXAMPLE = REPO_ROOT / ".env.example"
COMPOSE_FILES = {"vps": REPO_ROOT / "compose.vps.yml", "brain": REPO_ROOT / "compose.brain.yml"}
ROLES = {"vps": ("collector", "forwarder"), "brain": ("consumer", "writer")}
EXPECTED_SERVICES = {
    "vps": {
        "redis",
        "questdb",
        "collector",
        "forwarder",
        "forwarder-live",
        "prometheus",
        "alertmanager",
        "grafana",
        "node-exporter",
        "redis-exporter",
        "cadvisor",
    },
    "brain": {
        "redis",
        "questdb",
        "consumer",
        "writer",
        "prometheus",
        "alertmanager",
        "grafana",
        "node-exporter",
        "redis-exporter",
        "cadvisor",
    },
}
#: Host paths mounted read-only: node-exporter's view of the host (/), cAdvisor's cgroups and Docker state.
HOST_VIEWS = {"/", "/sys", "/var/run", "/var/lib/docker"}
#: One-shot init containers (restart "no"): they prepare secrets and exit.
ONE_SHOT = {"init", "forwarder-tls"}
#: Where each stateful service keeps its data (must be a named volume).
DATA_DIRS = {
    "redis": "/data",
    "questdb": "/var/lib/questdb",
    "prometheus": "/prometheus",
    "alertmanager": "/alertmanager",  # silences and notification state
    "grafana": "/var/lib/grafana",
}
VPS_RAM_BUDGET_MIB = 3.6 * 1024  # a "4 GB" VPS shows ~3.8 GiB; leave the OS and dockerd ~200 MiB or more


def _env() -> dict[str, str]:
    return parse_env_file(ENV_EXAMPLE)


def _deployed_env() -> dict[str, str]:
    """`.env.example` as the deploy docs have it filled in: every `change-me-…` replaced (a placeholder is refused)."""
    return {k: secrets.token_hex(24) if v.startswith("change-me-") else v for k, v in _env().items()}


@pytest.fixture(scope="module", params=sorted(COMPOSE_FILES))
def host(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(scope="module")
def compose(host: str) -> dict[str, Any]:
    return load_compose(COMPOSE_FILES[host], _deployed_env())


def _mib(value: str | int) -> float:
    if isinstance(value, int):
        return value / 2**20
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)b?", str(value).lower())
    assert match, f"unparseable memory size {value!r}"
    scale = {"": 1 / 2**20, "k": 1 / 1024, "m": 1, "g": 1024}[match.group(2)]
    return float(match.group(1)) * scale


def _long_running(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The services a plain `up` runs (not the one-shots, not the `venues` profile's)."""
    return {name: svc for name, svc in compose["services"].items() if name not in ONE_SHOT and not svc.get("profiles")}


#: Issue 18: the `venues` profile's services, each exchange's own role.
VENUE_SERVICES = {
    "vps": {f"{role}-{venue}" for role in ("collector", "forwarder") for venue in ("coinbase", "kraken")},
    "brain": {f"consumer-{venue}" for venue in ("coinbase", "kraken")},
}


def test_venue_profile_runs_each_exchange_in_its_own_roles(host: str, compose: dict[str, Any]) -> None:
    """`--profile venues`: per venue the same role (command, secrets, healthcheck) as the default service, on the
    venue's own stream, with its own metrics port that Prometheus scrapes with an `exchange` label."""
    profiled = {name for name, svc in compose["services"].items() if svc.get("profiles")}
    assert profiled == VENUE_SERVICES[host]
    prom = (REPO_ROOT / "prometheus" / f"prometheus.{host}.yml").read_text()
    ports = set()
    for name in sorted(profiled):
        role, _, venue = name.partition("-")
        svc, base = compose["services"][name], compose["services"][role]
        assert svc["profiles"] == ["venues"] and svc["command"] == base["command"] == ["tickbridge", role]
        assert svc["secrets"] == base["secrets"] and svc["healthcheck"] == base["healthcheck"]
        env = svc["environment"]
        settings = Settings(_env_file=None, exchange=env["EXCHANGE"], stream_key=env["STREAM_KEY"])  # type: ignore[call-arg]
        assert settings.exchange == venue and settings.stream_key == keys.stream_key_for(venue)
        assert env["METRICS_PORT"] not in ports and env["METRICS_PORT"] != base["environment"]["METRICS_PORT"]
        ports.add(env["METRICS_PORT"])
        assert f'"{name}:{env["METRICS_PORT"]}"' in prom and f"exchange: {venue}" in prom


# ---- schema and interpolation ------------------------------------------------------------------------


def test_validates_against_compose_spec(compose: dict[str, Any]) -> None:
    schema = json.loads(SCHEMA.read_text())
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)
    # The validation has teeth: a misspelt key is rejected.
    broken = copy.deepcopy(compose)
    broken["services"]["redis"]["helthcheck"] = {"test": ["CMD", "true"]}
    assert list(jsonschema.Draft7Validator(schema).iter_errors(broken))


def test_interpolation_follows_compose_rules() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert interpolate("$$x ${A} $A ${B:-d} ${EMPTY:-d} ${EMPTY-d} ${B-d}", env) == "$x 1 1 d d  d"
    with pytest.raises(InterpolationError, match="B: set B"):
        interpolate("${B:?set B}", env)
    with pytest.raises(InterpolationError, match="EMPTY"):
        interpolate("${EMPTY:?required}", env)


def test_every_required_variable_is_needed(host: str) -> None:
    """Without `.env`, compose refuses to start (no silent empty passwords)."""
    with pytest.raises(InterpolationError):
        load_compose(COMPOSE_FILES[host], {})


def test_services_are_the_designed_ones(host: str, compose: dict[str, Any]) -> None:
    assert set(_long_running(compose)) == EXPECTED_SERVICES[host]
    for name in set(compose["services"]) & ONE_SHOT:
        assert compose["services"][name]["restart"] == "no"


# ---- the same commands as the native stack -------------------------------------------------------------


def test_every_service_runs_a_native_command(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        process = native_process(svc)
        if process is None:
            assert name in COMPOSE_ONLY, f"{name} runs {effective_command(svc)}, which the native stack does not"
            continue
        # A role's service runs that role, not another one.
        if name in NATIVE_COMMANDS:
            assert process == name, f"{name} runs {process}"


def test_native_stack_commands_match_the_canonical_list(tmp_path: Path) -> None:
    """The argv the native servers (devstack.servers) run are the canonical ones, and only those."""
    from tickbridge_dev.devstack.servers import AlertmanagerServer, PrometheusServer, QuestDBServer, RedisServer

    native = {
        "redis": RedisServer(workdir=tmp_path / "redis").command(),
        "prometheus": PrometheusServer(tmp_path / "p.yml", workdir=tmp_path / "prom").command(),
        "alertmanager": AlertmanagerServer(workdir=tmp_path / "am").command(),
        "questdb": QuestDBServer(workdir=tmp_path / "questdb").command(),
        "writer": ["/venv/bin/python3.11", "-m", "tickbridge", "writer"],
    }
    for name, argv in native.items():
        assert [n for n, spec in NATIVE_COMMANDS.items() if command_matches(argv, spec)] == [name], argv
    assert not command_matches(["tickbridge", "writer"], NATIVE_COMMANDS["consumer"])


def test_redis_runs_its_committed_config(host: str, compose: dict[str, Any]) -> None:
    redis = compose["services"]["redis"]
    conf_in_container = effective_command(redis)[1]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in redis["volumes"]}
    assert mounts[conf_in_container] == f"./redis/{host}.conf"


def test_questdb_runs_the_committed_log_config(host: str, compose: dict[str, Any]) -> None:
    """QuestDB's INFO logging cost more CPU than its commits: compose runs the file the native stack copies
    (questdb/log.conf, INFO off), read-only, not a default QuestDB writes into the data volume."""
    questdb = compose["services"]["questdb"]
    assert [a for a in effective_command(questdb) if str(a).startswith("-Dout=")] == ["-Dout=/etc/tickbridge/log.conf"]
    assert "./questdb/log.conf:/etc/tickbridge/log.conf:ro" in questdb["volumes"]


# ---- pinning, health, restart, state -------------------------------------------------------------------


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    for name, svc in compose["services"].items():
        image = svc.get("image")
        assert image, f"{name} has no image"
        repo, _, tag = image.rpartition(":")
        assert repo and re.fullmatch(r"v?\d+\.\d+\.\d+(-[a-z0-9.]+)?", tag), f"{name}: unpinned image {image}"
    assert compose["services"]["questdb"]["image"] == f"questdb/questdb:{QUESTDB_VERSION}"


def test_healthchecks_restart_and_ordering(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name, svc in _long_running(compose).items():
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"{name} has no healthcheck"
        for dep, cond in svc.get("depends_on", {}).items():
            wanted = "service_completed_successfully" if dep in ONE_SHOT else "service_healthy"
            assert cond["condition"] == wanted, f"{name} -> {dep}: {cond}"
            assert dep in services
    # The roles wait for what they write to.
    for role in ("collector", "forwarder", "consumer", "writer"):
        if role in services:
            assert "redis" in services[role]["depends_on"]
    for role in ("forwarder", "writer"):
        if role in services:
            assert "questdb" in services[role]["depends_on"]


def test_the_live_lane_runs_as_its_own_service_like_the_forwarder() -> None:
    """Issue 16: `forwarder-live` is `tickbridge forwarder` with the forwarder's settings and FORWARDER_LANE=live
    (the forwarder FORWARDER_LANE=ordered), checked and scraped on its own port."""
    services = load_compose(COMPOSE_FILES["vps"], _env())["services"]
    fw, live = services["forwarder"], services["forwarder-live"]
    assert live["command"] == fw["command"] == ["tickbridge", "forwarder"]
    assert fw["environment"]["FORWARDER_LANE"] == "ordered" and live["environment"]["FORWARDER_LANE"] == "live"
    same = {k: v for k, v in live["environment"].items() if k not in ("FORWARDER_LANE", "METRICS_PORT")}
    assert same == {k: v for k, v in fw["environment"].items() if k not in ("FORWARDER_LANE", "METRICS_PORT")}
    port = int(live["environment"]["METRICS_PORT"])
    assert live["healthcheck"]["test"][1:4] == ["tickbridge", "check", "forwarder-live"]
    assert port == DEFAULT_METRICS_PORTS["forwarder-live"]
    assert f'"forwarder-live:{port}"' in (REPO_ROOT / "prometheus" / "prometheus.vps.yml").read_text()


def test_roles_healthcheck_is_tickbridge_check_on_the_scraped_port(host: str, compose: dict[str, Any]) -> None:
    prom = (REPO_ROOT / "prometheus" / f"prometheus.{host}.yml").read_text()
    for role in ROLES[host]:
        svc = compose["services"][role]
        assert svc["healthcheck"]["test"][1:4] == ["tickbridge", "check", role]
        if "--heartbeat" in svc["healthcheck"]["test"]:
            # The heartbeat key is named after the instance: a fixed name, stable across restarts.
            assert svc["environment"]["CONSUMER_NAME"], role
        port = svc["environment"]["METRICS_PORT"]
        assert f'"{role}:{port}"' in prom, f"prometheus.{host}.yml does not scrape {role}:{port}"


def test_state_lives_in_named_volumes(compose: dict[str, Any]) -> None:
    declared = set(compose.get("volumes", {}))
    for name, svc in compose["services"].items():
        for spec in svc.get("volumes", []):
            source = spec.split(":")[0]
            if source.startswith(("./", "/")):
                # Bind mounts: repository files (certs/ is generated by `make certs`) or a host view (HOST_VIEWS).
                if source in HOST_VIEWS:
                    assert "ro" in spec.split(":")[2:3][0].split(","), f"{name} mounts the host's {source} writable"
                elif source != "./certs":
                    assert (REPO_ROOT / source).exists(), f"{name} mounts missing {source}"
                continue
            assert source in declared, f"{name} uses undeclared volume {source}"
        if name in DATA_DIRS:
            targets = {spec.split(":")[1]: spec.split(":")[0] for spec in svc["volumes"]}
            assert targets.get(DATA_DIRS[name]) in declared, f"{name} keeps {DATA_DIRS[name]} outside a named volume"


def test_memory_limits_fit_the_vps(host: str, compose: dict[str, Any]) -> None:
    limits = {name: _mib(svc["mem_limit"]) for name, svc in _long_running(compose).items()}
    if host == "vps":
        assert sum(limits.values()) <= VPS_RAM_BUDGET_MIB, limits
        # Redis' maxmemory leaves room in its container for the AOF-rewrite fork.
        maxmemory = re.search(r"^maxmemory (\d+)mb$", (REPO_ROOT / "redis/vps.conf").read_text(), re.M)
        assert maxmemory and int(maxmemory.group(1)) + 200 <= limits["redis"]


#: `cpuset: "${NAME_CPUSET:-default}"`: from a variable, with a default (a CPU list as `taskset -c` takes it).
CPUSET_FROM_VARIABLE = re.compile(r"\$\{(?P<var>[A-Z][A-Z0-9_]*_CPUSET):-(?P<default>[^}]+)\}")


def _cpus(cpuset: str) -> set[int]:
    """The CPUs of a cpuset list ("0", "1-3", "0,2-3"); AssertionError when it is not one."""
    cpus: set[int] = set()
    for part in cpuset.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip())
        assert m, f"not a cpuset list: {cpuset!r}"
        low, high = int(m.group(1)), int(m.group(2) or m.group(1))
        assert low <= high, f"not a cpuset list: {cpuset!r}"
        cpus |= set(range(low, high + 1))
    return cpus


def test_every_service_is_pinned_through_a_variable(host: str) -> None:
    """Every service (services added later included) has `cpuset: "${X_CPUSET:-default}"`: the operator moves
    it in .env; the default is valid on a 2-core machine (the VPS, and the smallest Brain) and documented."""
    raw: dict[str, Any] = yaml.safe_load(COMPOSE_FILES[host].read_text())
    documented = parse_env_file(ENV_EXAMPLE)
    for name, svc in raw["services"].items():
        cpuset = svc.get("cpuset")
        assert isinstance(cpuset, str), f"{host}: {name} has no cpuset"
        m = CPUSET_FROM_VARIABLE.fullmatch(cpuset)
        assert m, f"{host}: {name} cpuset {cpuset!r} is not ${{NAME_CPUSET:-default}}"
        assert _cpus(m.group("default")) <= {0, 1}, f"{host}: {name}: default {m.group('default')} needs > 2 cores"
        assert m.group("var") in documented, f"{m.group('var')} missing from .env.example"
        assert _cpus(documented[m.group("var")]) == _cpus(m.group("default")), f".env.example {m.group('var')}"
        assert _cpus(interpolate(cpuset, {m.group("var"): "2-3"})) == {2, 3}


def test_cpu_layout_of_the_design() -> None:
    """VPS core 0: collector and Redis; core 1: forwarder, QuestDB and the rest (monitoring at low priority).
    Brain: every service on cores the operator sets, by default off core 0 (the trading processes')."""
    vps = load_compose(COMPOSE_FILES["vps"], _env())
    cpus = {name: svc["cpuset"] for name, svc in vps["services"].items()}
    assert cpus["collector"] == cpus["redis"] == "0"
    assert cpus["forwarder"] == cpus["questdb"] == "1"
    # The venue collectors (issue 18, profile) share the collector's core.
    assert {c for n, c in cpus.items() if n not in ("collector", "redis") and not n.startswith("collector-")} == {"1"}
    for name in ("prometheus", "alertmanager", "grafana", "node-exporter"):
        assert vps["services"][name]["cpu_shares"] < 1024, f"vps {name} competes at full priority"
    defaults = {k: v for k, v in _env().items() if not k.startswith("BRAIN_") or not k.endswith("_CPUSET")}
    brain = load_compose(COMPOSE_FILES["brain"], defaults)
    for name, svc in brain["services"].items():
        assert 0 not in _cpus(svc["cpuset"]), f"brain {name} on core 0 by default"
    moved = load_compose(COMPOSE_FILES["brain"], {**_env(), "BRAIN_RELAY_CPUSET": "14-15"})
    for name in ("redis", "questdb", "consumer", "writer"):
        assert moved["services"][name]["cpuset"] == "14-15", name


# ---- environment -----------------------------------------------------------------------------------------


def test_env_example_documents_every_variable() -> None:
    text = ENV_EXAMPLE.read_text()
    documented = set(re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", text, re.M))
    settings_vars = {name.upper() for name in Settings.model_fields}
    assert settings_vars - documented == set(), "Settings fields missing from .env.example"
    compose_vars = set().union(*(referenced_variables(p) for p in COMPOSE_FILES.values()))
    assert compose_vars - documented == set(), "compose variables missing from .env.example"
    acl_vars = set(re.findall(r"#@([A-Z0-9_]+)@", "".join(p.read_text() for p in (REPO_ROOT / "redis").glob("*.acl"))))
    assert acl_vars - documented == set(), "ACL password variables missing from .env.example"


def test_env_example_secrets_are_placeholders() -> None:
    env = _env()
    for name, value in env.items():
        user = name in ("QUESTDB_USER", "QUESTDB_READER_USER", "GRAFANA_ADMIN_USER")
        if re.search(r"PASSWORD|SECRET|TOKEN", name) or user:
            assert value.startswith("change-me-"), f"{name} must be a change-me-... placeholder"
    for path in COMPOSE_FILES.values():
        assert "change-me" not in path.read_text(), f"{path.name} hard-codes a placeholder secret"


def test_env_example_loads_as_settings_once_its_placeholders_are_replaced(tmp_path: Path) -> None:
    # As shipped, the placeholders are refused (they must never be live) ...
    with pytest.raises(ValidationError, match="change-me"):
        Settings(_env_file=ENV_EXAMPLE)  # type: ignore[call-arg]
    # ... and with each replaced by a generated secret (what the deploy docs say to do) it loads.
    lines = []
    for line in ENV_EXAMPLE.read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.startswith("#") and value.startswith("change-me-"):
            line = f"{name}={secrets.token_hex(24)}"
        lines.append(line)
    env_file = tmp_path / ".env"
    env_file.write_text("\n".join(lines) + "\n")
    settings = Settings(_env_file=env_file)  # type: ignore[call-arg]
    assert settings.symbols == DEFAULT_SYMBOLS
    # The RAM buffer spills before Redis' maxmemory (noeviction) would refuse writes.
    maxmemory = re.search(r"^maxmemory (\d+)mb$", (REPO_ROOT / "redis/vps.conf").read_text(), re.M)
    assert maxmemory and settings.ram_buffer_bytes + 150 * 10**6 <= int(maxmemory.group(1)) * 2**20


def test_each_role_container_gets_a_valid_configuration(host: str, compose: dict[str, Any], tmp_path: Path) -> None:
    """The exact environment compose hands a role builds a `Settings` (no `.env` inside the container), its
    passwords read from the compose secrets it mounts (here: files like `make secrets` writes)."""
    for role in ROLES[host]:
        svc = compose["services"][role]
        env = {k: str(v) for k, v in svc["environment"].items()}
        mounted = {}
        for secret in svc.get("secrets", []):
            path = tmp_path / role / secret
            path.parent.mkdir(exist_ok=True)
            path.write_text(secrets.token_hex(24) + "\n")
            path.chmod(0o440)
            mounted[f"/run/secrets/{secret}"] = str(path)
        for key, value in env.items():
            if key.endswith("_FILE"):
                assert value in mounted, f"{role}: {key}={value} is not a secret the service mounts"
                env[key] = mounted[value]
        settings = Settings(_env_file=None, **{k.lower(): v for k, v in env.items()})  # type: ignore[arg-type]
        assert settings.metrics_port_for(role) == int(env["METRICS_PORT"])
        assert settings.stream_key == "market:vps:stream"
        # The password reached the URL of the role's own user.
        url = settings.vps_redis_url if host == "vps" else settings.brain_redis_url
        assert url.startswith(f"redis://{role}:") and "@redis:6379" in url, url
        if role in ("forwarder", "writer"):
            assert settings.questdb_user and settings.questdb_password
        if role == "forwarder":
            assert settings.brain_redis_url.startswith("rediss://forwarder:")
            assert settings.redis_tls_ca and settings.redis_tls_cert and settings.redis_tls_key
        # Least privilege: a container sees only its own Redis user's password.
        others = [s for s in svc.get("secrets", []) if "redis" in s and f"_{role}_" not in s]
        assert others == [], f"{role} receives {others}"


#: The code each role's container runs, to find the settings it reads.
ROLE_SOURCES = {
    "collector": ["collector"],
    "forwarder": ["forwarder"],
    "consumer": ["brain/consumer.py", "brain/common.py"],
    "writer": [
        "brain/writer.py",
        *(f"brain/writer_{part}.py" for part in ("base", "streams", "rows", "flushing", "monitor")),
        "brain/common.py",
    ],
}


def test_each_role_container_gets_every_setting_its_code_reads(host: str, compose: dict[str, Any]) -> None:
    """A setting the code reads but compose does not pass would silently take its default (e.g. a
    CONSUMER_GROUP changed in .env reaching the consumer but not the forwarder)."""
    package = REPO_ROOT / "services" / "tickbridge"
    for role in ROLES[host]:
        files: list[Path] = []
        for source in ROLE_SOURCES[role]:
            path = package / source
            files += sorted(path.rglob("*.py")) if path.is_dir() else [path]
        read = set(re.findall(r"settings\.([a-z_]+)", "".join(f.read_text() for f in files)))
        fields = read & set(Settings.model_fields)
        given = {k.lower() for k in compose["services"][role]["environment"]}
        missing = fields - given - {"metrics_port"}
        assert not missing, f"{role} reads {sorted(missing)} but compose does not pass them"


# ---- exporters (issue 19) -------------------------------------------------------------------------------


def test_exporters_are_scraped_and_the_redis_exporter_logs_in_as_monitor_through_a_secret(
    host: str, compose: dict[str, Any]
) -> None:
    prom = yaml.safe_load((REPO_ROOT / "prometheus" / f"prometheus.{host}.yml").read_text())
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in prom["scrape_configs"]}
    assert targets[f"redis-{host}"] == ["redis-exporter:9121"] and targets["cadvisor"] == ["cadvisor:8080"]
    exporter = compose["services"]["redis-exporter"]
    env = exporter["environment"]
    assert env["REDIS_USER"] == "monitor" and env["REDIS_ADDR"] == "redis://redis:6379"
    assert not [k for k in env if "PASSWORD" in k and not k.endswith("_FILE")], "a password in the environment"
    # The monitor password arrives as a compose secret from .env, and the wrapper turns it into the
    # exporter's REDIS_PASSWORD_FILE (a JSON map keyed by REDIS_ADDR) before running the exporter.
    secret = f"{host}_redis_monitor_password"
    assert exporter["secrets"] == [secret]
    assert compose["secrets"][secret] in (
        {"environment": f"{host.upper()}_REDIS_MONITOR_PASSWORD"},
        {"file": f"./secrets/{secret}"},
    )
    script = exporter["entrypoint"][2]
    assert f"/run/secrets/{secret}" in script and env["REDIS_PASSWORD_FILE"] in script
    assert effective_command(exporter)[0] == "/redis_exporter"
    assert "-check-single-streams=db0=market:vps:stream" in effective_command(exporter)
    # The exporter image is the native stack's version (Debian's prometheus-redis-exporter 1.45).
    assert exporter["image"].startswith("oliver006/redis_exporter:v1.45.")
    # Pinned like every service (cpuset from a variable), with the monitoring on core 1 (core 0 is ingest's).
    raw = yaml.safe_load(COMPOSE_FILES[host].read_text())["services"]
    for name in ("redis-exporter", "cadvisor"):
        assert re.fullmatch(r"\$\{[A-Z_]+_CPUSET:-\d+\}", raw[name]["cpuset"]), name
    if host == "vps":
        assert load_compose(COMPOSE_FILES[host], _env())["services"]["redis-exporter"]["cpuset"] == "1"
