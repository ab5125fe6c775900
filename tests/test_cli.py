"""The `tickbridge` command line (issue 15): one parser for every command, `--version`, each command's
`--help` listing the environment variables it reads with their defaults, LOG_LEVEL in any case, byte sizes
with units, and one clear line with a non-zero exit for a bad value."""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from tickbridge import cli
from tickbridge.core.settings import ReadBy, Settings, config_error_line, variables_read_by

pytestmark = pytest.mark.timeout(60)

#: The roles every deployment and the native stack start (the public command names; never renamed).
CONTRACT_COMMANDS = {"collector", "forwarder", "consumer", "writer", "sim"}


def tickbridge(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`python -m tickbridge ...` with a clean tickbridge environment (no .env: cwd is a temp dir)."""
    base = {k: v for k, v in os.environ.items() if k.upper() not in {n.upper() for n in Settings.model_fields}}
    return subprocess.run([sys.executable, "-m", "tickbridge", *args], env={**base, **(env or {})}, cwd=cwd,
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def help_of(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


ALL_COMMANDS = set(cli.COMMANDS) | set(cli.PLUGIN_COMMANDS)


# ---- one parser, every command ---------------------------------------------------------------------------


def test_every_contract_command_is_a_sub_command() -> None:
    assert set(cli.COMMANDS) | set(cli.PLUGIN_COMMANDS) >= CONTRACT_COMMANDS


def test_version_is_the_installed_one(tmp_path: Path) -> None:
    proc = tickbridge("--version", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tickbridge {importlib.metadata.version('tickbridge')}"
    script = Path(sys.executable).parent / "tickbridge"  # the console script pip installed beside python
    if script.exists():
        console = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
        assert console.returncode == 0 and console.stdout == proc.stdout


def test_top_level_help_lists_every_command(tmp_path: Path) -> None:
    proc = tickbridge("--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for name, spec in cli.COMMANDS.items():
        assert name in proc.stdout and spec.summary in proc.stdout
    for name, summary in cli.PLUGIN_COMMANDS.items():
        assert name in proc.stdout and summary in proc.stdout


@pytest.mark.parametrize("args", [[], ["nosuch"], ["collector", "--nosuch"]])
def test_usage_errors_exit_2_with_one_error_line(args: list[str], tmp_path: Path) -> None:
    proc = tickbridge(*args, cwd=tmp_path)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("tickbridge"), proc.stderr


@pytest.mark.parametrize("command", sorted(ALL_COMMANDS))
def test_command_help_lists_the_variables_it_reads_with_defaults(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = help_of(command, capsys)
    assert out.startswith(f"usage: tickbridge {command}")
    expected = variables_read_by(command)
    assert expected, f"{command} reads no setting?"
    for var in expected:
        assert f"  {var.name}={var.default}\n      {var.description}\n" in out
    # Nothing it does not read: the list is the command's, not the whole Settings class.
    listed = {line.split("=", 1)[0].strip() for line in out.splitlines() if line.startswith("  ") and "=" in line}
    everything = {name.upper() for name in Settings.model_fields}
    assert listed & everything == {var.name for var in expected}


def test_role_help_in_a_process(tmp_path: Path) -> None:
    proc = tickbridge("forwarder", "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "RAM_BUFFER_BYTES=3000000000 (3.0GB)" in proc.stdout
    assert "DISK_BUFFER_BYTES=40000000000 (40.0GB)" in proc.stdout
    assert "METRICS_PORT=(unset: 9102)" in proc.stdout
    assert "TB are powers of 1000" in proc.stdout and "TiB powers of 1024" in proc.stdout
    assert "BINANCE_WS_URL" not in proc.stdout  # the collector's, not the forwarder's


def test_sim_help_keeps_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    out = help_of("sim", capsys)
    for option in ("--mode", "--replay", "--speed", "--max-send-buffer", "--metrics-port"):
        assert option in out


def test_every_setting_names_existing_commands() -> None:
    for name, field in Settings.model_fields.items():
        marks = [m for m in field.metadata if isinstance(m, ReadBy)]
        assert marks, f"{name}: no ReadBy: which command reads it?"
        unknown = {c for m in marks for c in m.commands} - ALL_COMMANDS
        assert not unknown, f"{name}: ReadBy names unknown commands {unknown}"


def _command_sources(command: str) -> list[Path]:
    """The files of a command's own code: its module and the layers split off it (`writer_*.py` beside
    `writer.py`), or its whole package when the module is `<pkg>.main`."""
    if command in cli.PLUGIN_COMMANDS:  # a development command: its module is the entry point's
        module = cli.plugin(command)
        assert module is not None and module.__file__ is not None
        origin = Path(module.__file__)
    else:
        spec = importlib.util.find_spec(cli.COMMANDS[command].module)
        assert spec is not None and spec.origin is not None
        origin = Path(spec.origin)
    if origin.stem == "main":
        return sorted(origin.parent.glob("*.py"))
    return [origin, *sorted(origin.parent.glob(f"{origin.stem}_*.py"))]


def _settings_attributes(path: Path) -> set[str]:
    """Attributes read off a name or attribute called `settings` (`settings.x`, `self.settings.x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute):
            owner = node.value
            named = owner.id if isinstance(owner, ast.Name) else owner.attr if isinstance(owner, ast.Attribute) else ""
            if named == "settings":
                found.add(node.attr)
    return found


@pytest.mark.parametrize("command", sorted(ALL_COMMANDS))
def test_the_help_names_every_setting_the_command_code_reads(command: str) -> None:
    """The ReadBy marks are written by hand once: a setting read in a command's code but not marked for it
    would be missing from its --help."""
    read = set().union(*(_settings_attributes(p) for p in _command_sources(command))) & set(Settings.model_fields)
    declared = {var.name.lower() for var in variables_read_by(command)}
    assert read - declared == set(), f"{command} reads {sorted(read - declared)} without ReadBy({command!r})"


def test_a_missing_command_module_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(cli.COMMANDS, "query", cli.Command("tickbridge_not_installed.query", "query"))
    with pytest.raises(SystemExit) as exc:
        cli.main(["query"])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == (
        "tickbridge query: not installed in this environment (tickbridge_not_installed.query is missing)"
    )


# ---- values ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["info", "INFO", "Info", " warning "])
def test_log_level_in_any_case(given: str) -> None:
    assert Settings(log_level=given).log_level == given.strip().upper()  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("3GB", 3_000_000_000),  # SI: what disks and cloud plans mean by GB
        ("3gb", 3_000_000_000),
        ("3 GB", 3_000_000_000),
        ("1.5GB", 1_500_000_000),
        ("512MiB", 512 * 2**20),  # binary with the i
        ("3GiB", 3 * 2**30),
        ("100kB", 100_000),
        ("100KiB", 102_400),
        ("3000000000", 3_000_000_000),  # plain integers are bytes, as before
    ],
)
def test_byte_sizes_take_units(given: str, expected: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAM_BUFFER_BYTES", given)
    monkeypatch.setenv("DISK_BUFFER_BYTES", given)
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert settings.ram_buffer_bytes == expected and settings.disk_buffer_bytes == expected
    assert isinstance(settings.ram_buffer_bytes, int)


@pytest.mark.parametrize("given", ["3XB", "lots", "-1", "0", "GB", "", "9" * 400, "9" * 5000 + "GB"])
def test_bad_byte_sizes_name_the_variable(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RAM_BUFFER_BYTES", given)
    with pytest.raises(ValidationError) as exc:
        Settings(_env_file=None)  # type: ignore[call-arg]
    line = config_error_line(exc.value)
    assert line.startswith("config error: RAM_BUFFER_BYTES: ") and "\n" not in line


@pytest.mark.parametrize(
    ("command", "env", "names"),
    [
        ("forwarder", {"RAM_BUFFER_BYTES": "3XB"}, "RAM_BUFFER_BYTES"),
        ("collector", {"LOG_LEVEL": "loud"}, "LOG_LEVEL"),
        ("consumer", {"CONSUMER_BATCH": "many"}, "CONSUMER_BATCH"),
        ("writer", {"DISK_BUFFER_BYTES": "-5GB"}, "DISK_BUFFER_BYTES"),
    ],
)
def test_a_bad_value_is_one_line_and_a_non_zero_exit(
    command: str, env: dict[str, str], names: str, tmp_path: Path
) -> None:
    proc = tickbridge(command, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()], proc.stderr
    assert proc.stderr.startswith(f"config error: {names}: "), proc.stderr
    assert "Traceback" not in proc.stderr


def test_lower_case_log_level_starts_a_role(tmp_path: Path) -> None:
    """`LOG_LEVEL=info` passes configuration and sets the level: the simulator (no servers needed) logs its
    INFO start line (`LOG_LEVEL=warning` would hide it)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "tickbridge", "sim", "--port", "0", "--metrics-port", "0", "--symbols", "BTCUSDT"],
        env={**os.environ, "LOG_LEVEL": "info"}, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert " INFO " in first and "sim synthetic on 127.0.0.1:0" in first, first


def test_the_health_check_stays_light(tmp_path: Path) -> None:
    """Compose runs `tickbridge check <role>` every few seconds with METRICS_PORT set: the one parser must not
    make it import pydantic, redis or another command's module."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "tickbridge", "check", "collector", "--timeout", "0.2"],
        env={**os.environ, "METRICS_PORT": "1"}, cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 1  # nothing listens on port 1: unhealthy, said in one line
    assert proc.stderr.splitlines()[-1].startswith("unhealthy: collector: "), proc.stderr[-500:]
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "tickbridge.cli" in imported
    heavy = {name for name in imported if name.split(".")[0] in {"pydantic", "redis", "aiohttp", "websockets"}}
    heavy |= {name for name in imported if name.startswith(("tickbridge_dev", "tickbridge.brain"))}
    assert not heavy, sorted(heavy)
