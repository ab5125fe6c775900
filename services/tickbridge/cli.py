"""`tickbridge <command>`: one console script, a sub-command per role (see the contract)."""

from __future__ import annotations

import importlib
import sys

#: command -> (module, function, help). Each function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "collector": ("tickbridge.collector.main", "main", "Binance WebSocket -> HOT deque + WARM Redis + VPS stream"),
    "forwarder": ("tickbridge.forwarder.main", "main", "VPS stream -> Brain stream; spill to/replay from QuestDB"),
    "consumer": ("tickbridge.brain.consumer", "main", "Brain stream (consumer group) -> per-symbol keys"),
    "writer": ("tickbridge.brain.writer", "main", "per-symbol keys -> QuestDB tables"),
    "sim": ("tickbridge.sim.main", "main", "Binance-compatible exchange simulator (WebSocket + REST)"),
    "query": ("tickbridge.brain.query", "main", "show recent ticks / a time range from the tiered cache"),
    "deadletters": ("tickbridge.brain.deadletters", "main", "consumer dead letters by reason; --replay after a fix"),
    "check": ("tickbridge.ops.check", "main", "health check of a role (exit 0 healthy, 1 not)"),
    "status": ("tickbridge.devstack.status", "main", "pipeline figures, live or --once; names what it cannot read"),
}


def usage() -> str:
    lines = ["usage: tickbridge <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"tickbridge: unknown command {command!r}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func_name, _ = COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    func(rest)
