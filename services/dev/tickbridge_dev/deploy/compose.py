"""Read the compose files the way `docker compose config` would, without Docker.

`load_compose` parses YAML (anchors and `<<` merges resolved), then interpolates every string value
from an env mapping (`.env` semantics: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`,
`${VAR:?error}`, `${VAR?error}`), which is what the compose-spec schema validation and the structural
tests run against. `effective_command` is the argv a service's container runs. A development and
test helper: it needs PyYAML from the dev extras, which the runtime image does not install.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from tickbridge_dev.deploy.commands import NATIVE_COMMANDS, native_name

_VAR = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}"
    r"|(?P<named>[A-Za-z_][A-Za-z0-9_]*))"
)


class InterpolationError(ValueError):
    """A `${VAR:?message}` variable is missing, as `docker compose` would refuse it."""


def parse_env_file(path: Path) -> dict[str, str]:
    """`KEY=VALUE` lines of a `.env` file (comments and blank lines skipped, no quoting rules needed)."""
    env: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        env[key.strip()] = value.strip()
    return env


def _strings(node: Any) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [s for item in node for s in _strings(item)]
    if isinstance(node, dict):
        return [s for value in node.values() for s in _strings(value)]
    return []


def referenced_variables(path: Path) -> set[str]:
    """Every variable a compose file interpolates (in values, not in comments)."""
    names: set[str] = set()
    for text in _strings(yaml.safe_load(path.read_text())):
        for match in _VAR.finditer(text):
            name = match.group("braced") or match.group("named")
            if name:
                names.add(name)
    return names


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution for one string."""

    def sub(match: re.Match[str]) -> str:
        if match.group("escaped"):
            return "$"
        name = match.group("braced") or match.group("named")
        op, arg = match.group("op"), match.group("arg") or ""
        current = env.get(name)
        unset_or_empty = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-") and unset_or_empty:
            return arg
        if op in (":?", "?") and unset_or_empty:
            raise InterpolationError(f"{name}: {arg or 'required'}")
        return current or ""

    return _VAR.sub(sub, value)


def _walk(node: Any, env: Mapping[str, str]) -> Any:
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [_walk(item, env) for item in node]
    if isinstance(node, dict):
        return {key: _walk(value, env) for key, value in node.items()}
    return node


def load_compose(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    """The compose model after YAML merges and interpolation; `x-` extension keys are kept."""
    doc = yaml.safe_load(path.read_text())
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: not a mapping")
    result: dict[str, Any] = _walk(doc, env)
    return result


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return value.split()
    return [str(item) for item in value]


def effective_command(service: Mapping[str, Any]) -> list[str]:
    """The argv the container runs: entrypoint + command, seen through an `exec ... "$@"` shell wrapper.

    The images used here either have a pass-through entrypoint (redis, questdb: `exec "$@"` after
    dropping root) or none we rely on (tickbridge; prometheus has `entrypoint:` set explicitly). A shell
    wrapper that ends in `exec <entrypoint> "$@"` or `exec "$@"` (redis-exporter: it writes its password
    file first) runs the command.
    """
    entrypoint = _as_list(service.get("entrypoint"))
    command = _as_list(service.get("command"))
    wrapper = len(entrypoint) >= 3 and entrypoint[0].endswith(("sh", "bash")) and entrypoint[1] == "-c"
    if wrapper and re.search(r'exec\s+(\S+\s+)?"\$@"\s*$', entrypoint[2]):
        return command
    return entrypoint + command


def native_process(service: Mapping[str, Any]) -> str | None:
    """The NATIVE_COMMANDS name a compose service runs, or None."""
    return native_name(effective_command(service))


__all__ = [
    "NATIVE_COMMANDS",
    "InterpolationError",
    "effective_command",
    "interpolate",
    "load_compose",
    "native_process",
    "parse_env_file",
    "referenced_variables",
]
