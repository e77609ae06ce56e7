#!/usr/bin/env bash
# A MANUAL check, never part of the tests or CI: does the README's quick start work on a fresh
# Debian machine that has nothing but Python and apt?
#
#   sudo bench/fresh_machine.sh                      # the whole suite, then run.sh / stop.sh
#   sudo bench/fresh_machine.sh -x -q -k 'schemas or migrate'   # arguments go to test.sh
#   FRESH_REF=main sudo bench/fresh_machine.sh       # which commit to clone (default HEAD)
#   FRESH_REBUILD=1 ...                              # build the Debian root again
#   FRESH_REUSE=1 ...        # the last run's machine again, as it was left (to dig into a failure)
#   FRESH_USER=1 ...         # as a user with sudo (the machine gets sudo and that user first)
#
# The "machine" is a Debian bookworm root built with debootstrap (minbase + python3 only) and
# copied anew for every run, with a clone of this repository in /srv/smsq, run in its own
# network, mount, PID, UTS and IPC namespaces: its 127.0.0.1 is its own, so the RabbitMQ and
# Postgres this host runs for everyone are neither seen nor touched, and the scripts must
# install and start their own. Its only way out is bench/fresh_machine_tunnel.py to the package
# registries this host is set up with (its apt sources and pip's index, read at run time by
# bench/fresh_machine_registries.py, mapped in the machine's /etc/hosts), as a fresh machine
# with registry access has. Run it where root's apt and pip reach them (sudo keeps root's pip
# configuration, not the caller's PIP_INDEX_URL; sudo -E passes that on).
# When it ends, the PID namespace ends, and with it every process started inside.
# Everything runs at the lowest CPU and I/O priority. Logs: $FRESH_WORK/*.log.
set -euo pipefail
[ -z "${CI:-}" ] || { echo "bench/fresh_machine.sh is a manual check, not for CI" >&2; exit 1; }
[ "$(id -u)" = 0 ] || { echo "bench/fresh_machine.sh needs root (namespaces, chroot)" >&2; exit 1; }

REPO="$(cd "$(dirname "$0")/.." && pwd)"
WORK="${FRESH_WORK:-/var/tmp/smsq-fresh}"
BASE="$WORK/base"          # the pristine Debian root, kept between runs
ROOTFS="$WORK/root"        # this run's machine
NETNS="smsq-fresh-$$"
RELEASE=bookworm
REV="$(git -C "$REPO" rev-parse "${FRESH_REF:-HEAD}")"

renice -n 19 -p $$ >/dev/null
ionice -c 3 -p $$
say() { printf '\033[1m### %s\033[0m\n' "$*" >&2; }
registries() { python3 "$REPO/bench/fresh_machine_registries.py" "$@"; }
# Read once, up front: a host without a source for $RELEASE stops here.
APT_MIRROR="$(registries apt-mirror "$RELEASE")"
APT_SOURCES="$(registries apt-sources "$RELEASE")"
PIP_CONF="$(registries pip-conf)"
REGISTRY_HOSTS="$(registries hosts "$RELEASE")"
TUNNEL_ROUTES="$(registries routes "$RELEASE")"
mkdir -p "$WORK"

build_base() {
    [ -x "$BASE/usr/bin/python3" ] && [ -z "${FRESH_REBUILD:-}" ] && return 0
    command -v debootstrap >/dev/null || apt-get install -y -qq debootstrap >/dev/null
    say "building a minimal Debian $RELEASE root with python3 in $BASE"
    rm -rf "$BASE"
    debootstrap --variant=minbase --include=python3 "$RELEASE" "$BASE" "$APT_MIRROR" \
        > "$WORK/debootstrap.log"
}

# A new machine: the pristine root, named `fresh`, with this host's apt sources and pip index,
# registry names pointing at the tunnel, and a clone of the repository at $REV.
new_machine() {
    say "a fresh machine in $ROOTFS with smsq at ${REV:0:12}"
    rm -rf "$ROOTFS"
    cp -a "$BASE" "$ROOTFS"
    echo fresh > "$ROOTFS/etc/hostname"
    cat > "$ROOTFS/etc/hosts" <<HOSTS
127.0.0.1 localhost
127.0.1.1 fresh
::1 localhost ip6-localhost ip6-loopback
# registries, through bench/fresh_machine_tunnel.py
$REGISTRY_HOSTS
HOSTS
    echo "$APT_SOURCES" > "$ROOTFS/etc/apt/sources.list"
    # This workplace reaches the registries through a TLS-inspecting gateway whose CA the host
    # trusts (its pip.conf names the bundle): the machine gets the same, as any machine here would.
    mkdir -p "$ROOTFS/etc/fresh-machine"
    cp /etc/ssl/certs/ca-certificates.crt "$ROOTFS/etc/fresh-machine/ca-bundle.crt"
    printf '[global]\ncert = /etc/fresh-machine/ca-bundle.crt\n%s\n' "$PIP_CONF" \
        > "$ROOTFS/etc/pip.conf"
    # An apt source over https checks its certificate against the same bundle.
    echo 'Acquire::https::CAInfo "/etc/fresh-machine/ca-bundle.crt";' \
        > "$ROOTFS/etc/apt/apt.conf.d/90fresh-machine-ca"
    git clone -q "$REPO" "$ROOTFS/srv/smsq"
    git -C "$ROOTFS/srv/smsq" checkout -q "$REV"
}

write_scripts() {
    write_session > "$ROOTFS/srv/fresh-session.sh"
    write_login > "$ROOTFS/srv/fresh-login.sh"
}

# What a person does on the new machine: the README's two commands, then a message.
write_session() {
    cat <<'SESSION'
#!/bin/bash
cd /srv/smsq
failed=()
say() { printf '\033[1m### %s\033[0m\n' "$*"; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

say "./scripts/test.sh $*"
./scripts/test.sh "$@" || failed+=("test.sh (exit $?)")

say "./scripts/run.sh"
./scripts/run.sh > /tmp/run.log 2>&1 &
run_pid=$!
stored() {
    .venv/bin/smsq status --json 2>/dev/null | .venv/bin/python -c \
        'import json, sys; print(sum(sum(p.values()) for p in json.load(sys.stdin)["notifications"].values()))' \
        2>/dev/null
}
published=
# Up: run.sh returned 0 (smsq runs in the background), or it still runs (smsq in the
# foreground) a minute after smsq status first answered.
answered=
for _ in $(seq 300); do
    if ! kill -0 "$run_pid" 2>/dev/null; then wait "$run_pid" && up=1 || up=; break; fi
    [ -z "$answered" ] && [ -n "$(stored)" ] && answered=$SECONDS
    [ -n "$answered" ] && [ $((SECONDS - answered)) -ge 60 ] && { up=1; break; }
    sleep 1
done
if [ -n "${up:-}" ]; then
    before="$(stored)"
    .venv/bin/smsq publish --to +14155550123 --body "Hello from a fresh machine" && published=1
    for _ in $(seq 60); do [ "$(stored)" -gt "${before:-0}" ] 2>/dev/null && break; sleep 1; done
    .venv/bin/smsq status
    [ -n "$published" ] && [ "$(stored)" -gt "${before:-0}" ] 2>/dev/null \
        || failed+=("run.sh: a published message was not stored")
else
    failed+=("run.sh: smsq did not come up")
fi
cat /tmp/run.log
if [ -x scripts/stop.sh ]; then
    say "./scripts/stop.sh"
    ./scripts/stop.sh || failed+=("stop.sh (exit $?)")
fi
kill -TERM "$run_pid" 2>/dev/null && wait "$run_pid"

# As after a reboot where nothing starts them: the services are installed but stopped.
say "services stopped: ./scripts/test.sh -x -q -k schemas"
as_root rabbitmqctl stop >/dev/null 2>&1
for cluster in /etc/postgresql/*/main; do
    version="${cluster%/main}"; as_root pg_ctlcluster "${version##*/}" main stop
done
./scripts/test.sh -x -q -k schemas || failed+=("test.sh with the services stopped (exit $?)")

if [ ${#failed[@]} = 0 ]; then say "FRESH MACHINE: everything worked"; exit 0; fi
say "FRESH MACHINE: failed: ${failed[*]}"
exit 1
SESSION
}

# Who runs the session: root, or with FRESH_USER a user `dev` who may sudo, with the PATH a
# Debian login gives a user (no sbin).
write_login() {
    if [ -z "${FRESH_USER:-}" ]; then echo 'exec /bin/bash /srv/fresh-session.sh "$@"'; return; fi
    cat <<'LOGIN'
set -e
if ! id dev >/dev/null 2>&1; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq sudo >/dev/null
    useradd --create-home --shell /bin/bash dev
    echo 'dev ALL=(ALL) NOPASSWD: ALL' > /etc/sudoers.d/dev
    chown -R dev: /srv/smsq
fi
exec runuser -u dev -- env -i HOME=/home/dev TERM=dumb LANG=C.UTF-8 \
    PATH=/usr/local/bin:/usr/bin:/bin:/usr/games /bin/bash /srv/fresh-session.sh "$@"
LOGIN
}

start_network() {
    ip netns add "$NETNS"
    ip -n "$NETNS" link set lo up
    local routes; mapfile -t routes <<<"$TUNNEL_ROUTES"
    python3 "$REPO/bench/fresh_machine_tunnel.py" "/run/netns/$NETNS" "${routes[@]}" \
        > "$WORK/tunnel.log" 2>&1 &
    TUNNEL=$!
    for _ in $(seq 50); do grep -q ready "$WORK/tunnel.log" && return 0; sleep 0.1; done
    cat "$WORK/tunnel.log" >&2; return 1
}

cleanup() {
    set +e
    [ -n "${SESSION:-}" ] && kill "$SESSION" 2>/dev/null  # unshare --kill-child ends the rest
    [ -n "${TUNNEL:-}" ] && kill "$TUNNEL" 2>/dev/null
    ip netns del "$NETNS" 2>/dev/null
    # Nothing of the machine may outlive it (the PID namespace should have seen to that).
    local left; left="$(for p in /proc/[0-9]*; do [ "$(readlink "$p/root" 2>/dev/null)" = "$ROOTFS" ] && echo "${p#/proc/}"; done)"
    [ -z "$left" ] || echo "still running inside the machine: $left" >&2
}

# Inside the namespaces: the machine's own /proc, /sys, /dev/shm, /run and hostname, then
# the session in a clean root login environment (none of this host's pip or proxy settings).
run_session() {
    exec ip netns exec "$NETNS" unshare --mount --uts --ipc --pid --fork --kill-child \
        bash -c '
            set -e
            root="$1"; shift
            mount -t proc proc "$root/proc"
            mount -t sysfs sysfs "$root/sys"
            mount --rbind /dev "$root/dev"
            mount -t tmpfs tmpfs "$root/dev/shm"
            mount -t tmpfs tmpfs "$root/run"
            mkdir "$root/run/lock"
            hostname fresh
            exec chroot "$root" /usr/bin/env -i HOME=/root TERM=dumb LANG=C.UTF-8 \
                PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                /bin/bash /srv/fresh-login.sh "$@"
        ' fresh-machine "$ROOTFS" "$@"
}

build_base
if [ -n "${FRESH_REUSE:-}" ] && [ -d "$ROOTFS/srv/smsq" ]; then
    say "the last run's machine again: $ROOTFS"
else
    new_machine
fi
write_scripts
trap cleanup EXIT
trap 'exit 130' INT TERM
start_network
say "running the session (log: $WORK/session.log)"
run_session "$@" > >(tee "$WORK/session.log") 2>&1 &
SESSION=$!
wait "$SESSION"
