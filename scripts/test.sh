#!/usr/bin/env bash
# Runs the whole test suite against real RabbitMQ and Postgres, setting up what is missing.
#   ./scripts/test.sh              # everything: ruff, mypy, the import contracts, every test
#   ./scripts/test.sh tests/unit   # the fast loop: no services needed, seconds
#   ./scripts/test.sh -k ingest    # extra arguments go to pytest (and skip the static checks)
source "$(dirname "$0")/lib.sh"
ensure_venv
cd "$ROOT"
only_unit=1
for arg in "$@"; do case "$arg" in tests/unit*) ;; *) only_unit= ;; esac; done
if [ $# = 0 ] || [ -z "$only_unit" ]; then  # the unit tests need none of these
    ensure_test_programs
    ensure_engine_programs
    ensure_services
    ensure_browser
    ensure_node_tools
fi
if [ $# = 0 ]; then
    say "static checks: ruff, mypy, import contracts"
    "$VENV/bin/ruff" check --quiet .
    "$VENV/bin/mypy"
    "$VENV/bin/lint-imports" --no-cache >/dev/null || "$VENV/bin/lint-imports" --no-cache
fi
exec "$VENV/bin/pytest" "$@"
