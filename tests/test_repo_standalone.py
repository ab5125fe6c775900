"""The repository stands alone: nothing it tracks reads or links outside itself (issue 15).

A user's clone has nothing beside it, so a test, a doc or a script that reaches for `../something`
works only on the machine it was written on. These checks read every tracked text file.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import unquote

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
THIS_FILE = Path(__file__).resolve().relative_to(REPO_ROOT).as_posix()

#: Ways a file has pointed outside the repository: `../shared/...`, `Path(...).parent / "shared"`, and any
#: path into the engineers' reference folder (`shared/data`, `/work/shared/schemas`, `shared/reference`, ...).
OUTSIDE = re.compile(r"\.\./shared\b|parent\s*/\s*[\"']shared[\"']|\bshared/(?:data|schemas|reference|contract\.md)")
#: Markdown links `[text](target)`, the target up to a space or `)`.
MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s[^)]*)?\)")


def tracked_files() -> list[str]:
    """Every file git tracks here (the clone's content); skipped outside a git checkout (an sdist)."""
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "ls-files", "-z"], capture_output=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [name for name in out.stdout.decode().split("\0") if name]


def text_of(name: str) -> str | None:
    path = REPO_ROOT / name
    if not path.is_file() or path.suffix in {".gz", ".png", ".jar"}:
        return None
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return None


def test_no_tracked_file_reaches_outside_the_repository() -> None:
    hits = []
    for name in tracked_files():
        text = text_of(name)
        if text is None or name == THIS_FILE:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if OUTSIDE.search(line):
                hits.append(f"{name}:{lineno}: {line.strip()[:100]}")
    assert not hits, "references outside the repository:\n" + "\n".join(hits)


def test_markdown_links_resolve_inside_the_repository() -> None:
    files = tracked_files()
    present = set(files) | {str(Path(f).parent.as_posix()) for f in files}
    for name in files:
        for parent in Path(name).parents:
            present.add(parent.as_posix())
    broken = []
    for name in files:
        if not name.endswith(".md"):
            continue
        text = text_of(name) or ""
        for target in MD_LINK.findall(text):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
                continue  # a URL or an anchor in the same file
            path = unquote(target.split("#", 1)[0])
            resolved = (REPO_ROOT / Path(name).parent / path).resolve()
            try:
                inside = resolved.relative_to(REPO_ROOT).as_posix()
            except ValueError:
                broken.append(f"{name}: {target} (outside the repository)")
                continue
            if inside not in present:
                broken.append(f"{name}: {target} (no such tracked file)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_captures_keep_their_licence_notice() -> None:
    data = REPO_ROOT / "data" / "binance"
    assert sorted(p.name for p in data.glob("*.gz")) == ["ethusdt_20240808.gz", "ethusdt_20240809.gz"]
    assert "MIT License" in (data / "LICENSE-hftbacktest.txt").read_text()
    assert "LICENSE-hftbacktest.txt" in (data / "README.md").read_text()
    assert "Apache License" in (REPO_ROOT / "schemas" / "LICENSE-compose-spec.txt").read_text()
