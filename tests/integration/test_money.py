"""Issue 18: what each message cost, read from Twilio (the sandbox) after sending, and the
spend it adds up to, in `smsq status`, Prometheus and the dashboard."""

from __future__ import annotations

import json
import signal
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from starlette.testclient import TestClient

from consumer import money
from consumer.dispatch.prices import SWEEP_LOCK, sweep
from consumer.dispatch.twilio_client import TwilioSender
from consumer.serve.app import create_app
from tests.dispatch_support import add_notifications, dispatch_settings, statuses
from tests.integration.test_twilio_end_to_end import running_serve
from tests.support import run_smsq, start_smsq, stop, wait_until
from tests.web_support import log_in, web_settings

PRICE = Decimal("0.00790")  # the sandbox's price of a segment


def prices(settings) -> dict:
    with psycopg.connect(settings.database_dsn) as conn:
        return dict(conn.execute(
            "SELECT twilio_sid, price FROM sms_notification WHERE twilio_sid IS NOT NULL"))


def spend_rows(settings) -> list[tuple]:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute("SELECT sender, country, currency, amount, messages FROM spend_daily "
                            "ORDER BY country").fetchall()


def test_prices_are_read_after_sending_through_the_list_and_added_up_once(
        settings, fake_twilio, tmp_path):
    fake_twilio.configure(price_delay_ms=1500)
    settings = dispatch_settings(settings, fake_twilio, smsq_price_sweep_seconds=0.5)
    add_notifications(settings, {"body": "to the US"},
                      {"body": "to the UK", "sms": {"to_phone_number": "+447400123456"}},
                      {"body": "x" * 200})  # two segments
    # Two dispatchers: only one sweeps at a time, and nothing is counted twice.
    first = start_smsq(settings, "dispatch", log_path=tmp_path / "first.log")
    second = start_smsq(settings, "dispatch", log_path=tmp_path / "second.log")
    try:
        wait_until(lambda: statuses(settings) == {"sent": 3}, timeout=30, message="all sent")
        assert set(prices(settings).values()) == {None}  # Twilio has not priced them yet
        wait_until(lambda: None not in prices(settings).values(), timeout=30,
                   message="the prices swept")
        lists_after = fake_twilio.stats().get("list", 0)
    finally:
        stop(first, signal.SIGTERM)
        stop(second, signal.SIGTERM)
    assert sorted(prices(settings).values()) == [PRICE, PRICE, 2 * PRICE]
    assert fake_twilio.stats().get("fetch", 0) == 0  # the list, never one request a message
    assert lists_after >= 1
    assert spend_rows(settings) == [("", "GB", "USD", PRICE, 1), ("", "US", "USD", 3 * PRICE, 2)]


def test_a_message_sent_twice_costs_both_sendings(settings, fake_twilio, tmp_path):
    fake_twilio.set_faults([{"mode": "fail-30001", "count": 1}])
    fake_twilio.configure(price_delay_ms=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_retry_backoff=0.5,
                                 smsq_price_sweep_seconds=0.5)
    dispatcher = None
    with running_serve(settings, tmp_path) as settings:
        [row_id] = add_notifications(settings, {"body": "dropped, then sent"})
        dispatcher = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
        try:
            wait_until(lambda: len(fake_twilio.messages(accepted_only=True)) == 2, timeout=30,
                       message="sent again after the 30001 callback")
            wait_until(lambda: None not in prices(settings).values() and prices(settings),
                       timeout=30, message="the second sending priced")
        finally:
            stop(dispatcher, signal.SIGTERM)
    # The failed first sending was never sent, so never charged: only the second counts.
    assert spend_rows(settings) == [("", "US", "USD", PRICE, 1)]
    with psycopg.connect(settings.database_dsn) as conn:
        assert conn.execute("SELECT price, sent_datetime IS NOT NULL FROM twilio_superseded_sid"
                            ).fetchall() == [(None, True)]


def test_a_superseded_sid_that_was_sent_keeps_its_own_price(settings, fake_twilio, tmp_path):
    """`smsq retry --undelivered` sends a message Twilio sent (and charged) but that never
    arrived: both sendings are paid for."""
    fake_twilio.configure(price_delay_ms=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_price_sweep_seconds=0.5)
    [row_id] = add_notifications(settings, {"body": "undelivered",
                                            "sms": {"to_phone_number": "+15005553003"}})
    dispatcher = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
    try:
        wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=30, message="sent")
        with psycopg.connect(settings.database_dsn) as conn:  # as its callback would say
            conn.execute("UPDATE sms_notification SET delivery_status = 'undelivered'")
        result = run_smsq(settings, "retry", "--undelivered", str(row_id))
        assert result.returncode == 0, result.stderr
        wait_until(lambda: len(fake_twilio.messages(accepted_only=True)) == 2, timeout=30,
                   message="sent again")
        wait_until(lambda: len(spend_rows(settings)) == 1 and spend_rows(settings)[0][4] == 2,
                   timeout=30, message="both sendings priced")
    finally:
        stop(dispatcher, signal.SIGTERM)
    assert spend_rows(settings) == [("", "US", "USD", 2 * PRICE, 2)]


def test_only_one_dispatcher_sweeps_at_a_time(settings, fake_twilio, tmp_path):
    fake_twilio.configure(price_delay_ms=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_price_sweep_seconds=0.3)
    dispatcher = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
    try:
        with psycopg.connect(settings.database_dsn, autocommit=True) as holder:
            holder.execute("SELECT pg_advisory_lock(%s, %s)", SWEEP_LOCK)  # "another" sweeper
            add_notifications(settings, {"body": "priced later"})
            wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=30, message="sent")
            lists_while_held = fake_twilio.stats().get("list", 0)
            wait_until(lambda: fake_twilio.messages()[0]["status"] == "delivered", timeout=10,
                       message="delivered")
            assert set(prices(settings).values()) == {None}
        wait_until(lambda: None not in prices(settings).values(), timeout=30,
                   message="priced once the lock is free")
    finally:
        stop(dispatcher, signal.SIGTERM)
    assert lists_while_held == 0


def test_a_sweep_records_its_prices_a_batch_at_a_time(settings, fake_twilio, tmp_path):
    fake_twilio.configure(price_delay_ms=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_price_sweep_seconds=3600)
    add_notifications(settings, *[{"body": f"message {n}"} for n in range(5)])
    dispatcher = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
    try:
        wait_until(lambda: statuses(settings) == {"sent": 5}, timeout=30, message="sent")
    finally:
        stop(dispatcher, signal.SIGTERM)
    assert set(prices(settings).values()) == {None}  # no sweep of the dispatcher's own
    # Twilio prices a message once it has sent it, 100 ms after accepting it here.
    wait_until(lambda: all(m["status"] not in ("accepted", "queued")
                           for m in fake_twilio.messages()), timeout=10, message="all sent")
    twilio = TwilioSender(settings, pool_size=1)
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        assert sweep(conn, twilio, batch=2) == 5  # batches of 2, 2 and 1
        assert sweep(conn, twilio, batch=2) == 0  # nothing counted twice
    twilio.close()
    assert set(prices(settings).values()) == {PRICE}
    assert spend_rows(settings) == [("", "US", "USD", 5 * PRICE, 5)]
    with psycopg.connect(settings.database_dsn) as conn:  # one transaction a batch
        [[transactions]] = conn.execute(
            "SELECT count(DISTINCT xmin::text) FROM sms_notification").fetchall()
    assert transactions == 3


def add_spend(settings, *rows) -> None:
    with psycopg.connect(settings.database_dsn) as conn:
        money.add_spend(conn, rows)
        conn.commit()


def test_status_shows_todays_and_this_months_spend_per_sender_and_currency(settings):
    today = datetime.now(timezone.utc).date()
    earlier = today.replace(day=1) - timedelta(days=1)  # last month
    add_spend(settings, (today, "", "US", "USD", Decimal("0.0079")),
              (today, "", "GB", "USD", Decimal("0.04")),
              (today.replace(day=1), "+15005550007", "US", "USD", Decimal("0.5")),
              (earlier, "", "US", "USD", Decimal("9")))
    result = run_smsq(settings, "status", "--json")
    assert result.returncode == 0, result.stderr
    spend = {(s["sender"], s["currency"]): s for s in json.loads(result.stdout)["spend"]}
    default = spend[("", "USD")]
    assert default["today"] == pytest.approx(0.0479) and default["month"] == pytest.approx(0.0479)
    assert default["messages"] == 3 and default["total"] == pytest.approx(9.0479)
    other = spend[("+15005550007", "USD")]
    assert other["month"] == pytest.approx(0.5)
    assert other["today"] == pytest.approx(0.5 if today.day == 1 else 0.0)
    text = run_smsq(settings, "status").stdout
    assert "spend of sender" in text and "0.0479" in text


def test_the_dashboard_and_prometheus_show_the_spend(settings):
    today = datetime.now(timezone.utc).date()
    add_spend(settings, (today, "", "US", "USD", Decimal("0.25")),
              (today - timedelta(days=3), "", "GB", "USD", Decimal("1.5")),
              (today - timedelta(days=40), "", "DE", "USD", Decimal("7")))  # out of the chart
    with TestClient(create_app(web_settings(settings))) as client:
        log_in(client)
        page = client.get("/").text
        metrics = client.get("/metrics").text
    assert "Spend per day" in page and "1.75 USD" in page  # 30 days, not the 40-day-old one
    assert f"{today.isoformat()}: 0.2500 USD" in page  # the bar of today
    by_country = page.split("spend-by-country", 1)[1].split("</table>", 1)[0]
    assert by_country.index("GB") < by_country.index("US") and "DE" not in by_country
    assert 'smsq_spend_total{currency="USD",sender="default"} 8.75' in metrics
