#!/usr/bin/env bash
# Runs the whole test suite against real RabbitMQ and Postgres, setting up what is missing.
#   ./scripts/test.sh              # everything
#   ./scripts/test.sh -k ingest    # extra arguments go to pytest
source "$(dirname "$0")/lib.sh"
ensure_venv
ensure_test_programs
ensure_engine_programs
ensure_services
ensure_browser
cd "$ROOT"
exec "$VENV/bin/pytest" "$@"
