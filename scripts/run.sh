#!/usr/bin/env bash
# Runs smsq on this machine: services, migrations, then the programs.
source "$(dirname "$0")/lib.sh"
ensure_venv
ensure_services
cd "$ROOT"
"$VENV/bin/smsq" migrate
say "smsq consume is running; publish with: .venv/bin/smsq publish --to +14155550123 --body 'Hello'"
exec "$VENV/bin/smsq" consume
