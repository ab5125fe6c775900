"""The container image, checked without Docker: pinned base and build tools, a complete dependency lock that
matches what the tests run, a non-root user, and a build context holding only what the image needs."""

from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import subprocess
import tempfile
import tomllib
from pathlib import Path

import pytest
import setuptools
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tickbridge_dev.devstack.servers import REPO_ROOT

pytestmark = pytest.mark.timeout(30)

DOCKERFILE = REPO_ROOT / "services" / "Dockerfile"
CONSTRAINTS = REPO_ROOT / "services" / "constraints.txt"


def runtime_closure() -> dict[str, str]:
    """Every distribution `pip install tickbridge` pulls in (no extras), at the installed versions."""
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [("tickbridge", frozenset())]
    while todo:
        name, extras = todo.pop()
        dist = md.distribution(name)
        key = canonicalize_name(dist.metadata["Name"])
        if key != "tickbridge":
            found[key] = dist.version
        for raw in dist.requires or []:
            req = Requirement(raw)
            if req.marker is not None and not any(req.marker.evaluate({"extra": e}) for e in (extras or {""})):
                continue
            if canonicalize_name(req.name) in found and not req.extras:
                continue
            todo.append((req.name, frozenset(req.extras)))
    return found


def locked() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_lock_is_the_runtime_closure_at_tested_versions() -> None:
    expected = runtime_closure()
    body = "\n".join(f"{k}=={v}" for k, v in sorted(expected.items()))
    assert locked() == expected, f"regenerate services/constraints.txt:\n{body}"


def test_lock_agrees_with_pyproject_pins() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = locked()
    for raw in project["dependencies"]:
        req = Requirement(raw)
        (spec,) = req.specifier
        assert spec.operator == "==", f"{raw} is not pinned"
        assert pins[canonicalize_name(req.name)] == spec.version, raw


def test_dockerfile_is_pinned_small_and_non_root() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1))
    assert all(line.split()[1] in ("${PYTHON_IMAGE}",) for line in text.splitlines() if line.startswith("FROM "))
    # Two stages: build tools and pip stay out of the runtime image.
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"pip install setuptools==[\d.]+ wheel==[\d.]+", text)
    assert "--only-binary=:all: -r /tmp/constraints.txt" in text
    assert "--no-deps" in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1].split(":")[0] not in ("0", "root")
    ignore = (REPO_ROOT / "services" / "Dockerfile.dockerignore").read_text().splitlines()
    assert "**" in ignore
    assert "!services/constraints.txt" in ignore and "!pyproject.toml" in ignore


def build_context() -> list[str]:
    """The repository files BuildKit sends for services/Dockerfile: Docker's rules (patterns in order, the
    last match wins, `!` re-includes, `**` any path, `*` one path element; a match on a directory covers
    what is in it), applied to the tracked files."""
    rules: list[tuple[bool, re.Pattern[str]]] = []
    for line in (REPO_ROOT / "services" / "Dockerfile.dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        include, pattern = line.startswith("!"), line.lstrip("!").strip("/")
        regex = "".join(".*" if part == "**" else re.escape(part).replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
                        for part in re.split(r"(\*\*)", pattern))  # fmt: skip
        rules.append((include, re.compile(regex + "(/.*)?")))
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
    sent = []
    for path in files.splitlines():
        keep = True
        for include, regex in rules:
            if regex.fullmatch(path):
                keep = include
        if keep:
            sent.append(path)
    return sent


def test_image_installs_the_runtime_alone() -> None:
    """The image's package list (issue 15): what `pip install /src` finds in the build context, by the
    root pyproject's own package discovery, holds no simulator, devstack, bench, load generator or deploy check,
    and registers no harness command."""
    context = build_context()
    assert "pyproject.toml" in context and "services/tickbridge/cli.py" in context
    assert not [p for p in context if p.startswith("services/dev/")], "the harness is in the build context"
    # Two distributions: the image builds the root project only, never services/dev.
    text = DOCKERFILE.read_text()
    assert "services/dev" not in text and "tickbridge_dev" not in text and "tickbridge-dev" not in text
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    find = project["tool"]["setuptools"]["packages"]["find"]
    with tempfile.TemporaryDirectory() as tmp:
        for path in context:
            (Path(tmp) / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(REPO_ROOT / path, Path(tmp) / path)
        packages = setuptools.find_namespace_packages(
            where=str(Path(tmp) / find["where"][0]), include=find.get("include", ["*"])
        )
        modules = [
            ".".join(p.relative_to(Path(tmp) / find["where"][0]).with_suffix("").parts)
            for p in (Path(tmp) / find["where"][0]).rglob("*.py")
            if ".".join(p.relative_to(Path(tmp) / find["where"][0]).parent.parts) in packages
        ]
    assert "tickbridge" in packages and "tickbridge.ops" in packages
    assert "tickbridge.ops.secrets_init" in modules and "tickbridge.ops.status" in modules
    harness = {"sim", "devstack", "bench", "loadgen", "tickbridge_dev", "deploy"}
    shipped = [m for m in modules if harness & set(m.split(".")) or m.rpartition(".")[2] == "loadgen"]
    assert not shipped, f"the image would ship the harness: {shipped}"
    assert "tickbridge.commands" not in project.get("entry-points", {}), "the runtime must not register plugins"
