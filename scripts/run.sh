#!/usr/bin/env bash
# Brings smsq up on this machine and returns: RabbitMQ and Postgres (installed or started if
# need be), migrations, then consume, dispatch and serve under supervisord, with the Twilio
# sandbox when no Twilio credentials are set. ./scripts/stop.sh stops it all.
source "$(dirname "$0")/lib.sh"

# Ports of the programs under supervisord (supervisord.conf has the same defaults). The
# web port is SMSQ_HTTP_PORT, a setting like any other (environment or .env).
: "${SMSQ_CONSUME_METRICS_PORT:=9101}" "${SMSQ_DISPATCH_METRICS_PORT:=9102}" "${SMSQ_FAKE_TWILIO_PORT:=8089}"

ensure_venv
cd "$ROOT"
read_settings amqp_url smsq_http_host smsq_http_port smsq_public_url smsq_dashboard_user \
    smsq_dashboard_password twilio_account_sid twilio_auth_token twilio_phone_number \
    twilio_messaging_service_sid
ensure_services
ensure_management_ui
"$VENV/bin/smsq" migrate
ensure_dashboard_login
read_settings smsq_dashboard_user
use_sandbox_unless_twilio_configured

if supervisord_pid >/dev/null; then
    say "smsq already runs under supervisord (./scripts/stop.sh first to apply new settings)"
else
    start_supervisord
fi
wait_for_programs || { echo "smsq did not start: logs in run/log/; ./scripts/stop.sh to stop what did" >&2; exit 1; }

# A server listening on every address is reached locally at 127.0.0.1.
web_host="$cfg_smsq_http_host"; case "$web_host" in 0.0.0.0|::|"[::]") web_host=127.0.0.1 ;; esac
web="http://$web_host:$cfg_smsq_http_port"
bin="${VENV#"$ROOT"/}/bin"  # .venv/bin, as the README writes it, unless SMSQ_VENV is elsewhere
cat <<INFO

smsq is running: consume, dispatch and serve under supervisord (logs in run/log/).

  dashboard          $web/   user $cfg_smsq_dashboard_user, password $(dashboard_password_hint)
  metrics            $web/metrics (serve)
                     http://127.0.0.1:$SMSQ_CONSUME_METRICS_PORT/metrics (consume)
                     http://127.0.0.1:$SMSQ_DISPATCH_METRICS_PORT/metrics (dispatch)
  RabbitMQ           http://127.0.0.1:15672   user guest, password guest
  programs           $bin/supervisorctl -c supervisord.conf status

Try it:

  $bin/smsq publish --to +14155550123 --body "Hello from smsq"
  $bin/smsq status

Stop it all: ./scripts/stop.sh
INFO
if [ -n "$SANDBOX" ]; then cat <<SANDBOX

SANDBOX: no Twilio credentials are set, so messages go to the local Twilio sandbox
(smsq fake-twilio at $TWILIO_API_URL), which DELIVERS NOTHING: no SMS reaches a phone.
To send for real, set TWILIO_ACCOUNT_SID, TWILIO_AUTH_TOKEN and TWILIO_PHONE_NUMBER in .env,
then ./scripts/stop.sh && ./scripts/run.sh.
SANDBOX
fi
