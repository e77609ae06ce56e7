"""POST /twilio/status: signatures, forward-only delivery status, error codes, history."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from consumer.serve.app import create_app
from tests.support import wait_until
from tests.web_support import AUTH_TOKEN, PUBLIC_URL, insert_notification, web_settings

SID = "SM" + "a" * 32
URL = PUBLIC_URL + "/twilio/status"


@pytest.fixture
def web(settings) -> Iterator[tuple[TestClient, psycopg.Connection]]:
    with TestClient(create_app(web_settings(settings))) as client, \
            psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        yield client, conn


def signature(params: dict[str, str], url: str = URL, token: str = AUTH_TOKEN) -> str:
    return RequestValidator(token).compute_signature(url, params)


def callback(client: TestClient, params: dict[str, str], sig: str | None = "sign") -> int:
    headers = {} if sig is None else {
        "X-Twilio-Signature": signature(params) if sig == "sign" else sig}
    return client.post("/twilio/status", data=params, headers=headers).status_code


def delivery(conn: psycopg.Connection, sid: str = SID) -> tuple[str | None, int | None]:
    return conn.execute("SELECT delivery_status, error_code FROM sms_notification "
                        "WHERE twilio_sid = %s", (sid,)).fetchone()


def params(status: str, sid: str = SID, **extra: str) -> dict[str, str]:
    return {"MessageSid": sid, "MessageStatus": status, "AccountSid": "AC" + "0" * 32, **extra}


def test_a_validly_signed_callback_is_applied(web):
    client, conn = web
    insert_notification(conn, status="sent", twilio_sid=SID)
    assert callback(client, params("delivered")) == 200
    assert delivery(conn) == ("delivered", None)


@pytest.mark.parametrize("how", ["missing", "forged", "other token", "other parameters",
                                 "other url"])
def test_a_bad_signature_is_refused_and_changes_nothing(web, how):
    client, conn = web
    insert_notification(conn, status="sent", twilio_sid=SID)
    sent = params("delivered")
    sig = {
        "missing": None,
        "forged": "dGhpcyBpcyBub3QgYSBzaWduYXR1cmU=",
        "other token": signature(sent, token="someone-elses-token"),
        # a genuine signature of Twilio's, replayed with a different status
        "other parameters": signature(params("failed", ErrorCode="30003")),
        "other url": signature(sent, url="https://attacker.example/twilio/status"),
    }[how]
    assert callback(client, sent, sig) == 403
    assert delivery(conn) == (None, None)
    assert conn.execute("SELECT count(*) FROM notification_event").fetchone()[0] == 0


def test_without_an_auth_token_every_callback_is_refused(settings):
    app = create_app(web_settings(settings, twilio_auth_token=None))
    with TestClient(app) as client:
        assert callback(client, params("delivered")) == 403


def test_delivery_status_only_moves_forward(web):
    client, conn = web
    insert_notification(conn, status="sent", twilio_sid=SID)
    for status, expected in [("queued", "queued"), ("sent", "sent"), ("queued", "sent"),
                             ("delivered", "delivered"), ("sent", "delivered"),
                             ("undelivered", "delivered"), ("delivered", "delivered")]:
        assert callback(client, params(status)) == 200
        assert delivery(conn)[0] == expected, f"after a late {status!r}"


def test_a_failed_delivery_records_the_error_code_and_keeps_it(web):
    client, conn = web
    insert_notification(conn, status="sent", twilio_sid=SID)
    assert callback(client, params("sent")) == 200
    assert callback(client, params("undelivered", ErrorCode="30004")) == 200
    assert delivery(conn) == ("undelivered", 30004)
    assert callback(client, params("delivered")) == 200  # final states never change
    assert callback(client, params("undelivered", ErrorCode="30005")) == 200
    assert delivery(conn) == ("undelivered", 30004)


def test_repeated_callbacks_are_harmless_and_every_change_is_in_the_history(web):
    client, conn = web
    notification_id = insert_notification(conn, status="processing", twilio_sid=SID)
    conn.execute("UPDATE notification SET status = 'sent', sent_datetime = now() WHERE id = %s",
                 (notification_id,))
    for status in ("queued", "queued", "sent", "sent", "failed", "failed"):
        assert callback(client, params(status, ErrorCode="30005" if status == "failed" else "")) == 200
    events = conn.execute(
        """SELECT field, old_value, new_value, error_code, created_datetime
           FROM notification_event WHERE notification_id = %s ORDER BY id""",
        (notification_id,)).fetchall()
    assert [e[:4] for e in events] == [
        ("status", "processing", "sent", None),
        ("delivery_status", None, "queued", None),
        ("delivery_status", "queued", "sent", None),
        ("delivery_status", "sent", "failed", 30005),
    ]
    times = [e[4] for e in events]
    assert times == sorted(times)


def test_an_unknown_sid_is_logged_and_answered_200(web, caplog):
    client, conn = web
    unknown = "SM" + "f" * 32
    with caplog.at_level("WARNING", logger="consumer.serve.receipts"):
        assert callback(client, params("delivered", sid=unknown)) == 200
    assert any(getattr(r, "action", None) == "status_callback" and r.twilio_sid == unknown
               for r in caplog.records)
    assert conn.execute("SELECT count(*) FROM notification_event").fetchone()[0] == 0


def test_a_callback_that_beats_the_dispatchers_commit_is_applied_once_the_sid_is_known(web):
    client, conn = web
    notification_id = insert_notification(conn, status="processing")
    assert callback(client, params("sent")) == 200
    assert callback(client, params("undelivered", ErrorCode="30004")) == 200
    conn.execute("UPDATE notification SET status = 'sent' WHERE id = %s", (notification_id,))
    conn.execute("UPDATE sms_notification SET twilio_sid = %s WHERE notification_id = %s",
                 (SID, notification_id))
    # serve's housekeeping applies parked receipts every second
    wait_until(lambda: delivery(conn) == ("undelivered", 30004), timeout=10,
               message="parked receipts applied")
    assert conn.execute("SELECT count(*) FROM delivery_receipt_early").fetchone()[0] == 0
    events = conn.execute("SELECT new_value FROM notification_event WHERE notification_id = %s "
                          "AND field = 'delivery_status' ORDER BY id", (notification_id,)).fetchall()
    assert events == [("sent",), ("undelivered",)]


def test_a_status_smsq_does_not_track_is_acknowledged_and_ignored(web):
    client, conn = web
    insert_notification(conn, status="sent", twilio_sid=SID)
    assert callback(client, params("canceled")) == 200
    assert delivery(conn) == (None, None)


def test_a_parked_callback_whose_sid_never_shows_up_is_forgotten_after_a_day(web):
    client, conn = web
    day_old, younger = "SM" + "1" * 32, "SM" + "2" * 32
    for sid in (day_old, younger):
        assert callback(client, params("delivered", sid=sid)) == 200
    parked = "SELECT twilio_sid FROM delivery_receipt_early ORDER BY twilio_sid"
    assert conn.execute(parked).fetchall() == [(day_old,), (younger,)]
    # Received a day and a minute ago, and a minute short of a day ago.
    for sid, age in ((day_old, "1 day 1 minute"), (younger, "23 hours 59 minutes")):
        conn.execute("UPDATE delivery_receipt_early SET received_datetime = "
                     "received_datetime - %s::interval WHERE twilio_sid = %s", (age, sid))
    # serve's housekeeping looks at parked receipts every second
    wait_until(lambda: conn.execute(parked).fetchall() == [(younger,)], timeout=10,
               message="the day-old receipt forgotten, the younger one kept")
