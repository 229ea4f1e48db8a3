#!/usr/bin/env bash
# The test suite against the real Docker Engine, then lint and type checks.
#   scripts/test.sh [pytest args...]
# Runs all three steps, prints a summary, exits with the first failure's status.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

first_rc=0
summary=()
step() {
    local name=$1 rc=0
    shift
    printf '\n==> %s\n' "$*"
    "$@" || rc=$?
    if [ "$rc" -eq 0 ]; then
        summary+=("ok      $name")
    else
        summary+=("FAILED  $name (exit $rc)")
        [ "$first_rc" -ne 0 ] || first_rc=$rc
    fi
}

step pytest .venv/bin/python -m pytest -q "$@"
step imports .venv/bin/lint-imports
step ruff .venv/bin/ruff check sandboxd client tests benchmarks scripts
step mypy .venv/bin/mypy --strict sandboxd client

printf '\n==> summary\n'
printf '  %s\n' "${summary[@]}"
exit "$first_rc"
