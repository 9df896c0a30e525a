#!/usr/bin/env bash
# The project's one test command: set-up, lint, format check, types, import layers, then pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh tests/unit -k shamir` or `-m "not integration"`.
# Stops at the first failing step and names it.
set -euo pipefail

cd "$(dirname "$(readlink -f "${BASH_SOURCE[0]}")")/.."
bash scripts/bootstrap.sh

bin=.venv/bin
step() {
  local name="$1"
  shift
  echo "test: $name"
  local rc=0
  "$@" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "test: FAILED at step '$name' (exit $rc)" >&2
    exit "$rc"
  fi
}

step "ruff check" "$bin/ruff" check src tests bench
step "ruff format --check" "$bin/ruff" format --check src tests bench
step "mypy" "$bin/mypy"
step "lint-imports" "$bin/lint-imports"
# No paths given: pytest uses testpaths (all of tests/); paths passed in narrow it.
step "pytest" "$bin/pytest" -p no:cacheprovider -q "$@"
echo "test: all steps passed"
