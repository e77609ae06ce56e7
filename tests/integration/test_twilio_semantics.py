"""DESIGN.md's status rules at their edges: lost answers recorded from callbacks, messages
Twilio failed after accepting them sent again, operator resends, rows smsq cannot load."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import psycopg
import pytest
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from consumer.ops import actions
from consumer.serve.app import create_app
from tests.dispatch_support import (
    add_notifications,
    arrivals,
    dispatch_settings,
    rows_by_id,
    running_dispatcher,
    statuses,
)
from tests.support import wait_until
from tests.web_support import AUTH_TOKEN, PUBLIC_URL, insert_notification, web_settings

SID = "SM" + "a" * 32
NEW_SID = "SM" + "b" * 32


@pytest.fixture
def web(settings) -> Iterator[tuple[TestClient, psycopg.Connection]]:
    settings = web_settings(settings, smsq_max_attempts=3, smsq_retry_backoff=30.0)
    with TestClient(create_app(settings)) as client, \
            psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        yield client, conn


def callback(client: TestClient, status: str, sid: str = SID,
             notification_id: uuid.UUID | None = None, **extra: str) -> int:
    """A callback signed as Twilio signs it: over the URL we gave it, query included."""
    path = "/twilio/status" + (f"?n={notification_id}" if notification_id else "")
    params = {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC" + "0" * 32,
              **extra}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(PUBLIC_URL + path, params)
    return client.post(path, data=params,
                       headers={"X-Twilio-Signature": signature}).status_code


def row(conn: psycopg.Connection, notification_id: uuid.UUID) -> dict:
    with conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        return cur.execute(
            """SELECT n.status, n.status_message, n.sent_datetime, n.retry_datetime,
                      s.twilio_sid, s.delivery_status, s.error_code, s.attempts
               FROM notification n JOIN sms_notification s ON s.notification_id = n.id
               WHERE n.id = %s""", (notification_id,)).fetchone()


def superseded(conn: psycopg.Connection) -> list[tuple]:
    return conn.execute("SELECT sid, notification_id, delivery_status, error_code "
                        "FROM twilio_superseded_sid ORDER BY sid").fetchall()


def outcomes_logged(caplog) -> list[str]:
    return [r.outcome for r in caplog.records if getattr(r, "action", None) == "status_callback"]


@pytest.mark.parametrize("left_as", ["processing", "pending"])
def test_a_callback_naming_our_notification_records_the_sid_of_a_lost_answer(web, caplog,
                                                                             left_as):
    client, conn = web
    notification_id = insert_notification(conn, status=left_as)
    with caplog.at_level("INFO", logger="consumer.serve.receipts"):
        assert callback(client, "sent", notification_id=notification_id) == 200
    found = row(conn, notification_id)
    assert (found["status"], found["twilio_sid"], found["delivery_status"]) == (
        "sent", SID, "sent")
    assert found["sent_datetime"] is not None
    assert outcomes_logged(caplog) == ["adopted"]
    assert conn.execute("SELECT count(*) FROM delivery_receipt_early").fetchone()[0] == 0


def test_a_callback_never_takes_a_notification_that_has_its_own_sid(web, caplog):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=NEW_SID)
    with caplog.at_level("INFO", logger="consumer.serve.receipts"):
        assert callback(client, "delivered", notification_id=notification_id) == 200
    assert row(conn, notification_id)["twilio_sid"] == NEW_SID
    assert outcomes_logged(caplog) == ["unknown_sid"]  # parked, as any unknown SID


@pytest.mark.parametrize("code", ["30001", "30022"])
def test_a_message_twilio_failed_after_accepting_it_is_sent_again(web, caplog, code):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID)
    conn.execute("UPDATE sms_notification SET attempts = 1")
    with caplog.at_level("INFO", logger="consumer.serve.receipts"):
        assert callback(client, "sent") == 200
        assert callback(client, "failed", ErrorCode=code) == 200
        assert callback(client, "failed", ErrorCode=code) == 200  # Twilio repeats itself
    found = row(conn, notification_id)
    assert found["status"] == "pending" and found["twilio_sid"] is None
    assert found["sent_datetime"] is None and found["delivery_status"] is None
    assert found["error_code"] == int(code) and found["retry_datetime"] is not None
    assert f"error {code}" in found["status_message"]
    assert superseded(conn) == [(SID, notification_id, "failed", int(code))]
    assert outcomes_logged(caplog) == ["applied", "resend", "superseded"]


def test_a_delivered_message_is_never_sent_again(web):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID)
    assert callback(client, "delivered") == 200
    assert callback(client, "failed", ErrorCode="30001") == 200  # late and out of order
    assert row(conn, notification_id)["status"] == "sent"
    assert row(conn, notification_id)["delivery_status"] == "delivered"
    assert superseded(conn) == []


def test_no_resend_once_the_attempts_are_used_up(web):
    client, conn = web
    notification_id = insert_notification(conn, status="sent", twilio_sid=SID)
    conn.execute("UPDATE sms_notification SET attempts = 3")  # smsq_max_attempts
    assert callback(client, "failed", ErrorCode="30001") == 200
    found = row(conn, notification_id)
    assert (found["status"], found["delivery_status"], found["error_code"]) == (
        "sent", "failed", 30001)


def test_other_delivery_failures_are_sent_again_only_by_an_operator(web):
    client, conn = web
    undelivered = insert_notification(conn, status="sent", twilio_sid=SID)
    delivered = insert_notification(conn, status="sent", twilio_sid=NEW_SID)
    assert callback(client, "undelivered", ErrorCode="30004") == 200  # blocked
    assert callback(client, "delivered", sid=NEW_SID) == 200
    assert row(conn, undelivered)["status"] == "sent"  # never automatic
    conn.execute("UPDATE sms_notification SET attempts = 4")
    again = actions.retry_undelivered(conn, ids=[undelivered, delivered])
    assert again == [undelivered]
    found = row(conn, undelivered)
    assert (found["status"], found["twilio_sid"], found["attempts"]) == ("pending", None, 0)
    assert superseded(conn) == [(SID, undelivered, "undelivered", 30004)]
    assert row(conn, delivered)["status"] == "sent"


def test_a_row_no_claim_can_load_becomes_failed_and_the_sender_goes_on(settings, fake_twilio,
                                                                       caplog):
    """Stored before validation refused such times (or written by hand): psycopg cannot load
    year 10000, and every claim of the sender used to raise and stop the dispatcher."""
    settings = dispatch_settings(settings, fake_twilio)
    bad, good = add_notifications(settings, {"body": "far future", "priority": "high"},
                                  {"body": "fine"})
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("UPDATE notification SET expire_datetime = '10000-01-01 04:00+00' "
                     "WHERE id = %s", (bad,))
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"failed": 1, "sent": 1}, timeout=15,
                   message="the bad row failed, the good one sent")
    rows = rows_by_id(settings)
    assert "outside what smsq can hold" in rows[bad]["status_message"]
    assert [m["body"] for m in arrivals(fake_twilio)] == ["fine"]
    assert any(getattr(r, "action", None) == "claim_unloadable" for r in caplog.records)
