"""`tickbridge <command>`: one console script, a sub-command per role (see the contract)."""

from __future__ import annotations

import importlib
import importlib.metadata
import sys
from collections.abc import Callable

#: command -> (module, function, help). Each function takes the remaining argv.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "collector": ("tickbridge.collector.main", "main", "Binance WebSocket -> HOT deque + WARM Redis + VPS stream"),
    "forwarder": ("tickbridge.forwarder.main", "main", "VPS stream -> Brain stream; spill to/replay from QuestDB"),
    "consumer": ("tickbridge.brain.consumer", "main", "Brain stream (consumer group) -> per-symbol keys"),
    "writer": ("tickbridge.brain.writer", "main", "per-symbol keys -> QuestDB tables"),
    "query": ("tickbridge.brain.query", "main", "show recent ticks / a time range from the tiered cache"),
    "deadletters": ("tickbridge.brain.deadletters", "main", "consumer dead letters by reason; --replay after a fix"),
    "check": ("tickbridge.ops.check", "main", "health check of a role (exit 0 healthy, 1 not)"),
    "status": ("tickbridge.ops.status", "main", "pipeline figures, live or --once; names what it cannot read"),
}


#: Commands the development package (tickbridge-dev) provides: the runtime never imports it by name, it
#: finds them as entry points of this group; without the dev package they print one line (see `plugin`).
PLUGIN_GROUP = "tickbridge.commands"
PLUGIN_COMMANDS: dict[str, str] = {"sim": "Binance-compatible exchange simulator (WebSocket + REST)"}


def plugin(command: str) -> Callable[[list[str]], None] | None:
    """The `main` a `tickbridge.commands` entry point registers for `command`, or None if none does."""
    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP, name=command):
        try:
            func: Callable[[list[str]], None] = entry.load()
        except ModuleNotFoundError as exc:
            if exc.name != entry.module.partition(".")[0]:
                raise  # a bug inside the package, not a missing package
            return None  # registered, but the package is gone (a stale install)
        return func
    return None


def usage() -> str:
    lines = ["usage: tickbridge <command> [options]", "", "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += [f"  {name:<12} {help_} (development install)" for name, help_ in PLUGIN_COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help"}:
        print(usage())
        raise SystemExit(0 if args else 2)
    command, rest = args[0], args[1:]
    if command in PLUGIN_COMMANDS:
        func = plugin(command)
        if func is None:
            print(f"tickbridge: {command!r} is part of the development package, not installed here "
                  "(pip install -e services/dev, or `make deps` in a clone)", file=sys.stderr)  # fmt: skip
            raise SystemExit(2)
        func(rest)
        return
    if command not in COMMANDS:
        print(f"tickbridge: unknown command {command!r}\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    module_name, func_name, _ = COMMANDS[command]
    func = getattr(importlib.import_module(module_name), func_name)
    func(rest)
