"""The README's quick start, from a clean clone: ./scripts/run.sh brings everything up and
returns, a message published reaches the Twilio sandbox, ./scripts/stop.sh stops it all.

The clone reuses this suite's virtualenv (SMSQ_VENV) and gets its own database, queues and
free ports, so it collides with nothing else on the machine.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from consumer.settings import Settings
from tests.support import ROOT, StreamPublisher, free_port, wait_until

PORTS = ("SMSQ_HTTP_PORT", "SMSQ_CONSUME_METRICS_PORT", "SMSQ_DISPATCH_METRICS_PORT",
         "SMSQ_FAKE_TWILIO_PORT")


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()


@pytest.fixture
def clone(tmp_path: Path) -> Path:
    """A clean clone of this checkout's HEAD, as a new user would have."""
    target = tmp_path / "smsq"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(target)], check=True, timeout=60)
    return target


@pytest.fixture
def quickstart_env(service_urls, amqp_names) -> dict[str, str]:
    """An environment with no smsq or Twilio setting but its own names and free ports."""
    server_url, amqp_url = service_urls
    suffix = uuid.uuid4().hex[:10]
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SMSQ_", "TWILIO_")) and k not in ("DATABASE_URL", "AMQP_URL")}
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    env.update(
        SMSQ_VENV=sys.prefix,
        DATABASE_URL=f"postgresql://{info.get('user', 'postgres')}@{info.get('host', '127.0.0.1')}"
                     f":{info.get('port', 5432)}/smsq_quickstart_{suffix}",
        AMQP_URL=amqp_url, SMSQ_EXCHANGE=amqp_names["smsq_exchange"],
        SMSQ_QUEUE=amqp_names["smsq_queue"], **{name: str(free_port()) for name in PORTS},
    )
    yield env
    _drop_database(env["DATABASE_URL"])


def _drop_database(url: str) -> None:
    """The database run.sh created (amqp_names deletes the queues)."""
    admin, name = url.rsplit("/", 1)
    with psycopg.connect(f"{admin}/postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
            sql.Identifier(name)))


def supervisord_pid(clone: Path) -> int | None:
    try:
        pid = int((clone / "run" / "supervisord.pid").read_text())
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return None


@pytest.fixture
def bring_up(clone: Path, quickstart_env: dict[str, str]):
    """./scripts/run.sh in the clone, with extra environment: its output. Stopped for sure
    afterwards, whatever the test did."""
    def run(**extra_env: str) -> str:
        quickstart_env.update(extra_env)
        done = subprocess.run(["./scripts/run.sh"], cwd=clone, env=quickstart_env,
                              capture_output=True, text=True, timeout=180)
        assert done.returncode == 0, done.stdout + done.stderr
        return done.stdout
    yield run
    pid = supervisord_pid(clone)
    if pid:  # the test failed before its own stop: leave no programs behind
        os.kill(pid, signal.SIGTERM)
        wait_until(lambda: supervisord_pid(clone) is None, timeout=60)


def test_run_sh_brings_it_all_up_and_stop_sh_stops_it(clone, quickstart_env, bring_up):
    out, env = bring_up(), quickstart_env
    web = f"http://127.0.0.1:{env['SMSQ_HTTP_PORT']}"
    assert "DELIVERS NOTHING" in out
    assert f"{web}/" in out and "http://127.0.0.1:15672" in out and "guest" in out
    password = re.search(r"user admin, password (\S+) \(in \.env\)", out)[1]
    assert f"SMSQ_DASHBOARD_PASSWORD={password}" in (clone / ".env").read_text()

    # The one-line publish it prints, as printed.
    [publish] = [line.strip() for line in out.splitlines() if " publish --to " in line]
    published = subprocess.run(shlex.split(publish), cwd=clone, env=env, capture_output=True,
                               text=True, timeout=30, check=True)
    notification_id = published.stdout.strip()
    sandbox = f"http://127.0.0.1:{env['SMSQ_FAKE_TWILIO_PORT']}/_fake/messages"
    [message] = wait_until(lambda: json.loads(get(sandbox))["messages"], timeout=30,
                           message="the message to reach the sandbox")
    assert (message["to"], message["body"], message["from"]) == (
        "+14155550123", "Hello from smsq", "+15005550006")
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        assert wait_until(lambda: conn.execute(
            "SELECT status FROM notification WHERE id = %s", (notification_id,)).fetchone()[0]
            == "sent", message="the notification to be marked sent")

    check_metrics(env)
    assert password not in "".join(p.read_text() for p in (clone / "run" / "log").glob("*.log"))

    stopped = subprocess.run(["./scripts/stop.sh"], cwd=clone, env=env, capture_output=True,
                             text=True, timeout=90)
    assert stopped.returncode == 0, stopped.stderr
    assert supervisord_pid(clone) is None
    log = (clone / "run" / "supervisord.log").read_text()
    for program in ("consume", "dispatch", "serve", "fake-twilio"):
        assert f"stopped: {program} (exit status 0)" in log


def check_metrics(env: dict[str, str]) -> None:
    """Each program's /metrics answers, with the backlog read at scrape time."""
    consume = get(f"http://127.0.0.1:{env['SMSQ_CONSUME_METRICS_PORT']}/metrics")
    dispatch = get(f"http://127.0.0.1:{env['SMSQ_DISPATCH_METRICS_PORT']}/metrics")
    serve = get(f"http://127.0.0.1:{env['SMSQ_HTTP_PORT']}/metrics")
    assert "smsq_messages_ingested_total 1.0" in consume
    assert 'smsq_dispatch_sends_total{error_code="",outcome="sent"} 1.0' in dispatch
    assert "smsq_twilio_request_seconds_count 1.0" in dispatch
    assert "smsq_status_callbacks_total" in serve
    for text in (consume, dispatch, serve):
        assert 'smsq_backlog{priority="low",status="pending"} 0.0' in text
        assert "smsq_oldest_due_age_seconds 0.0" in text
        assert "process_cpu_seconds_total" in text
    # Each its own: no program exports another's metrics as zeros.
    assert "smsq_dispatch" not in consume + serve and "smsq_twilio" not in consume + serve
    assert "smsq_messages_ingested" not in dispatch + serve and "smsq_ingest" not in dispatch + serve
    assert "smsq_status_callbacks" not in consume + dispatch


def test_restarts_under_supervisord_during_traffic_lose_nothing_and_send_nothing_twice(
        clone, quickstart_env, bring_up):
    env = quickstart_env
    bring_up(TWILIO_SMS_RATE="500", SMSQ_BURST="50")
    publisher = StreamPublisher(Settings(_env_file=None, amqp_url=env["AMQP_URL"],
                                         smsq_exchange=env["SMSQ_EXCHANGE"],
                                         smsq_queue=env["SMSQ_QUEUE"]))
    publisher.start()
    try:
        wait_until(lambda: len(publisher.published) >= 50, message="traffic to flow")
        supervisorctl(clone, env, "restart", "consume", "dispatch", "serve")
        supervisorctl(clone, env, "stop", "consume", "dispatch")
        supervisorctl(clone, env, "start", "consume", "dispatch")
    finally:
        publisher.stop()
    published = publisher.published
    assert len(published) > 50

    with psycopg.connect(env["DATABASE_URL"], autocommit=True) as conn:
        def all_sent() -> bool:
            return conn.execute("SELECT count(*) FROM notification WHERE status = 'sent'"
                                ).fetchone()[0] == len(published)
        wait_until(all_sent, timeout=90, message=f"{len(published)} messages to be sent")
        stored = {str(row[0]) for row in conn.execute("SELECT id FROM notification")}
    assert stored == set(published)
    sandbox = f"http://127.0.0.1:{env['SMSQ_FAKE_TWILIO_PORT']}/_fake/messages"
    bodies = [m["body"] for m in json.loads(get(sandbox))["messages"] if m["accepted"]]
    assert sorted(bodies) == sorted(published.values())  # each one, exactly once
    log = (clone / "run" / "supervisord.log").read_text()
    assert log.count("stopped: dispatch (exit status 0)") == 2
    assert log.count("stopped: consume (exit status 0)") == 2


def supervisorctl(clone: Path, env: dict[str, str], *args: str) -> None:
    subprocess.run([Path(sys.prefix) / "bin" / "supervisorctl", "-c", clone / "supervisord.conf",
                    *args], env=env, check=True, capture_output=True, timeout=90)
