"""Issue 18: carrier outcomes in status callbacks, classified, and delivery-health alerts."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from starlette.testclient import TestClient

from consumer.serve import delivery_health
from consumer.serve.app import create_app
from tests.dispatch_support import add_notifications, dispatch_settings, running_dispatcher
from tests.integration.test_twilio_end_to_end import running_serve
from tests.integration.test_twilio_semantics import NEW_SID, SID, callback, row, superseded
from tests.support import wait_until
from tests.web_support import insert_notification, log_in, web_settings


@pytest.fixture
def web(settings) -> Iterator[tuple[TestClient, psycopg.Connection]]:
    settings = web_settings(settings)
    with TestClient(create_app(settings)) as client, \
            psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        yield client, conn


def events(caplog, action: str) -> list:
    return [r for r in caplog.records if getattr(r, "action", None) == action]


# -- carrier outcomes ----------------------------------------------------------------------


@pytest.mark.parametrize("code", ["30003", "30008"])
def test_a_temporary_carrier_failure_is_sent_again_once_ten_minutes_later(web, caplog, code):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID)
    with caplog.at_level("INFO", logger="consumer.serve.receipts"):
        assert callback(client, "undelivered", ErrorCode=code) == 200
    found = row(conn, notification_id)
    assert found["status"] == "pending" and found["twilio_sid"] is None
    wait = conn.execute("SELECT extract(epoch FROM retry_datetime - now()) FROM notification"
                        ).fetchone()[0]
    assert 590 < wait <= 600
    assert superseded(conn) == [(SID, notification_id, "undelivered", int(code))]
    assert [r.outcome for r in events(caplog, "status_callback")] == ["resend_later"]
    # Sent again, and undelivered again: that was its one more chance.
    conn.execute("UPDATE notification SET status = 'sent', sent_datetime = now()")
    conn.execute("UPDATE sms_notification SET twilio_sid = %s", (NEW_SID,))
    assert callback(client, "undelivered", sid=NEW_SID, ErrorCode=code) == 200
    found = row(conn, notification_id)
    assert (found["status"], found["delivery_status"]) == ("sent", "undelivered")


def test_no_second_chance_after_the_message_expires(web):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID)
    conn.execute("UPDATE notification SET expire_datetime = now() + interval '5 minutes'")
    assert callback(client, "undelivered", ErrorCode="30003") == 200
    found = row(conn, notification_id)
    assert (found["status"], found["delivery_status"], found["error_code"]) == (
        "sent", "undelivered", 30003)
    assert superseded(conn) == []


@pytest.mark.parametrize(("code", "reason"), [("30005", "unknown_number"),
                                              ("30006", "landline")])
def test_a_number_that_can_never_receive_goes_to_the_suppression_list(web, caplog, code,
                                                                      reason):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID,
                                          to="+14155550199")
    with caplog.at_level("INFO", logger="consumer.serve"):
        assert callback(client, "undelivered", ErrorCode=code) == 200
        assert callback(client, "undelivered", ErrorCode=code) == 200  # repeated: stale
    found = row(conn, notification_id)
    assert (found["status"], found["delivery_status"]) == ("sent", "undelivered")
    [suppressed] = events(caplog, "number_suppressed")
    assert suppressed.reason == reason and suppressed.notification_id == str(notification_id)
    assert suppressed.to.endswith("0199") and "4155550199" not in suppressed.to
    assert conn.execute("SELECT reason FROM suppressed_number WHERE phone_number = %s",
                        ("+14155550199",)).fetchall() == [(reason,)]


# -- delivery health -----------------------------------------------------------------------


def sent_rows(conn, count: int, delivery: str | None, sent_ago: timedelta,
              error_code: int | None = None, to: str = "+14155550123") -> None:
    for _ in range(count):
        notification_id = insert_notification(conn, status="sent", sent_ago=sent_ago, to=to,
                                              twilio_sid=f"SM{uuid.uuid4().hex}")
        conn.execute("UPDATE sms_notification SET delivery_status = %s, error_code = %s "
                     "WHERE notification_id = %s", (delivery, error_code, notification_id))


def alerts(conn) -> set[tuple[str, str, str]]:
    return {(a["scope"], a["key"], a["reason"]) for a in delivery_health.alerts_in_force(conn)}


def test_a_failure_share_over_the_threshold_is_one_alert_until_it_clears(settings, web, caplog):
    client, conn = web
    settings = web_settings(settings)
    sent_rows(conn, 18, "delivered", timedelta(minutes=20))
    sent_rows(conn, 2, "undelivered", timedelta(minutes=20), error_code=30004)
    with caplog.at_level("INFO", logger="consumer.serve.delivery_health"):
        assert delivery_health.check(conn, settings) == []  # 2 of 20: at the threshold
        sent_rows(conn, 6, "failed", timedelta(minutes=30), error_code=30004)
        for _ in range(3):
            delivery_health.check(conn, settings)
        assert alerts(conn) == {("sender", "", "failure_rate"), ("country", "US", "failure_rate")}
        assert len(events(caplog, "delivery_alert_raised")) == 2  # one per episode, not per check
        log_in(client)
        page = client.get("/").text
        assert "delivery-alert" in page and "8 of 26 finished messages not delivered" in page
        metrics = client.get("/metrics").text
        assert 'smsq_delivery_alert{key="default",reason="failure_rate",scope="sender"} 1.0' in metrics
        conn.execute("UPDATE sms_notification SET delivery_status = 'delivered'")
        delivery_health.check(conn, settings)
        delivery_health.check(conn, settings)
    assert alerts(conn) == set()
    assert len(events(caplog, "delivery_alert_cleared")) == 2
    assert "delivery-alert" not in client.get("/").text


def test_a_small_sample_raises_nothing(settings, web):
    _, conn = web
    sent_rows(conn, 19, "failed", timedelta(minutes=20), error_code=30004)
    assert delivery_health.check(conn, web_settings(settings)) == []


def test_slow_receipts_and_carrier_filtering_are_alerts_per_country(settings, web):
    _, conn = web
    sent_rows(conn, 20, "delivered", timedelta(minutes=5), to="+447400123456")
    sent_rows(conn, 3, "sent", timedelta(minutes=15), to="+447400123456")  # no final receipt
    sent_rows(conn, 1, "undelivered", timedelta(minutes=5), error_code=30007)
    sent_rows(conn, 3, "sent", timedelta(minutes=2), to="+447400123456")  # not slow yet
    found = delivery_health.check(conn, web_settings(settings, smsq_slow_receipt_minutes=10))
    assert {(f.scope, f.key, f.reason) for f in found} == {
        ("country", "GB", "slow_receipts"), ("sender", "", "slow_receipts"),
        ("sender", "", "carrier_filtering"), ("country", "US", "carrier_filtering")}


def test_serve_checks_delivery_health_on_its_own(settings, fake_twilio, tmp_path):
    """The real processes: the sandbox undelivers, serve's check raises the alert."""
    fake_twilio.configure(deliver_delay_ms=0, send_delay_ms=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_delivery_check_seconds=0.5,
                                 twilio_sms_rate=100.0)
    with running_serve(settings, tmp_path) as settings:
        add_notifications(settings, *[{"body": f"m{n}", "sms": {"to_phone_number": "+15005553003"}}
                                      for n in range(20)])
        with running_dispatcher(settings), psycopg.connect(settings.database_dsn) as conn:
            wait_until(lambda: ("sender", "", "failure_rate") in alerts(conn), timeout=30,
                       message="the failure alert")
        url = f"{settings.smsq_public_url}metrics".replace("//metrics", "/metrics")
        with urllib.request.urlopen(url, timeout=5) as response:
            metrics = response.read().decode()
    assert 'smsq_delivery_alert{key="default",reason="failure_rate",scope="sender"} 1.0' in metrics
    raised = (tmp_path / "serve.log").read_text().count("delivery alert:")
    assert raised == 2  # sender and country, once each
    # Every callback carried Twilio's connection overrides and passed the signature check.
    callbacks = fake_twilio.callbacks()
    assert callbacks and all(c["ok"] for c in callbacks)
    assert all(m["status_callback"].endswith("#rc=5&rp=all&ct=2000&rt=5000&tt=15000")
               for m in fake_twilio.messages(accepted_only=True))
