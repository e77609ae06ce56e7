# Shared by scripts/run.sh and scripts/test.sh: a virtualenv with smsq, and the services.
# Sourced, not run. Everything here is idempotent: a second run changes nothing.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
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
# clones this checkout), ss from iproute2 (fault tests find a process's connections) and
# libatomic1 (Playwright's driver, the node binary in its wheel, is linked to it).
ensure_test_programs() {
    local missing=()
    command -v git >/dev/null || missing+=(git)
    command -v ss >/dev/null || missing+=(iproute2)
    deb_installed libatomic1 || missing+=(libatomic1)
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

# Headless Chromium for the browser test (Debian's packages; Playwright drives it through
# executable_path, so `playwright install` and its downloads are never needed).
ensure_browser() {
    [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] && return 0
    apt_install chromium chromium-driver
}
