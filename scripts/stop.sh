#!/usr/bin/env bash
# Stops what ./scripts/run.sh started: supervisord and its programs, each one cleanly (TERM,
# batch finished, exit 0). RabbitMQ and Postgres keep running: other things may use them.
source "$(dirname "$0")/lib.sh"
if supervisord_running; then
    stop_supervisord
    say "smsq stopped"
else
    say "smsq is not running (no supervisord for $ROOT/supervisord.conf)"
fi
