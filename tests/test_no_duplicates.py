"""No block of six or more lines repeated in the production code, other than metric/constructor boilerplate.

Runs the `duplicates` command (see docs/DEVELOPING.md, "Repeated code") when it is on the PATH; skipped
where it is not (it is not a Python package, so a plain clone may lack it).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "services" / "tickbridge"
#: Metric definitions (one constructor call a metric), dataclass field lists and constructor keyword lists
#: share their shape by nature: a row all of whose lines on both sides look like these is boilerplate.
_LITERAL = r"""(f?"[^"]*"|[A-Za-z_][A-Za-z_0-9]*=[^,]*|[0-9.e_]+)"""  # a string, a keyword argument, a number
_BOILERPLATE = re.compile(
    rf"""^\s*(
        (self\.[a-z_0-9]+\s*=\s*)?[A-Za-z_.]*\b(counter|gauge|histogram|HopLatency|c|g|h|Panel|_q)\(.*
      | ({_LITERAL}\s*,?\s*)+[)\]}}]*,?                                # literals and keyword arguments
      | \(?({_LITERAL}\s*,?\s*)+\)?,?                                 # a label tuple
      | [a-z_][a-z_0-9]*:\s*[^=]+(=.*)?                                # a dataclass field
      | @dataclass.* | class\s+\w+.*: | \"\"\".*\"\"\"                  # a dataclass header, a docstring
      | self\.[a-z_0-9]+\s*=\s*[a-z_]+(\.[a-z_]+)?                      # self.x = x in a constructor
      | [()\[\]{{}},]+                                                   # brackets alone
      | name\s*=\s*"[^"]*" | (async\s+)?def\s+__init__\(.* | self, | \*, | \)\s*->\s*None:  # a constructor's head
    )\s*(\#.*)?$""",
    re.VERBOSE,
)
_ROW = re.compile(r"^D\d+ (\S+):(\d+)-(\d+) ~ (\S+):(\d+)-(\d+)(.*)$")


def _boilerplate(path: str, first: int, last: int) -> bool:
    lines = (PACKAGE / path).read_text(encoding="utf-8").splitlines()[first - 1 : last]
    code = [line for line in lines if line.strip() and not line.strip().startswith("#")]
    return all(_BOILERPLATE.match(line) for line in code)


@pytest.mark.skipif(shutil.which("duplicates") is None, reason="the `duplicates` command is not installed")
def test_production_code_repeats_no_block_of_six_lines() -> None:
    out = subprocess.run(
        ["duplicates", "--repo", str(PACKAGE), "--most", "200", "--seconds", "60"],
        capture_output=True, text=True, timeout=120, check=True,
    ).stdout  # fmt: skip
    assert "incomplete:" not in out, out
    repeated = []
    for line in out.splitlines():
        m = _ROW.match(line)
        if m is None:
            continue
        a, a1, a2, b, b1, b2, tail = m.groups()
        if "boilerplate" in tail:
            continue
        if _boilerplate(a, int(a1), int(a2)) and _boilerplate(b, int(b1), int(b2)):
            continue
        repeated.append(line)
    assert not repeated, "repeated blocks in production code:\n" + "\n".join(repeated)
