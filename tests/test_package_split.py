"""The runtime package `tickbridge` never imports the development package `tickbridge_dev` (issue 15): every
module's import statements, `importlib.import_module(...)`/`__import__(...)` calls and module-path string
literals are walked, so a lazy import cannot sneak the harness back into production. The CLI reaches the
harness's commands only through the `tickbridge.commands` entry-point group."""

from __future__ import annotations

import ast
import importlib.metadata
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

import tickbridge
import tickbridge_dev
from tickbridge import cli

pytestmark = pytest.mark.timeout(30)

RUNTIME_ROOT = Path(tickbridge.__file__).resolve().parent
DEV_ROOT = Path(tickbridge_dev.__file__).resolve().parent
DEV = "tickbridge_dev"
#: The harness's parts: none of them may live in the runtime package, under any name.
HARNESS_NAMES = {"sim", "devstack", "bench", "loadgen", "tickbridge_dev"}
_MODULE_PATH = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*(:\w+)?$")


def module_name(path: Path, root: Path, package: str) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([package, *parts])


def imported_names(path: Path, module: str) -> Iterator[tuple[int, str]]:
    """(line, dotted name) of every import the module can make: statements (relative ones resolved),
    `import_module`/`__import__` calls with a literal, and string literals that look like module paths
    (`"pkg.mod"`, `"pkg.mod:func"`: tables such as the CLI's command map feed `import_module` later)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            yield node.lineno, base
            for alias in node.names:
                yield node.lineno, f"{base}.{alias.name}"
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if name in {"import_module", "__import__"} and isinstance(node.args[0].value, str):
                yield node.lineno, node.args[0].value
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_PATH.match(node.value):
            yield node.lineno, node.value.partition(":")[0]


def runtime_modules() -> list[tuple[Path, str]]:
    return [(p, module_name(p, RUNTIME_ROOT, "tickbridge")) for p in sorted(RUNTIME_ROOT.rglob("*.py"))]


def test_the_walk_sees_every_kind_of_import(tmp_path: Path) -> None:
    """The walker itself: each way of importing the harness is found (a walker that finds nothing passes)."""
    pkg = tmp_path / "tickbridge" / "ops"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "import tickbridge_dev.sim\n"
        "from tickbridge_dev.devstack import tls\n"
        "import importlib\n"
        "importlib.import_module('tickbridge_dev.bench.brain')\n"
        "TABLE = {'sim': ('tickbridge_dev.sim.main', 'main')}\n"
        "def f() -> None:\n"
        "    from tickbridge_dev import deploy\n"
    )
    found = {name for _, name in imported_names(pkg / "x.py", "tickbridge.ops.x") if name.startswith(DEV)}
    assert found >= {"tickbridge_dev.sim", "tickbridge_dev.devstack.tls", "tickbridge_dev.bench.brain",
                     "tickbridge_dev.sim.main", "tickbridge_dev.deploy"}  # fmt: skip
    (pkg / "y.py").write_text("from ..sim import server\n")
    assert "tickbridge.sim.server" in {name for _, name in imported_names(pkg / "y.py", "tickbridge.ops.y")}


def test_runtime_never_imports_the_development_package() -> None:
    modules = runtime_modules()
    assert len(modules) > 30, "the walk found too few runtime modules"
    bad = [
        f"{path.relative_to(RUNTIME_ROOT.parent)}:{line}: {name}"
        for path, module in modules
        for line, name in imported_names(path, module)
        if name == DEV or name.startswith(DEV + ".")
    ]
    assert not bad, "the runtime imports the development package:\n" + "\n".join(bad)


def test_runtime_holds_no_harness_module() -> None:
    """Nothing named like the harness (sim, devstack, bench, loadgen) lives in, or is imported by, the runtime."""
    modules = runtime_modules()
    inside = [m for _, m in modules if HARNESS_NAMES & set(m.split(".")[1:])]
    assert not inside, inside
    imported = sorted(
        f"{module}: {name}"
        for path, module in modules
        for _, name in imported_names(path, module)
        if name.startswith("tickbridge.") and HARNESS_NAMES & set(name.split(".")[1:])
    )
    assert not imported, imported


def test_development_package_depends_on_the_runtime() -> None:
    """The other direction is allowed and real: the harness builds on the runtime's modules."""
    uses = {
        name
        for path in DEV_ROOT.rglob("*.py")
        for _, name in imported_names(path, module_name(path, DEV_ROOT, DEV))
        if name.startswith("tickbridge.")
    }
    assert any(name.startswith("tickbridge.core") for name in uses)
    requires = importlib.metadata.requires("tickbridge-dev") or []
    assert any(req.replace(" ", "").startswith("tickbridge==") for req in requires), requires


def test_cli_finds_sim_through_the_entry_point_group() -> None:
    (entry,) = importlib.metadata.entry_points(group=cli.PLUGIN_GROUP, name="sim")
    assert entry.value.startswith(DEV + ".")
    assert cli.plugin("sim") is entry.load()
    assert set(cli.PLUGIN_COMMANDS).isdisjoint(cli.COMMANDS)


def test_cli_names_the_missing_development_package(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A runtime-only install (the image): `tickbridge sim` exits 2 with one line, no traceback."""
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: importlib.metadata.EntryPoints(()))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sim", "--help"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "development package" in err, err


def test_cli_treats_a_stale_registration_as_missing(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The entry point is registered but its package is gone: the same one line, not a traceback."""
    gone = importlib.metadata.EntryPoint("sim", "tickbridge_dev_gone.sim.main:main", cli.PLUGIN_GROUP)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: importlib.metadata.EntryPoints((gone,)))
    with pytest.raises(SystemExit) as exc:
        cli.main(["sim"])
    assert exc.value.code == 2
    assert "development package" in capsys.readouterr().err
