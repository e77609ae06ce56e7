"""The dashboard in a real browser: headless Chromium (Debian's, installed by scripts/test.sh)
driven by Playwright against `smsq serve`'s app under uvicorn on an ephemeral port.

The sent notification is stored directly in the database as the dispatcher leaves it after
Twilio accepted it, and its delivery receipt arrives as a signed status callback over HTTP,
as Twilio (or `smsq fake-twilio`) sends it.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pika
import psycopg
import pytest
import uvicorn
from playwright.sync_api import Page, expect, sync_playwright
from twilio.request_validator import RequestValidator

from consumer import amqp
from consumer.settings import Settings
from consumer.web.app import create_app
from tests.support import publish_raw, wait_until
from tests.web_support import (AUTH_TOKEN, PASSWORD, PUBLIC_URL, USER, insert_notification,
                               web_settings)

ARTIFACTS = Path(__file__).resolve().parent.parent / "artifacts"
CHROMIUM = "/usr/bin/chromium"
SANDBOX_SID = "SM" + "5a" * 16
SANDBOX_TO = "+14155550142"


@contextlib.contextmanager
def serving(settings: Settings) -> Iterator[str]:
    """The app under uvicorn in a thread, on a port the OS picks; yields its base URL."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), host="127.0.0.1", port=0,
                                           log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, timeout=20, message="uvicorn to start")
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def send_receipt(base_url: str, params: dict[str, str]) -> None:
    """A status callback signed, as Twilio does, for the public URL it was given (behind a
    proxy that is not the address it reaches)."""
    signature = RequestValidator(AUTH_TOKEN).compute_signature(
        PUBLIC_URL + "/twilio/status", params)
    response = httpx.post(base_url + "/twilio/status", data=params,
                          headers={"X-Twilio-Signature": signature})
    assert response.status_code == 200


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
    conn.execute("""INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity)
                    VALUES ('', '+14155550100', 'dispatch-1:2817', 0.62, 1, 1),
                           ('+14155550101', '+14155550101', 'dispatch-2:3120', 1, 1, 1)""")


def dead_letter(settings: Settings) -> None:
    with amqp.connect(settings, "test") as connection:
        amqp.declare_topology(connection.channel(), settings)
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


def test_an_operator_logs_in_finds_a_sent_message_and_retries_an_errored_one(settings, page):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        seed_an_hour_of_traffic(conn)
        sent = insert_notification(conn, status="sent", to=SANDBOX_TO, twilio_sid=SANDBOX_SID,
                                   sent_ago=timedelta(seconds=20), body="Your code is 482910")
        errored = insert_notification(conn, status="processing", to="+14155550177")
        conn.execute("UPDATE sms_notification SET error_code = 21211 WHERE notification_id = %s",
                     (errored,))
        conn.execute("UPDATE notification SET status = 'errored', status_message = "
                     "'The ''To'' number is not a valid phone number.' WHERE id = %s", (errored,))
        dead_letter(settings)
        with serving(web_settings(settings)) as base:
            for status in ("sent", "delivered"):
                send_receipt(base, {"MessageSid": SANDBOX_SID, "MessageStatus": status})

            page.goto(base + "/")
            expect(page.locator("h1")).to_contain_text("smsq")  # the login form
            page.fill("input[name=user]", USER)
            page.fill("input[name=password]", PASSWORD)
            page.click("button:has-text('Log in')")
            expect(page.locator("h1")).to_have_text("Overview")

            page.fill("input[name=q]", "+1 (415) 555-0142")
            page.keyboard.press("Enter")
            page.click(f"a[href='/notifications/{sent}']")
            expect(page.locator(".card", has_text="Twilio")).to_contain_text(SANDBOX_SID)
            expect(page.locator(".timeline")).to_contain_text("delivered")
            ARTIFACTS.mkdir(exist_ok=True)
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
