#!/usr/bin/env bash
# Stops what ./scripts/run.sh started: supervisord and its programs, each one cleanly (TERM,
# batch finished, exit 0). RabbitMQ and Postgres keep running: other things may use them.
source "$(dirname "$0")/lib.sh"
if pid="$(supervisord_pid)"; then
    stop_supervisord "$pid"
    say "smsq stopped"
else
    say "smsq is not running (no supervisord for $ROOT/supervisord.conf)"
fi
