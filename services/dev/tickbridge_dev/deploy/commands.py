"""The canonical command of every process, shared by the compose files and the native stack.

Each compose service must run what the native stack (`make demo`, the tests) runs, so what is tested
here is what is deployed there. A spec is a list of tokens matched as an ordered subsequence of the
real argv: `<name>` matches any one argument, `--flag=<name>` any `--flag=...`, and the program
matches by basename (`/usr/bin/redis-server` is `redis-server`; `python -m tickbridge` is
`tickbridge`; Debian's `prometheus-alertmanager` is `alertmanager`, `prometheus-redis-exporter` is
`redis_exporter`). Extra arguments (JVM sizing,
retention, ...) are allowed.
"""

from __future__ import annotations

import os
import re

#: process name -> canonical argv spec. Role names are the `tickbridge` sub-commands of the contract.
NATIVE_COMMANDS: dict[str, list[str]] = {
    "collector": ["tickbridge", "collector"],
    "forwarder": ["tickbridge", "forwarder"],
    "consumer": ["tickbridge", "consumer"],
    "writer": ["tickbridge", "writer"],
    "sim": ["tickbridge", "sim"],
    "redis": ["redis-server", "<conf>"],
    "questdb": ["java", "-m", "io.questdb/io.questdb.ServerMain", "-d", "<root>"],
    "prometheus": ["prometheus", "--config.file=<file>"],
    "alertmanager": ["alertmanager", "--config.file=<file>"],
    # Flags or REDIS_* variables (address, user, password file) vary; the program is what must match.
    "redis-exporter": ["redis_exporter"],
}

#: Compose services with no native counterpart, and why that is acceptable.
COMPOSE_ONLY: dict[str, str] = {
    "grafana": "dashboards only read Prometheus; their PromQL is tested against the native Prometheus",
    "node-exporter": "host metrics (CPU per core, RAM, disk, network) exist only on a real host",
    "init": "one-shot: renders the Redis ACL with tickbridge.ops.acl.render_acl, as the native TLS stack does",
    "forwarder-tls": "one-shot: hands the TLS client files of `make certs` to the image's uid",
    "cadvisor": "per-container CPU and memory against mem_limit: the native stack runs no containers",
}

_PLACEHOLDER = re.compile(r"^<[a-z_]+>$")


def normalize(argv: list[str]) -> list[str]:
    """Program by basename; `python -m tickbridge ...` is the `tickbridge` console script."""
    if not argv:
        return []
    program = os.path.basename(argv[0])
    if program == "prometheus-alertmanager":  # Debian's name for the image's `alertmanager`
        program = "alertmanager"
    if program == "prometheus-redis-exporter":  # Debian's name for the image's `/redis_exporter`
        program = "redis_exporter"
    rest = list(argv[1:])
    if re.fullmatch(r"python[0-9.]*", program) and rest[:2] == ["-m", "tickbridge"]:
        program, rest = "tickbridge", rest[2:]
    return [program, *rest]


def _token_matches(spec: str, arg: str) -> bool:
    if _PLACEHOLDER.match(spec):
        return True
    flag, eq, value = spec.partition("=")
    if eq and _PLACEHOLDER.match(value):
        return arg.startswith(f"{flag}=") and len(arg) > len(flag) + 1
    return spec == arg


def command_matches(argv: list[str], spec: list[str]) -> bool:
    """True if `argv` runs the program of `spec` with the spec's arguments in order (extras allowed)."""
    args = normalize(argv)
    if not args or not spec or args[0] != spec[0]:
        return False
    pos = 1
    for token in spec[1:]:
        while pos < len(args) and not _token_matches(token, args[pos]):
            pos += 1
        if pos == len(args):
            return False
        pos += 1
    return True


def native_name(argv: list[str]) -> str | None:
    """The NATIVE_COMMANDS entry `argv` runs, or None."""
    for name, spec in NATIVE_COMMANDS.items():
        if command_matches(argv, spec):
            return name
    return None
