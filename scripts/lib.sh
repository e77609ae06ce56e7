# Shared by scripts/run.sh and scripts/test.sh: a virtualenv with smsq, and the services.
# Sourced, not run. Everything here is idempotent: a second run changes nothing.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# SMSQ_VENV: use this (already installed) virtualenv instead of .venv, as is, never pip-installed
# into; the quick-start test runs a fresh clone with the suite's own virtualenv this way.
VENV="${SMSQ_VENV:-$ROOT/.venv}"
PY="$VENV/bin/python"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "need root to run: $*" >&2; return 1; fi
}

apt_install() {
    say "installing $* from Debian's packages"
    if [ -z "${APT_UPDATED:-}" ]; then as_root apt-get update -qq; APT_UPDATED=1; fi
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# The virtualenv, with smsq and its test extras installed (re-installed when pyproject changes).
ensure_venv() {
    [ -n "${SMSQ_VENV:-}" ] && return 0
    if [ ! -x "$PY" ]; then
        say "creating the virtualenv in .venv"
        python3 -m venv "$VENV" >/dev/null 2>&1 || { rm -rf "$VENV"; apt_install python3-venv; python3 -m venv "$VENV"; }
    fi
    local stamp="$VENV/.smsq-installed"
    if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
        say "installing smsq and its dependencies into .venv"
        "$PY" -m pip install -q --disable-pip-version-check --upgrade pip
        "$PY" -m pip install -q --disable-pip-version-check -e "$ROOT[test]"
        touch "$stamp"
    fi
}

# Programs the tests run besides Python, which a fresh Debian lacks: git (the quick-start test
# clones this checkout), ss from iproute2 (fault tests find a process's connections),
# systemd-analyze from systemd (the unit files are verified) and libatomic1 (Playwright's
# driver, the node binary in its wheel, is linked to it).
ensure_test_programs() {
    local missing=()
    command -v git >/dev/null || missing+=(git)
    command -v ss >/dev/null || missing+=(iproute2)
    command -v systemd-analyze >/dev/null || missing+=(systemd)
    deb_installed libatomic1 || missing+=(libatomic1)
    [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
}

# The engines tests (tests/test_engines.py) start a RabbitMQ cluster and a Postgres standby of
# their own from Debian's server packages, even where the services themselves run in Docker.
ensure_engine_programs() {
    local missing=()
    [ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || missing+=(rabbitmq-server)
    ls /usr/lib/postgresql/*/bin/pg_basebackup >/dev/null 2>&1 || missing+=(postgresql)
    [ ${#missing[@]} = 0 ] || apt_install "${missing[@]}"
}

deb_installed() { [ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" = installed ]; }

# RabbitMQ and Postgres at AMQP_URL / DATABASE_URL: used if they answer, else started,
# else installed from Debian's packages, or run with Docker where an engine is there.
ensure_services() {
    "$PY" -m consumer.services check && return 0
    if docker info >/dev/null 2>&1 && ! command -v rabbitmq-server >/dev/null; then
        say "starting RabbitMQ and Postgres with docker compose"
        docker compose -f "$ROOT/docker-compose.yml" up -d --wait rabbitmq postgres
    else
        "$PY" -m consumer.services need-rabbitmq && start_rabbitmq
        "$PY" -m consumer.services need-postgres && start_postgres
    fi
    "$PY" -m consumer.services wait
}

start_rabbitmq() {
    command -v rabbitmq-server >/dev/null || [ -x /usr/sbin/rabbitmq-server ] || apt_install rabbitmq-server
    say "starting RabbitMQ"
    as_root env PATH="$PATH:/usr/sbin" rabbitmq-server -detached || true
}

start_postgres() {
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then
        apt_install postgresql
        trust_local_connections
    fi
    say "starting PostgreSQL"
    local version; version="$(ls /etc/postgresql | sort -V | tail -1)"
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    as_root pg_ctlcluster --skip-systemctl-redirect "$version" main reload || true
}

# A development install: let the `postgres` role in over 127.0.0.1 without a password,
# as DATABASE_URL's default expects. Only done on a cluster this script installed.
trust_local_connections() {
    local hba; hba="$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -1)"
    as_root sed -i '1i host all postgres 127.0.0.1/32 trust\nhost all postgres ::1/128 trust' "$hba"
}

# -- smsq under supervisord: scripts/run.sh and scripts/stop.sh ------------------------------

ctl() { "$VENV/bin/supervisorctl" -c "$ROOT/supervisord.conf" "$@"; }

# The pid of this checkout's supervisord, if it runs (no virtualenv needed to find it).
supervisord_pid() {
    local pid; pid="$(cat "$ROOT/run/supervisord.pid" 2>/dev/null)" || return 1
    grep -q supervisord "/proc/$pid/cmdline" 2>/dev/null && echo "$pid"
}

port_answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

# Settings as smsq sees them (environment, then .env) as shell variables cfg_<name>; secrets
# come back masked, which is enough to know they are set. A bad setting stops here, exit 2.
read_settings() {
    local assignments
    assignments="$(cd "$ROOT" && "$PY" - "$@" <<'PY'
import shlex, sys
from consumer.settings import ConfigError, load_settings
try:
    settings = load_settings()
except ConfigError as exc:
    sys.exit(f"smsq: configuration error: {exc}")
for name in sys.argv[1:]:
    value = getattr(settings, name)
    print(f"cfg_{name}={shlex.quote('' if value is None else str(value))}")
PY
)" || exit 2
    eval "$assignments"
}

# RabbitMQ's management UI (port 15672), when the broker runs on this machine.
ensure_management_ui() {
    port_answers 127.0.0.1 15672 && return 0
    case "$cfg_amqp_url" in
        *[@/]127.0.0.1[:/]*|*[@/]localhost[:/]*|*[@/]127.0.0.1|*[@/]localhost) ;;
        *) return 0 ;;  # a remote broker: its operator decides
    esac
    say "enabling RabbitMQ's management plugin"
    as_root env PATH="$PATH:/usr/sbin" rabbitmq-plugins enable rabbitmq_management >/dev/null \
        || say "could not enable the management plugin; the UI at :15672 will be missing"
}

# A dashboard login: the one configured, else a generated one kept in the gitignored .env.
ensure_dashboard_login() {
    [ -n "$cfg_smsq_dashboard_password" ] && return 0
    say "generating a dashboard password into .env"
    [ -n "$cfg_smsq_dashboard_user" ] || echo "SMSQ_DASHBOARD_USER=admin" >> "$ROOT/.env"
    echo "SMSQ_DASHBOARD_PASSWORD=$("$PY" -c 'import secrets; print(secrets.token_hex(12))')" \
        >> "$ROOT/.env"
    chmod 600 "$ROOT/.env"
}

# The generated password, to print; a password set elsewhere is the operator's to know.
dashboard_password_hint() {
    local line; line="$(grep '^SMSQ_DASHBOARD_PASSWORD=' "$ROOT/.env" 2>/dev/null | tail -1)"
    if [ -n "$line" ] && [ -z "${SMSQ_DASHBOARD_PASSWORD:-}" ]; then echo "${line#*=} (in .env)"
    else echo "the SMSQ_DASHBOARD_PASSWORD you set"; fi
}

# Without Twilio credentials everything goes to the local sandbox (smsq fake-twilio), which
# delivers nothing. Exported for supervisord's programs only; nothing is written down.
use_sandbox_unless_twilio_configured() {
    SANDBOX=
    [ -n "$cfg_twilio_account_sid" ] && [ -n "$cfg_twilio_auth_token" ] && return 0
    SANDBOX=1
    export TWILIO_API_URL="http://127.0.0.1:$SMSQ_FAKE_TWILIO_PORT"
    # One made-up account for the sandbox, dispatch and serve (which checks the signature
    # of the sandbox's status callbacks with this token): they must agree.
    export TWILIO_ACCOUNT_SID="AC$(printf '0%.0s' $(seq 32))"
    TWILIO_AUTH_TOKEN="sandbox-$("$PY" -c 'import secrets; print(secrets.token_hex(8))')"
    export TWILIO_AUTH_TOKEN
    [ -n "$cfg_twilio_phone_number$cfg_twilio_messaging_service_sid" ] \
        || export TWILIO_PHONE_NUMBER=+15005550006
    [ -n "$cfg_smsq_public_url" ] || export SMSQ_PUBLIC_URL="http://127.0.0.1:$cfg_smsq_http_port"
}

start_supervisord() {
    export SMSQ_CONSUME_METRICS_PORT SMSQ_DISPATCH_METRICS_PORT SMSQ_FAKE_TWILIO_PORT
    export SMSQ_VENV="$VENV"
    mkdir -p "$ROOT/run/log"
    say "starting consume, dispatch and serve under supervisord"
    "$VENV/bin/supervisord" -c "$ROOT/supervisord.conf"
    for _ in $(seq 100); do ctl pid >/dev/null 2>&1 && break; sleep 0.1; done
    if [ -n "$SANDBOX" ]; then ctl start 'sandbox:*' >/dev/null; fi
}

# Every program RUNNING (up for its startsecs) and serve answering, or the end of the log
# of one that is not.
wait_for_programs() {
    local wanted=(consume dispatch serve) state name
    [ -n "$SANDBOX" ] && wanted+=(sandbox:fake-twilio)
    for _ in $(seq 120); do
        state="$(ctl status "${wanted[@]}" 2>&1 || true)"
        grep -qv ' RUNNING ' <<<"$state" || { wait_for_web; return; }
        grep -qE ' (FATAL|EXITED) ' <<<"$state" && break
        sleep 0.5
    done
    echo "$state" >&2
    for name in $(awk '$2 != "RUNNING" {print $1}' <<<"$state"); do
        echo "--- the end of run/log/${name#*:}.log:" >&2
        tail -n 5 "$ROOT/run/log/${name#*:}.log" >&2 || true
    done
    return 1
}

# smsq serve answering its /healthz (not merely something on its port): the dashboard
# printed next can be opened at once.
wait_for_web() {
    local url="http://127.0.0.1:$cfg_smsq_http_port/healthz"
    for _ in $(seq 50); do
        "$PY" -c 'import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=1)' \
            "$url" 2>/dev/null && return 0
        sleep 0.2
    done
    echo "smsq serve does not answer at $url; see run/log/serve.log" >&2
    return 1
}

# TERM to supervisord stops every program with its stopsignal and stopwaitsecs, then itself.
stop_supervisord() {
    local pid="$1"
    say "stopping smsq: each program finishes its batch, then exits"
    kill -TERM "$pid"
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
    echo "supervisord ($pid) still runs after 60 s; see $ROOT/run/supervisord.log" >&2; return 1
}

# Node.js and Twilio's own segment calculator (the npm package, at one exact version), which
# tests/integration/test_segments_calculator.py compares smsq's segment count with; the package goes into
# the gitignored .cache/node, where the test looks for it.
SEGMENTS_CALCULATOR_VERSION=1.3.0
ensure_node_tools() {
    command -v node >/dev/null && command -v npm >/dev/null || apt_install nodejs npm
    local dir="$ROOT/.cache/node"
    local installed="$dir/node_modules/sms-segments-calculator/package.json"
    grep -q "\"version\": \"$SEGMENTS_CALCULATOR_VERSION\"" "$installed" 2>/dev/null && return 0
    say "installing sms-segments-calculator $SEGMENTS_CALCULATOR_VERSION into .cache/node"
    mkdir -p "$dir"
    npm install --prefix "$dir" --no-audit --no-fund --no-save --loglevel=error \
        "sms-segments-calculator@$SEGMENTS_CALCULATOR_VERSION" >/dev/null
}

# Headless Chromium for the browser test (Debian's packages; Playwright drives it through
# executable_path, so `playwright install` and its downloads are never needed).
ensure_browser() {
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && return 0
    apt_install chromium chromium-driver
}
