"""`smsq dispatch` as its own process: refusing to start, SIGTERM, SIGKILL and the standby."""

from __future__ import annotations

import signal
import socket
import subprocess
import time

import psycopg

from consumer.dispatch.claims import SENDER_LOCK_NAMESPACE
from tests.dispatch_support import (
    add_notifications,
    arrivals,
    dispatch_settings,
    rows_by_id,
    statuses,
)
from tests.support import run_smsq, start_smsq, stop, wait_until

SLOW_TO = "+14155550177"


def test_refuses_to_start_without_twilio_credentials(settings):
    result = run_smsq(settings, "dispatch", TWILIO_PHONE_NUMBER="+15005550006")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "TWILIO_ACCOUNT_SID / TWILIO_AUTH_TOKEN" in line


def test_refuses_to_start_without_a_sender(settings):
    result = run_smsq(settings, "dispatch", TWILIO_API_URL="http://127.0.0.1:9/")
    assert result.returncode == 2
    [line] = result.stderr.strip().splitlines()
    assert "TWILIO_PHONE_NUMBER / TWILIO_MESSAGING_SERVICE_SID" in line


def holder_of_default_sender(settings) -> str | None:
    with psycopg.connect(settings.database_dsn) as conn:
        row = conn.execute("SELECT holder FROM dispatch_sender WHERE sender = ''").fetchone()
    return row[0] if row else None


def sender_locks_held(settings) -> int:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = %s "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
            (SENDER_LOCK_NAMESPACE,)).fetchone()[0]


def holder_name(process: subprocess.Popen) -> str:
    return f"{socket.gethostname()}:{process.pid}"


def test_sigterm_hands_back_unsent_rows_and_releases_the_sender(settings, fake_twilio, tmp_path):
    fake_twilio.set_fault("slow", to=SLOW_TO, slow_ms=30_000)
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=1.0,
                                 smsq_twilio_read_timeout=60.0)
    dispatcher = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
    try:
        wait_until(lambda: holder_of_default_sender(settings) == holder_name(dispatcher),
                   timeout=15, message="the dispatcher to hold the sender")
        [slow_id] = add_notifications(settings, {"body": "stuck at twilio", "priority": "high",
                                                 "sms": {"to_phone_number": SLOW_TO}})
        add_notifications(settings, *[{"body": f"low {i}"} for i in range(5)])
        wait_until(lambda: len(arrivals(fake_twilio)) >= 2, timeout=10, message="two sends")
        assert stop(dispatcher, signal.SIGTERM, timeout=10) == 0
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
    rows = rows_by_id(settings)
    # The request still on the wire keeps its row processing (reconciled later); every row
    # that was claimed but not sent is pending again, unclaimed.
    assert rows[slow_id]["status"] == "processing"
    others = [row for row_id, row in rows.items() if row_id != slow_id]
    sent = len(arrivals(fake_twilio)) - 1
    assert sorted(row["status"] for row in others) == ["pending"] * (5 - sent) + ["sent"] * sent
    assert all(row["claimed_by"] is None for row in others)
    assert sender_locks_held(settings) == 0
    assert holder_of_default_sender(settings) is None



def test_a_second_signal_exits_at_once_without_waiting_for_twilio(settings, fake_twilio, tmp_path):
    """The first SIGTERM waits (up to a grace period) for the request on the wire; the second
    ends the process there and then, leaving the row to reconciliation."""
    fake_twilio.set_fault("slow", to=SLOW_TO, slow_ms=30_000)
    settings = dispatch_settings(settings, fake_twilio, smsq_twilio_read_timeout=60.0)
    log_path = tmp_path / "dispatch.log"
    dispatcher = start_smsq(settings, "dispatch", log_path=log_path)
    try:
        wait_until(lambda: holder_of_default_sender(settings) == holder_name(dispatcher),
                   timeout=15, message="the dispatcher to hold the sender")
        [slow_id] = add_notifications(settings, {"body": "stuck at twilio",
                                                 "sms": {"to_phone_number": SLOW_TO}})
        wait_until(lambda: arrivals(fake_twilio), timeout=10, message="the request on the wire")
        dispatcher.send_signal(signal.SIGTERM)
        wait_until(lambda: "stop_requested" in log_path.read_text(), message="the first stop")
        # A graceful stop would exit 0 once the grace period is over; a forced one exits 1.
        assert stop(dispatcher, signal.SIGINT, timeout=10) == 1
    finally:
        if dispatcher.poll() is None:
            dispatcher.kill()
    log = log_path.read_text()
    assert "stop_forced" in log
    assert "senders_released" not in log  # the graceful stop never got to its end
    assert rows_by_id(settings)[slow_id]["status"] == "processing"

def test_standby_takes_over_a_killed_dispatcher_and_sends_nothing_twice(
        settings, fake_twilio, tmp_path):
    fake_twilio.set_fault("slow", to=SLOW_TO, slow_ms=30_000, count=1)
    # The rows the dead one held wait as long as one of its requests could still be on the
    # wire (connect and read timeouts and a tick), then one reconciliation decides them.
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=1.0,
                                 smsq_twilio_connect_timeout=1.0, smsq_twilio_read_timeout=8.0,
                                 smsq_lease_seconds=2.0)
    active = start_smsq(settings, "dispatch", log_path=tmp_path / "active.log")
    standby = None
    try:
        wait_until(lambda: holder_of_default_sender(settings) == holder_name(active),
                   timeout=15, message="the first dispatcher to hold the sender")
        standby = start_smsq(settings, "dispatch", log_path=tmp_path / "standby.log")
        [slow_id] = add_notifications(settings, {"body": "accepted, then killed",
                                                 "priority": "high",
                                                 "sms": {"to_phone_number": SLOW_TO}})
        low_ids = add_notifications(settings, *[{"body": f"low {i}"} for i in range(3)])
        # Twilio has it; the dispatcher waits for the answer, so the row is not recorded yet.
        wait_until(lambda: arrivals(fake_twilio), timeout=10, message="twilio to accept")
        assert rows_by_id(settings)[slow_id]["twilio_sid"] is None
        assert rows_by_id(settings)[slow_id]["status"] == "processing"
        active.kill()
        killed_at = time.monotonic()
        active.wait(timeout=5)
        wait_until(lambda: holder_of_default_sender(settings) == holder_name(standby),
                   timeout=5, interval=0.02, message="the standby to take over within 5 s")
        print(f"standby took over {time.monotonic() - killed_at:.2f} s after the SIGKILL")
        wait_until(lambda: statuses(settings) == {"sent": 4}, timeout=40,
                   message="everything sent")
    finally:
        for process in (active, standby):
            if process is not None and process.poll() is None:
                process.kill()
    received = fake_twilio.messages()
    assert sorted(m["body"] for m in received) == sorted(
        ["accepted, then killed", "low 0", "low 1", "low 2"])  # each exactly once
    slow = next(m for m in received if m["to"] == SLOW_TO)
    rows = rows_by_id(settings)
    assert rows[slow_id]["twilio_sid"] == slow["sid"]
    assert {rows[i]["twilio_sid"] for i in low_ids} == {
        m["sid"] for m in received if m["to"] != SLOW_TO}
