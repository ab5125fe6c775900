"""`tickbridge <command>`: one console script and one argument parser, a sub-command per role (see the contract).

A command's module is imported only when that command runs (a health check does not load the simulator,
nor pydantic: see ops/check.py). It provides `run_command(args)` and, when it takes options,
`add_arguments(parser)`. `tickbridge <command> --help` lists the environment variables the command reads
with their defaults, taken from the `ReadBy` marks of `core.settings.Settings` (so the list cannot drift
from the code's configuration) when the help is printed.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from types import ModuleType
from typing import cast


@dataclass(frozen=True)
class Command:
    """A sub-command: the module that runs it and the one line `tickbridge --help` shows."""

    module: str
    summary: str


COMMANDS: dict[str, Command] = {
    "collector": Command("tickbridge.collector.main", "Binance WebSocket -> HOT deque + WARM Redis + VPS stream"),
    "forwarder": Command("tickbridge.forwarder.main", "VPS stream -> Brain stream; spill to/replay from QuestDB"),
    "consumer": Command("tickbridge.brain.consumer", "Brain stream (consumer group) -> per-symbol keys"),
    "writer": Command("tickbridge.brain.writer", "per-symbol keys -> QuestDB tables"),
    "query": Command("tickbridge.brain.query", "show recent ticks / a time range from the tiered cache"),
    "deadletters": Command("tickbridge.brain.deadletters", "consumer dead letters by reason; --replay after a fix"),
    "check": Command("tickbridge.ops.check", "health check of a role (exit 0 healthy, 1 not)"),
    "status": Command("tickbridge.ops.status", "pipeline figures, live or --once; names what it cannot read"),
}

#: Commands the development package (tickbridge-dev) provides: the runtime never imports it by name, it
#: finds their modules as entry points of this group; without the dev package they print one line.
PLUGIN_GROUP = "tickbridge.commands"
PLUGIN_COMMANDS: dict[str, str] = {"sim": "Binance-compatible exchange simulator (WebSocket + REST)"}


def plugin(command: str) -> ModuleType | None:
    """The module a `tickbridge.commands` entry point registers for `command`, or None if none does."""
    import importlib.metadata  # only for the development commands

    for entry in importlib.metadata.entry_points(group=PLUGIN_GROUP, name=command):
        try:
            return cast(ModuleType, entry.load())
        except ModuleNotFoundError as exc:
            if exc.name != entry.module.partition(".")[0]:
                raise  # a bug inside the package, not a missing package
            return None  # registered, but the package is gone (a stale install)
    return None


BYTE_SIZES = (
    "Byte sizes take a unit, any case: kB, MB, GB, TB are powers of 1000 (3GB = 3000000000), KiB, MiB, GiB,\n"
    "TiB powers of 1024 (512MiB = 536870912); a plain integer is bytes."
)


def version() -> str:
    """The installed distribution's version (the one in pyproject.toml)."""
    import importlib.metadata  # 0.1 s of imports: only for --version, not for every health check

    try:
        return importlib.metadata.version("tickbridge")
    except importlib.metadata.PackageNotFoundError:  # run from a tree that was never installed
        return "unknown"


class VersionAction(argparse.Action):
    """`--version`, looked up only when asked for."""

    def __init__(self, option_strings: list[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help="show the installed version and exit")

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        print(f"tickbridge {version()}")  # on stdout, as argparse's own "version" action
        parser.exit()


def environment_help(command: str) -> str:
    """The `--help` epilog of `command`: each variable it reads, its default and meaning."""
    from tickbridge.core.settings import variables_read_by  # pydantic: only when help is printed

    found = variables_read_by(command)
    if not found:
        return "Environment: none read."
    lines = ["Environment (or `.env` in the working directory), with defaults:"]
    for var in found:
        lines += [f"  {var.name}={var.default}", f"      {var.description}"]
    if any(var.name.endswith("_BYTES") for var in found):
        lines += ["", BYTE_SIZES]
    return "\n".join(lines)


def load(command: str) -> ModuleType:
    """Import the command's module; one line and exit 2 when it is not installed here."""
    if command in PLUGIN_COMMANDS:
        found = plugin(command)
        if found is None:
            print(
                f"tickbridge {command}: part of the development package, not installed here "
                "(pip install -e services/dev, or `make deps` in a clone)",
                file=sys.stderr,
            )
            raise SystemExit(2)
        return found
    module_name = COMMANDS[command].module
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            print(
                f"tickbridge {command}: not installed in this environment ({module_name} is missing)", file=sys.stderr
            )
            raise SystemExit(2) from None
        raise


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser, whose help ends with the environment variables the command reads."""

    def format_help(self) -> str:
        if self.epilog is None:
            self.epilog = environment_help(self.prog.rsplit(" ", 1)[-1])
        return super().format_help()


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole CLI. Only `command`'s sub-parser gets its options (importing that command's module)."""
    parser = argparse.ArgumentParser(
        prog="tickbridge",
        description="Exactly-once live market data from an exchange-side VPS to a trading Brain.",
        epilog="`tickbridge <command> --help` lists the command's options and environment variables.",
    )
    parser.add_argument("--version", action=VersionAction)
    subparsers = parser.add_subparsers(dest="command", metavar="<command>", required=True, parser_class=CommandParser)
    summaries = {name: spec.summary for name, spec in COMMANDS.items()}
    summaries |= {name: f"{summary} (development install)" for name, summary in PLUGIN_COMMANDS.items()}
    for name, summary in summaries.items():
        sub = subparsers.add_parser(
            name, help=summary, description=summary, formatter_class=argparse.RawDescriptionHelpFormatter
        )  # fmt: skip
        if name == command:
            module = load(name)
            add_arguments = getattr(module, "add_arguments", None)
            if add_arguments is not None:
                add_arguments(sub)
            sub.set_defaults(run_command=module.run_command)
    return parser


def main(argv: list[str] | None = None) -> None:
    """Parse `argv` (default: the process's) and run the command it names."""
    args = sys.argv[1:] if argv is None else argv
    # The top level takes only flags without values, so the first other word names the command.
    command = next((a for a in args if not a.startswith("-")), None)
    known = command in COMMANDS or command in PLUGIN_COMMANDS
    parsed = build_parser(command if known else None).parse_args(args)
    parsed.run_command(parsed)
