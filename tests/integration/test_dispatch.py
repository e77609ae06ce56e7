"""smsq dispatch in a thread of the test: real Postgres, the fake Twilio over HTTP.

What needs signals or kills (SIGTERM, SIGKILL, standby takeover) is in
test_dispatch_process.py, with the dispatcher as its own process.
"""

from __future__ import annotations

import base64
import time
from datetime import datetime, timedelta, timezone

import psycopg
from pydantic import AnyHttpUrl

from consumer import metrics
from consumer.pipeline import CALLBACK_OVERRIDES
from tests.dispatch_support import (
    SENDER,
    TO,
    add_notifications,
    arrivals,
    dispatch_settings,
    rows_by_id,
    running_dispatcher,
    statuses,
)
from tests.support import wait_until

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"\0" * 64).decode()
LONG_BODY = "x" * 400  # three GSM-7 segments


def settled(settings, count: int, done=("sent", "errored", "failed")) -> bool:
    return sum(n for status, n in statuses(settings).items() if status in done) == count


def test_an_accepted_message_is_recorded_with_its_sid_segments_callback_and_media(
        settings, fake_twilio):
    settings = dispatch_settings(settings, fake_twilio,
                                 smsq_public_url=AnyHttpUrl("https://smsq.example.com"),
                                 smsq_burst=3.0)
    [sms_id, mms_id] = add_notifications(settings, {"body": LONG_BODY}, {
        "body": "your label", "sms": {
            "to_phone_number": TO, "media_url": ["https://example.com/a.png"],
            "temporary_media": {"name": "l.png", "content_type": "image/png",
                                "content_base64": PNG}}})
    with running_dispatcher(settings):
        wait_until(lambda: settled(settings, 2), timeout=10, message="both sent")
    rows = rows_by_id(settings)
    received = {m["body"]: m for m in arrivals(fake_twilio)}
    assert rows[sms_id]["status"] == "sent" and rows[mms_id]["status"] == "sent"
    assert rows[sms_id]["twilio_sid"] == received[LONG_BODY]["sid"]
    assert rows[sms_id]["segments"] == 3 and rows[sms_id]["attempts"] == 1
    assert rows[sms_id]["sent_datetime"] is not None
    assert received[LONG_BODY]["from"] == SENDER
    # Our id rides in the callback URL: a lost create answer still names its notification.
    assert received[LONG_BODY]["status_callback"] == (
        f"https://smsq.example.com/twilio/status?n={sms_id}#{CALLBACK_OVERRIDES}")
    with psycopg.connect(settings.database_dsn) as conn:
        token = conn.execute("SELECT access_token FROM sms_temporary_media").fetchone()[0]
    assert received["your label"]["media_url"] == [
        "https://example.com/a.png", f"https://smsq.example.com/media/{token}"]
    assert rows[mms_id]["segments"] == 1


def test_each_sender_sends_from_its_own_address(settings, fake_twilio):
    service, pool_number = "MG" + "1" * 32, "+15017122661"
    settings = dispatch_settings(settings, fake_twilio, twilio_messaging_service_sid=service,
                                 smsq_senders=pool_number)
    add_notifications(settings, {"body": "through the service"})
    add_notifications(settings, {"body": "from the pool"}, sender=pool_number)
    with running_dispatcher(settings):
        wait_until(lambda: settled(settings, 2), timeout=10, message="both sent")
    received = {m["body"]: m for m in arrivals(fake_twilio)}
    assert received["through the service"]["messaging_service_sid"] == service
    assert received["through the service"]["from"] is None
    assert received["from the pool"]["from"] == pool_number
    with psycopg.connect(settings.database_dsn) as conn:
        paced = conn.execute("SELECT sender, address FROM dispatch_sender ORDER BY 1").fetchall()
    assert paced == [("", service), (pool_number, pool_number)]


def test_pacing_holds_the_rate_and_the_capacity(settings, fake_twilio):
    rate, burst, count = 4.0, 3.0, 40
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=rate, smsq_burst=burst)
    add_notifications(settings, *[{"body": f"paced {i}"} for i in range(count)])
    started = time.monotonic()
    with running_dispatcher(settings):
        wait_until(lambda: len(arrivals(fake_twilio)) >= 12, timeout=15, message="twelve sent")
        sent = len(arrivals(fake_twilio))
        # Counted against all the time the test gave it (a slow machine only allows more):
        # a full bucket, then the rate. Timings of each send: bench/dispatch.py --only pacing.
        allowed = burst + rate * (time.monotonic() - started)
    assert sent <= allowed
    assert statuses(settings) == {"sent": len(arrivals(fake_twilio)),
                                  "pending": count - len(arrivals(fake_twilio))}


def test_a_multi_segment_message_costs_its_segments(settings, fake_twilio):
    # A refill so slow (a token in 100 s) that the bucket, read back, shows what a send cost.
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=0.01, smsq_burst=1.0)
    add_notifications(settings, {"body": LONG_BODY, "priority": "high"})
    add_notifications(settings, {"body": "after the long one"})
    saved_after_the_send = """
        SELECT tokens FROM dispatch_sender
        WHERE sender = '' AND updated_datetime > (SELECT sent_datetime FROM notification
                                                  WHERE status = 'sent')"""
    with running_dispatcher(settings), psycopg.connect(settings.database_dsn,
                                                       autocommit=True) as conn:
        wait_until(lambda: settled(settings, 1), timeout=10, message="the long one sent")
        [tokens] = wait_until(lambda: conn.execute(saved_after_the_send).fetchone(),
                              timeout=10, message="the bucket saved after the send")
    assert round(tokens) == 1 - 3  # a full bucket of 1, less 3 segments: a debt of 2
    assert [m["body"] for m in arrivals(fake_twilio)] == [LONG_BODY]  # the next one waits


def test_a_high_priority_message_overtakes_a_claimed_backlog(settings, fake_twilio):
    # At 5/s the dispatcher holds 11 rows and claims more only at 5 or fewer: without the
    # overtaking claim, the high one would wait behind 4 or more lows already held.
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=5.0, smsq_burst=1.0)
    add_notifications(settings, *[{"body": f"low {i}"} for i in range(30)])
    with running_dispatcher(settings):
        wait_until(lambda: len(arrivals(fake_twilio)) >= 2, timeout=10, message="two lows")
        sent_before = len(arrivals(fake_twilio))
        add_notifications(settings, {"body": "code 482910", "priority": "high"})
        wait_until(lambda: any(m["body"] == "code 482910" for m in arrivals(fake_twilio)),
                   timeout=10, message="the high one")
    bodies = [m["body"] for m in arrivals(fake_twilio)]
    # At most the lows released while it was being stored go before it.
    assert bodies.index("code 482910") <= sent_before + 2
    # Nothing lost: whatever was not sent went back to pending at the stop.
    assert statuses(settings) == {"sent": len(bodies), "pending": 31 - len(bodies)}


def test_nothing_is_sent_before_its_publish_datetime(settings, fake_twilio):
    settings = dispatch_settings(settings, fake_twilio)
    publish_at = datetime.now(timezone.utc) + timedelta(seconds=1.5)
    add_notifications(settings, {"body": "later", "priority": "high",
                                 "publish_datetime": publish_at.isoformat()})
    add_notifications(settings, {"body": "now"})
    with running_dispatcher(settings):
        wait_until(lambda: settled(settings, 2), timeout=10, message="both sent")
    received = {m["body"]: m for m in arrivals(fake_twilio)}
    assert [m["body"] for m in arrivals(fake_twilio)] == ["now", "later"]
    assert received["later"]["received_at"] >= publish_at.timestamp()


def test_an_expired_message_is_errored_and_never_sent(settings, fake_twilio):
    settings = dispatch_settings(settings, fake_twilio)
    now = datetime.now(timezone.utc)
    [expired] = add_notifications(settings, {
        "body": "too late", "publish_datetime": (now - timedelta(seconds=2)).isoformat(),
        "expire_datetime": (now - timedelta(seconds=1)).isoformat()})
    [fresh] = add_notifications(settings, {
        "body": "in time", "expire_datetime": (now + timedelta(minutes=5)).isoformat()})
    with running_dispatcher(settings):
        wait_until(lambda: settled(settings, 2), timeout=10, message="both settled")
    rows = rows_by_id(settings)
    assert rows[expired]["status"] == "errored"
    assert rows[expired]["status_message"].startswith("expired")
    assert rows[expired]["attempts"] == 0
    assert rows[fresh]["status"] == "sent"
    assert [m["body"] for m in arrivals(fake_twilio, accepted_only=False)] == ["in time"]


def test_twilio_latency_does_not_cap_the_rate(settings, fake_twilio):
    fake_twilio.set_latency(2_000)
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=10.0, smsq_burst=1.0,
                                 smsq_twilio_read_timeout=10.0)
    add_notifications(settings, *[{"body": f"slow twilio {i}"} for i in range(5)])
    with running_dispatcher(settings):
        wait_until(lambda: settled(settings, 5), timeout=15, message="all sent")
    first_answer = min(row["sent_datetime"] for row in rows_by_id(settings).values())
    # One request at a time would send each only after the answer to the one before; here
    # all five were on the wire before the first answer came back.
    assert max(m["received_at"] for m in arrivals(fake_twilio)) < first_answer.timestamp()


def test_the_loop_reconnects_when_its_database_connections_are_cut(settings, fake_twilio):
    settings = dispatch_settings(settings, fake_twilio)
    with running_dispatcher(settings):
        add_notifications(settings, {"body": "before"})
        wait_until(lambda: settled(settings, 1), timeout=10, message="the first sent")
        with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
            cut = conn.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND application_name LIKE 'smsq dispatch%%'"
            ).fetchone()[0]
        assert cut == 3  # the lock, work and LISTEN connections
        add_notifications(settings, {"body": "after"})
        wait_until(lambda: settled(settings, 2), timeout=15, message="the second sent")
    assert [m["body"] for m in arrivals(fake_twilio)] == ["before", "after"]


def test_a_message_scheduled_while_the_dispatcher_sleeps_wakes_it_on_time(settings, fake_twilio):
    """Ingest announces scheduled messages too: with no fallback poll, nothing else would."""
    settings = dispatch_settings(settings, fake_twilio)
    with running_dispatcher(settings):
        add_notifications(settings, {"body": "first"})
        wait_until(lambda: settled(settings, 1), timeout=10, message="first sent")
        publish_at = datetime.now(timezone.utc) + timedelta(seconds=1)
        add_notifications(settings, {"body": "scheduled",
                                     "publish_datetime": publish_at.isoformat()})
        wait_until(lambda: settled(settings, 2), timeout=10, message="scheduled one sent")
    received = {m["body"]: m for m in arrivals(fake_twilio)}
    assert received["scheduled"]["received_at"] >= publish_at.timestamp()


def test_the_dispatcher_folds_the_status_counts(settings, fake_twilio):
    """Without `smsq serve`, the appended count deltas must not grow without end."""
    settings = dispatch_settings(settings, fake_twilio)
    for _ in range(3):  # messages of a sender this dispatcher does not pace: they stay put
        add_notifications(settings, {"body": "elsewhere"}, sender="+15005550001")
    with psycopg.connect(settings.database_dsn) as conn:
        deltas = "SELECT count(*) FROM notification_count_delta"
        assert conn.execute(deltas).fetchone()[0] == 3
        with running_dispatcher(settings):
            wait_until(lambda: conn.execute(deltas).fetchone()[0] == 1, timeout=10,
                       message="deltas folded")
        assert conn.execute("SELECT status, priority, delta FROM notification_count_delta"
                            ).fetchall() == [("pending", "low", 3)]


def test_a_row_held_longer_than_its_lease_keeps_its_lease_renewed(settings, fake_twilio):
    """A slow answer must not let the row look abandoned (to a takeover, to the dashboard)."""
    slow_to = "+14155550177"
    fake_twilio.set_fault("slow", to=slow_to, slow_ms=8_000)
    settings = dispatch_settings(settings, fake_twilio, smsq_lease_seconds=2.0,
                                 smsq_twilio_read_timeout=20.0)
    [row_id] = add_notifications(settings, {"body": "slow", "sms": {"to_phone_number": slow_to}})
    lease = """SELECT status, claimed_by IS NOT NULL, lease_expire_datetime > now()
               FROM notification WHERE id = %s"""
    with running_dispatcher(settings), psycopg.connect(settings.database_dsn,
                                                       autocommit=True) as conn:
        wait_until(lambda: conn.execute(
            "SELECT now() - claimed_datetime > interval '5 seconds' FROM notification "
            "WHERE id = %s", (row_id,)).fetchone()[0], timeout=15,
            message="the row held for more than two leases")
        assert conn.execute(lease, (row_id,)).fetchone() == ("processing", True, True)
        wait_until(lambda: settled(settings, 1), timeout=15, message="the slow one sent")
    [request] = arrivals(fake_twilio)
    assert rows_by_id(settings)[row_id]["twilio_sid"] == request["sid"]


def test_a_row_without_its_sms_part_is_failed_logged_and_counted(settings, fake_twilio,
                                                                 caplog):
    """A notification written around smsq without its sms_notification row: the claim fails
    it, the dispatcher says so in its log and its metric, and the row after it is sent."""
    settings = dispatch_settings(settings, fake_twilio)
    with psycopg.connect(settings.database_dsn) as conn:
        [orphan] = conn.execute(
            "INSERT INTO notification (id, body, priority, publish_datetime) VALUES "
            "(gen_random_uuid(), 'no sms part', 'high', now() - interval '1 hour') "
            "RETURNING id").fetchone()
    [sent] = add_notifications(settings, {"body": "after it"})
    failed_before = metrics.DISPATCH_SENDS.labels("failed", "")._value.get()
    with caplog.at_level("INFO", logger="consumer.dispatch.loop"), running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 1, "failed": 1}, timeout=20,
                   message="the orphan failed, the other sent")
    failed = [r for r in caplog.records if getattr(r, "action", None) == "send_failed"]
    assert [r.notification_id for r in failed] == [str(orphan)]
    assert metrics.DISPATCH_SENDS.labels("failed", "")._value.get() == failed_before + 1
    assert rows_by_id(settings)[sent]["status"] == "sent"
    assert [m["body"] for m in arrivals(fake_twilio)] == ["after it"]
