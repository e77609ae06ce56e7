"""Issue 12's promise against the sandbox's faults, end to end: nothing sent twice, nothing
lost, nothing drained, when Twilio behaves as its documentation says it may.

Each fault is real and checked to have happened: the sandbox logs the fault it applied, and
what it accepted is counted per body.
"""

from __future__ import annotations

import signal
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from pydantic import AnyHttpUrl

from tests.dispatch_support import (
    add_notifications,
    dispatch_settings,
    rows_by_id,
    running_dispatcher,
    statuses,
)
from tests.support import free_port, start_smsq, stop, wait_until


def accepted_bodies(fake) -> Counter:
    return Counter(m["body"] for m in fake.messages(accepted_only=True))


def faults_applied(fake) -> list[str]:
    return [m["fault"] for m in fake.messages() if m["fault"]]


def list_requests(fake) -> int:
    return fake.stats().get("list", 0)


@contextmanager
def running_serve(settings, tmp_path) -> Iterator[object]:
    """`smsq serve` as its own process, where the sandbox posts its callbacks."""
    port = free_port()
    settings = settings.model_copy(update={
        "smsq_http_port": port, "smsq_public_url": AnyHttpUrl(f"http://127.0.0.1:{port}")})
    process = start_smsq(settings, "serve", log_path=tmp_path / "serve.log")
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=20,
                   message="smsq serve to answer")
        yield settings
    finally:
        stop(process, signal.SIGTERM)


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def test_a_5xx_after_the_message_was_created_sends_nothing_twice(settings, fake_twilio):
    fake_twilio.set_faults([{"mode": "created-500", "count": 1, "to": "+14155550101"},
                            {"mode": "created-502", "count": 1, "to": "+14155550102"},
                            {"mode": "created-503", "count": 1, "to": "+14155550103"}])
    settings = dispatch_settings(settings, fake_twilio)
    numbers = ["+14155550101", "+14155550102", "+14155550103"]
    ids = add_notifications(settings, *[{"body": f"code for {n}", "sms": {"to_phone_number": n}}
                                        for n in numbers])
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 3}, timeout=30, message="all sent")
    assert sorted(faults_applied(fake_twilio)) == ["created-500", "created-502", "created-503"]
    assert accepted_bodies(fake_twilio) == Counter(f"code for {n}" for n in numbers)
    sids = {m["body"]: m["sid"] for m in fake_twilio.messages(accepted_only=True)}
    rows = rows_by_id(settings)
    for number, notification_id in zip(numbers, ids):
        assert rows[notification_id]["twilio_sid"] == sids[f"code for {number}"]
        assert rows[notification_id]["attempts"] == 1
    assert len(fake_twilio.messages()) == 3  # no second request at all


def test_a_lost_answer_while_twilio_still_queues_it_is_found_not_resent(settings, fake_twilio):
    """The same code went to the same number earlier (recorded, sent, with a date_sent); the
    second's answer is lost and Twilio holds it queued (date_sent null). Looking only at
    messages sent since the claim found the first one, recorded, and sent a third."""
    settings = dispatch_settings(settings, fake_twilio)
    body = {"body": "your code is 482910"}
    with running_dispatcher(settings):
        [first] = add_notifications(settings, body)
        wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=10, message="first sent")
        wait_until(lambda: fake_twilio.messages()[0]["status"] in ("sent", "delivered"),
                   timeout=10, message="the first to leave Twilio's queue")
        fake_twilio.set_faults([{"mode": "drop", "count": 1}])
        fake_twilio.configure(send_delay_ms=600_000)  # every new message stays queued
        [second] = add_notifications(settings, body)
        wait_until(lambda: statuses(settings) == {"sent": 2}, timeout=30,
                   message="the second reconciled")
    assert faults_applied(fake_twilio) == ["drop"]
    assert accepted_bodies(fake_twilio) == Counter({body["body"]: 2})
    rows = rows_by_id(settings)
    assert {rows[first]["twilio_sid"], rows[second]["twilio_sid"]} == {
        m["sid"] for m in fake_twilio.messages(accepted_only=True)}
    assert fake_twilio.messages()[1]["status"] == "queued"  # found while still queued


def test_a_dispatcher_killed_between_twilios_answer_and_its_write_sends_nothing_twice(
        settings, fake_twilio, tmp_path):
    """Frozen (SIGSTOP) once Twilio has the request, so the answer arrives and is never
    read, then killed: the row is processing without a SID; the next dispatcher finds the
    message at Twilio instead of sending it again."""
    fake_twilio.set_latency(800)  # the answer leaves 0.8 s after the message is stored
    settings = dispatch_settings(settings, fake_twilio, smsq_lease_seconds=2.0)
    first = start_smsq(settings, "dispatch", log_path=tmp_path / "first.log")
    try:
        [row_id] = add_notifications(settings, {"body": "between answer and write"})
        wait_until(lambda: fake_twilio.messages(), timeout=15, interval=0.01,
                   message="twilio to store the message")
        first.send_signal(signal.SIGSTOP)
        time.sleep(1.5)  # the answer is in the frozen process's socket now
        assert rows_by_id(settings)[row_id]["twilio_sid"] is None
        first.kill()
        first.wait(timeout=5)
    finally:
        if first.poll() is None:
            first.kill()
    assert rows_by_id(settings)[row_id]["status"] == "processing"
    second = start_smsq(settings, "dispatch", log_path=tmp_path / "second.log")
    try:
        wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=30,
                   message="reconciled by the next dispatcher")
    finally:
        stop(second, signal.SIGTERM)
    [accepted] = fake_twilio.messages(accepted_only=True)
    assert len(fake_twilio.messages()) == 1
    assert rows_by_id(settings)[row_id]["twilio_sid"] == accepted["sid"]


def test_an_account_outage_of_a_minute_keeps_the_backlog_pending_then_sends_it_all(
        settings, fake_twilio, caplog):
    fake_twilio.set_faults([{"mode": "20003", "seconds": 60}])
    settings = dispatch_settings(settings, fake_twilio, smsq_retry_backoff=1.0,
                                 smsq_retry_backoff_max=8.0)
    bodies = [f"backlog {n}" for n in range(30)]
    ids = add_notifications(settings, *[{"body": body} for body in bodies])
    with caplog.at_level("INFO", logger="consumer.dispatch.loop"), running_dispatcher(settings):
        time.sleep(55)
        rows = rows_by_id(settings)
        assert {rows[i]["status"] for i in ids} <= {"pending", "processing"}
        assert {rows[i]["attempts"] for i in ids} == {0}
        assert fake_twilio.messages(accepted_only=True) == []
        wait_until(lambda: statuses(settings) == {"sent": 30}, timeout=40,
                   message="the whole backlog sent once the fault cleared")
    assert accepted_bodies(fake_twilio) == Counter(bodies)  # each once
    refused = [m for m in fake_twilio.messages() if m["fault"] == "20003"]
    pauses = [r for r in caplog.records if getattr(r, "action", None) == "sender_paused"]
    # One probe a pause, one error a pause: never a request or a log line a row.
    assert len(refused) == len(pauses) >= 5
    resumed = [r for r in caplog.records if getattr(r, "action", None) == "sender_resumed"]
    assert len(resumed) == 1 and resumed[0].reason == "account_auth"


def test_a_request_released_ahead_is_called_back_when_its_sender_is_paused(
        settings, fake_twilio, caplog):
    """At 5/s a request is released 0.1 s before its token; the one before it is refused
    with 20003 after 0.15 s, so the sender is paused while the next still waits for its token:
    it is called back, not sent into the outage (one refusal a pause, never more)."""
    fake_twilio.set_latency(150)
    fake_twilio.set_faults([{"mode": "20003", "seconds": 3}])
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=5.0, smsq_burst=1.0,
                                 smsq_retry_backoff=1.0, smsq_retry_backoff_max=2.0)
    bodies = [f"row {n}" for n in range(6)]
    add_notifications(settings, *[{"body": body} for body in bodies])
    with caplog.at_level("INFO", logger="consumer.dispatch.loop"), running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 6}, timeout=40, message="all sent")
    assert accepted_bodies(fake_twilio) == Counter(bodies)  # each once
    refused = [m for m in fake_twilio.messages() if m["fault"] == "20003"]
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert actions.count("send_withheld") >= 1
    assert len(refused) == actions.count("sender_paused") >= 1


def test_a_request_released_ahead_is_called_back_when_twilio_asks_to_wait(
        settings, fake_twilio, caplog):
    """As above, with a 429 and its Retry-After instead of an account-wide error: the whole
    sender waits out the Retry-After, and the request released ahead of its token meanwhile
    is called back, not sent into the 429 (one refusal in all)."""
    fake_twilio.set_latency(150)
    fake_twilio.set_fault("429", count=1, retry_after=1)
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=5.0, smsq_burst=1.0)
    bodies = [f"row {n}" for n in range(6)]
    add_notifications(settings, *[{"body": body} for body in bodies])
    with caplog.at_level("INFO", logger="consumer.dispatch.loop"), running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 6}, timeout=40, message="all sent")
    assert accepted_bodies(fake_twilio) == Counter(bodies)  # each once
    refused = [m for m in fake_twilio.messages() if not m["accepted"]]
    assert [m["fault"] for m in refused] == ["429"]
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert actions.count("send_withheld") >= 1


def test_a_message_twilio_drops_after_accepting_it_is_sent_again(settings, fake_twilio,
                                                                  tmp_path):
    fake_twilio.set_faults([{"mode": "fail-30001", "count": 1}])
    settings = dispatch_settings(settings, fake_twilio, smsq_retry_backoff=0.5)
    with running_serve(settings, tmp_path) as settings:
        [row_id] = add_notifications(settings, {"body": "dropped by a full queue"})
        with running_dispatcher(settings):
            wait_until(lambda: len(fake_twilio.messages(accepted_only=True)) == 2, timeout=30,
                       message="sent again after the 30001 callback")
            wait_until(lambda: rows_by_id(settings)[row_id]["twilio_sid"] ==
                       fake_twilio.messages(accepted_only=True)[1]["sid"], timeout=10,
                       message="the second SID recorded")
    first, second = fake_twilio.messages(accepted_only=True)
    assert first["fault"] == "fail-30001" and first["final_status"] == "failed"
    row = rows_by_id(settings)[row_id]
    assert row["status"] == "sent" and row["attempts"] == 2
    with psycopg.connect(settings.database_dsn) as conn:
        assert conn.execute("SELECT sid, error_code FROM twilio_superseded_sid").fetchall() == [
            (first["sid"], 30001)]


def test_a_callback_records_a_lost_answer_before_reconciliation_needs_to(settings, fake_twilio,
                                                                         tmp_path):
    fake_twilio.set_faults([{"mode": "drop", "count": 1}])
    settings = dispatch_settings(settings, fake_twilio)
    with running_serve(settings, tmp_path) as settings:
        [row_id] = add_notifications(settings, {"body": "answer lost"})
        with running_dispatcher(settings):
            wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=15,
                       message="recorded from the callback")
            lists_when_sent = list_requests(fake_twilio)
    [accepted] = fake_twilio.messages(accepted_only=True)
    assert accepted["fault"] == "drop"
    assert rows_by_id(settings)[row_id]["twilio_sid"] == accepted["sid"]
    assert lists_when_sent == 0  # the callback, not a reconciliation, recorded it
