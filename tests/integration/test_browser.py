"""The dashboard in a real browser: headless Chromium (Debian's, installed by scripts/test.sh)
driven by Playwright against `smsq serve`'s app under uvicorn on an ephemeral port.

The messages go through the sandbox: stored as `smsq consume` stores them, sent by the real
dispatcher to `smsq fake-twilio` with our status-callback URL; the fake calls back, signed
with its auth token, and `serve` records the delivery. One is refused by Twilio (21211) and
is retried from the dashboard.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Iterator
from datetime import timedelta

import pika
import psycopg
import pytest
import uvicorn
from playwright.sync_api import Page, expect, sync_playwright
from pydantic import AnyHttpUrl

from consumer.serve.app import create_app
from consumer.settings import Settings
from tests.dispatch_support import add_notifications, dispatch_settings, running_dispatcher
from tests.support import ROOT, declare_queues, publish_raw, wait_until
from tests.web_support import PASSWORD, USER, insert_notification, web_settings

ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
SANDBOX_TO = "+14155550142"
INVALID_TO = "+15005550001"  # Twilio's test number for "not a valid phone number" (21211)


@contextlib.contextmanager
def serving(settings: Settings, sock: socket.socket) -> Iterator[None]:
    """The app under uvicorn in a thread, on a socket already bound (its URL is known)."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn",
                              daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, message="uvicorn to start")
        yield
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def bound_socket() -> socket.socket:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock


def outcome(conn: psycopg.Connection, notification_id) -> tuple[str, str | None]:
    """(status, delivery_status) of a notification."""
    return conn.execute(
        """SELECT n.status, s.delivery_status FROM notification n
           JOIN sms_notification s ON s.notification_id = n.id WHERE n.id = %s""",
        (notification_id,)).fetchone()


def seed_an_hour_of_traffic(conn: psycopg.Connection) -> None:
    """Enough to make the overview look like a working day: sends, backlog, errors, buckets."""
    conn.execute("""
        WITH made AS (
            INSERT INTO notification (id, body, priority, status, publish_datetime, sent_datetime)
            SELECT gen_random_uuid(), 'Your order ' || i || ' has shipped',
                   (ARRAY['low', 'low', 'medium', 'high'])[1 + i % 4], 'sent',
                   now() - make_interval(secs => i * 11), now() - make_interval(secs => i * 11 - 1)
            FROM generate_series(1, 320) AS i
              -- a busier stretch twenty minutes ago
              CROSS JOIN generate_series(1, CASE WHEN i BETWEEN 100 AND 130 THEN 4 ELSE 1 END)
            RETURNING id)
        INSERT INTO sms_notification (notification_id, to_phone_number, twilio_sid, segments,
                                      delivery_status)
        SELECT id, '+1415555' || lpad((abs(hashtext(id::text)) % 9000 + 1000)::text, 4, '0'),
               'SM' || md5(id::text), 1, 'delivered' FROM made""")
    for priority, count in (("high", 3), ("low", 40)):
        for _ in range(count):
            insert_notification(conn, priority=priority, publish_ago=timedelta(seconds=95))
    for code, count, reason in ((30003, 4, ""), (21610, 2, "Attempt to send to unsubscribed recipient")):
        for _ in range(count):
            nid = insert_notification(conn, status="processing", twilio_sid=None)
            if reason:
                conn.execute("UPDATE sms_notification SET error_code = %s WHERE notification_id = %s",
                             (code, nid))
                conn.execute("UPDATE notification SET status = 'errored', status_message = %s "
                             "WHERE id = %s", (reason, nid))
            else:
                conn.execute("UPDATE notification SET status = 'sent', sent_datetime = now() "
                             "WHERE id = %s", (nid,))
                conn.execute("UPDATE sms_notification SET delivery_status = 'undelivered', "
                             "error_code = %s WHERE notification_id = %s", (code, nid))
    # the default sender's bucket is the real dispatcher's; a second number beside it
    conn.execute("""INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity)
                    VALUES ('+14155550101', '+14155550101', 'dispatch-2:3120', 1, 1, 1)""")


def dead_letter(settings: Settings) -> None:
    declare_queues(settings)
    publish_raw(settings, [b'{"body": "Your code is 1234", "sms": {"to_phone_number": "+1123"}}'],
                pika.BasicProperties(message_id="order-7731", headers={
                    "x-error": "sms.to_phone_number: not a valid phone number: '+1123'",
                    "x-dead-lettered-at": "2026-11-25T09:12:44Z"}),
                exchange="", routing_key=settings.dead_queue)


@pytest.fixture
def page() -> Iterator[Page]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"])
        try:
            yield browser.new_page(viewport={"width": 1440, "height": 900})
        finally:
            browser.close()


def test_an_operator_logs_in_finds_a_sent_message_and_retries_an_errored_one(
        settings, fake_twilio, page):
    sock = bound_socket()
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    sending = dispatch_settings(settings, fake_twilio, smsq_public_url=AnyHttpUrl(base))
    web = web_settings(sending, smsq_public_url=base, twilio_auth_token=fake_twilio.auth_token)
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn, serving(web, sock):
        sent, errored = add_notifications(
            sending, {"body": "Your code is 482910", "sms": {"to_phone_number": SANDBOX_TO}},
            {"body": "Your code is 112358", "sms": {"to_phone_number": INVALID_TO}})
        with running_dispatcher(sending):
            # the fake's signed callbacks ("sent", then "delivered") reach serve over HTTP
            wait_until(lambda: outcome(conn, sent) == ("sent", "delivered")
                       and outcome(conn, errored)[0] == "errored", timeout=30,
                       message="the sandbox to send, refuse and deliver")
        seed_an_hour_of_traffic(conn)  # after the dispatcher: its backlog stays pending
        dead_letter(settings)
        sid = conn.execute("SELECT twilio_sid FROM sms_notification WHERE notification_id = %s",
                           (sent,)).fetchone()[0]

        page.goto(base + "/")
        expect(page.locator("h1")).to_contain_text("smsq")  # the login form
        ARTIFACTS.mkdir(exist_ok=True)
        page.screenshot(path=str(ARTIFACTS / "login.png"))
        page.fill("input[name=user]", USER)
        page.fill("input[name=password]", PASSWORD)
        page.click("button:has-text('Log in')")
        expect(page.locator("h1")).to_have_text("Overview")

        page.fill("input[name=q]", "+1 (415) 555-0142")
        page.keyboard.press("Enter")
        page.click(f"a[href='/notifications/{sent}']")
        expect(page.locator(".card", has_text="Twilio")).to_contain_text(sid)
        expect(page.locator(".timeline")).to_contain_text("delivered")
        page.screenshot(path=str(ARTIFACTS / "notification.png"), full_page=True)

        page.click("nav >> text=Errors")
        page.screenshot(path=str(ARTIFACTS / "errors.png"), full_page=True)
        page.check(f"input[name=id][value='{errored}']")
        page.click("button:has-text('Retry selected')")
        expect(page.locator(".flash")).to_contain_text("1 notification back to pending")
        status = conn.execute("SELECT status FROM notification WHERE id = %s",
                              (errored,)).fetchone()[0]
        assert status == "pending"

        page.click("nav >> text=Overview")
        expect(page.locator(".dead-list")).to_contain_text("not a valid phone number")
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
        page.set_viewport_size({"width": 400, "height": 860})  # a phone, on call
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
