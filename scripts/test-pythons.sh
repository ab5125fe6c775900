#!/usr/bin/env bash
# The supported Python versions other than the default one (`make test` uses python3, 3.11 on Debian 12):
# for each, build a virtualenv with the pinned dependencies and run the fast suite (`make test-fast`'s
# selection) in it. Used by `make test-pythons`; docs/DEVELOPING.md describes it.
#
#   PYTHONS="3.12 3.13"   versions to try (default: 3.12 3.13)
#   FAST_MARKERS=...      pytest -m expression (the Makefile passes make test-fast's)
#   PYTEST_ARGS=...       extra pytest arguments, e.g. "tests/test_core.py" to narrow the run
#
# An interpreter is looked up as pythonX.Y on PATH, then under pyenv ($PYENV_ROOT/versions/X.Y*), then
# through `uv python find` if uv is installed. A version found nowhere is reported SKIPPED (and the
# script exits 3 if every version was skipped); it never downloads an interpreter. Exit 1 if any ran and
# failed. Virtualenvs live in .venv-X.Y/ and are re-installed when pyproject.toml changes.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHONS=${PYTHONS:-"3.12 3.13"}
FAST_MARKERS=${FAST_MARKERS:-"not slow and not chaos and not load"}
PYENV_ROOT=${PYENV_ROOT:-$HOME/.pyenv}

find_python() {
  local v=$1 found
  found=$(command -v "python$v" 2>/dev/null) && [ -n "$found" ] && "$found" -c 'import venv' 2>/dev/null && {
    echo "$found"; return 0; }
  for dir in "$PYENV_ROOT"/versions/"$v".*; do
    [ -x "$dir/bin/python$v" ] && { echo "$dir/bin/python$v"; return 0; }
  done
  if command -v uv >/dev/null 2>&1; then
    found=$(uv python find --no-python-downloads "$v" 2>/dev/null) && [ -n "$found" ] && { echo "$found"; return 0; }
  fi
  return 1
}

declare -a summary=()
ran=0 failed=0
for v in $PYTHONS; do
  if ! py=$(find_python "$v"); then
    echo "test-pythons: Python $v SKIPPED: no python$v on PATH, under $PYENV_ROOT/versions or from uv" >&2
    summary+=("$v: SKIPPED (no interpreter)")
    continue
  fi
  venv=.venv-$v
  echo "test-pythons: Python $v from $py ($("$py" -VV | head -1))"
  if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv" || { summary+=("$v: FAILED (venv)"); failed=1; continue; }; fi
  stamp=$venv/.tickbridge-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ services/dev/pyproject.toml -nt "$stamp" ] || [ services/constraints.txt -nt "$stamp" ]; then
    echo "test-pythons: $v: pip install -c services/constraints.txt -e .[dev] -e services/dev"
    if ! "$venv/bin/pip" install -q --disable-pip-version-check -c services/constraints.txt -e '.[dev]' -e services/dev; then
      summary+=("$v: FAILED (pip install of the pinned dependencies)"); failed=1; continue
    fi
    touch "$stamp"
  fi
  ran=1
  log=$(mktemp)
  # The venv's bin first: tests start `sys.executable -m tickbridge ...`, and tools by name.
  # shellcheck disable=SC2086
  PATH="$PWD/$venv/bin:$PATH" "$venv/bin/python" -m pytest -q -p no:cacheprovider -m "$FAST_MARKERS" \
    ${PYTEST_ARGS:-} 2>&1 | tee "$log"
  rc=${PIPESTATUS[0]}
  result=$(grep -E '^=*.* (passed|failed|error)' "$log" | tail -1 | sed -E 's/^=+ //; s/ =+$//')
  rm -f "$log"
  if [ "$rc" = 0 ]; then summary+=("$v: PASS ($result)"); else summary+=("$v: FAIL ($result)"); failed=1; fi
done

echo
echo "test-pythons summary:"
for line in "${summary[@]}"; do echo "  Python $line"; done
if [ "$failed" = 1 ]; then exit 1; fi
if [ "$ran" = 0 ]; then echo "test-pythons: no Python version was available: nothing tested" >&2; exit 3; fi
exit 0
