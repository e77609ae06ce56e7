"""The guard rails (README "Guard rails") against the real RabbitMQ, Postgres, programs and the
sandbox: the suppression list and what feeds it, countries, caps per recipient, the daily
budget."""

from __future__ import annotations

import json
import logging

import psycopg
import pytest

from consumer import metrics
from consumer.dispatch import guards
from tests.dispatch_support import (
    SENDER,
    add_notifications,
    arrivals,
    dispatch_settings,
    rows_by_id,
    running_dispatcher,
    statuses,
)
from tests.support import (
    declare_queues,
    get_all,
    publish_raw,
    run_smsq,
    start_smsq,
    stop,
    wait_until,
)

NUMBER = "+14155550188"
OTHER = "+14155550199"


def query(settings, sql: str, *args) -> list[tuple]:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute(sql, args).fetchall()


def suppressed(settings) -> dict[str, str]:
    return dict(query(settings, "SELECT phone_number, reason FROM suppressed_number"))


def guard_counted(settings, guard: str) -> int:
    rows = query(settings, "SELECT count FROM guard_count WHERE guard = %s", guard)
    return rows[0][0] if rows else 0


def requests_to(fake, number: str) -> list[dict]:
    return [m for m in arrivals(fake, accepted_only=False) if m["to"] == number]


def counter_value(counter, **labels: str) -> float:
    [family] = counter.collect()
    return sum(s.value for s in family.samples
               if s.name.endswith("_total") and s.labels == labels)


# -- countries ---------------------------------------------------------------------------------

def test_a_number_of_a_country_not_allowed_is_dead_lettered_naming_the_country(settings):
    declare_queues(settings)
    consume = start_smsq(settings, "consume", SMSQ_ALLOWED_COUNTRIES="US,CA")
    try:
        bodies = [json.dumps({"body": "hi", "sms": {"to_phone_number": to}}).encode()
                  for to in ("+14155550123", "+14165550123", "+442071838750")]
        publish_raw(settings, bodies)
        wait_until(lambda: query(settings, "SELECT count(*) FROM notification")[0][0] == 2,
                   message="the US and the Canadian number stored")
        dead = wait_until(lambda: get_all(settings, settings.dead_queue),
                          message="the British number dead-lettered")
    finally:
        assert stop(consume) == 0
    [(properties, body)] = dead
    assert body == bodies[2]  # unchanged
    error = properties.headers["x-error"]
    assert error.startswith("sms.to_phone_number: ") and "GB" in error, error
    stored = {row[0] for row in query(settings, "SELECT to_phone_number FROM sms_notification")}
    assert stored == {"+14155550123", "+14165550123"}


# -- the suppression list ------------------------------------------------------------------------

def test_a_suppressed_number_is_errored_without_a_request_or_a_token(settings, fake_twilio):
    # One token, refilled in 1000 s: had the suppressed message taken it, the other one
    # would wait that long and the test would time out.
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=0.001, smsq_burst=1.0)
    assert run_smsq(settings, "suppress", "add", NUMBER, "--note", "fraud").returncode == 0
    before = counter_value(metrics.DISPATCH_SUPPRESSED)
    blocked, allowed = add_notifications(
        settings, {"body": "blocked", "priority": "high", "sms": {"to_phone_number": NUMBER}},
        {"body": "allowed", "sms": {"to_phone_number": OTHER}})
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"errored": 1, "sent": 1}, timeout=20,
                   message="one errored, one sent")
    rows = rows_by_id(settings)
    assert rows[blocked]["error_code"] == 21610 and rows[blocked]["attempts"] == 0
    assert "suppressed" in rows[blocked]["status_message"]
    assert rows[allowed]["status"] == "sent"
    assert [m["to"] for m in arrivals(fake_twilio, accepted_only=False)] == [OTHER]
    assert counter_value(metrics.DISPATCH_SUPPRESSED) == before + 1
    assert guard_counted(settings, "suppressed") == 1


def test_a_21610_answer_suppresses_the_number(settings, fake_twilio):
    fake_twilio.opt_out(NUMBER)
    settings = dispatch_settings(settings, fake_twilio)
    [first] = add_notifications(settings, {"sms": {"to_phone_number": NUMBER}})
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"errored": 1}, message="refused by Twilio")
        assert suppressed(settings) == {NUMBER: "twilio_21610"}
        [second] = add_notifications(settings, {"sms": {"to_phone_number": NUMBER}})
        wait_until(lambda: statuses(settings) == {"errored": 2}, message="second one errored")
    rows = rows_by_id(settings)
    assert rows[first]["attempts"] == 1 and rows[first]["error_code"] == 21610
    assert rows[second]["attempts"] == 0 and rows[second]["error_code"] == 21610
    assert "suppressed" in rows[second]["status_message"]
    assert len(requests_to(fake_twilio, NUMBER)) == 1  # the second never reached Twilio


def test_smsq_suppress_adds_lists_and_removes(settings):
    added = run_smsq(settings, "suppress", "add", NUMBER, "+1 (415) 555-0199", "+1123",
                     "--json")
    assert added.returncode == 1  # +1123 is no number
    assert json.loads(added.stdout) == {"done": [NUMBER, OTHER],
                                        "not_done": {"+1123": "not a valid phone number"}}
    again = run_smsq(settings, "suppress", "add", NUMBER)
    assert again.returncode == 1 and "already suppressed" in again.stdout
    listed = run_smsq(settings, "suppress", "list", "--json")
    assert listed.returncode == 0
    assert {(e["phone_number"], e["reason"]) for e in json.loads(listed.stdout)} == {
        (NUMBER, "operator"), (OTHER, "operator")}
    assert NUMBER in run_smsq(settings, "suppress", "list").stdout
    assert run_smsq(settings, "suppress", "remove", NUMBER).returncode == 0
    gone = run_smsq(settings, "suppress", "remove", NUMBER)
    assert gone.returncode == 1 and "not suppressed" in gone.stdout
    assert suppressed(settings) == {OTHER: "operator"}


# -- per-recipient caps --------------------------------------------------------------------------

def test_the_recipient_limit_counts_what_was_sent(settings, fake_twilio):
    # The first request is refused (429): it sent nothing, so it keeps no place. Two places,
    # four messages: two sent, two errored naming the limit, three requests in all.
    fake_twilio.set_fault("429", count=1, to=NUMBER)
    settings = dispatch_settings(settings, fake_twilio, smsq_recipient_limit="2/1h,10/1d")
    before = counter_value(metrics.DISPATCH_CAPPED, limit="2/1h")
    ids = add_notifications(settings, *[{"body": f"code {i}", "sms": {"to_phone_number": NUMBER}}
                                        for i in range(4)],
                            {"body": "someone else", "sms": {"to_phone_number": OTHER}})
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 3, "errored": 2}, timeout=20,
                   message="three sent, two capped")
    rows = rows_by_id(settings)
    capped = [rows[i] for i in ids if rows[i]["status"] == "errored"]
    assert all("recipient limit" in r["status_message"] and "2 per 1h" in r["status_message"]
               for r in capped)
    # (The 429'd one may be among them: its retry came after two others took the places.)
    sent_to_number = [m for m in requests_to(fake_twilio, NUMBER) if m["accepted"]]
    assert len(sent_to_number) == 2 and len(requests_to(fake_twilio, NUMBER)) == 3
    assert counter_value(metrics.DISPATCH_CAPPED, limit="2/1h") == before + 2
    assert guard_counted(settings, "capped") == 2


def test_the_recipient_limit_holds_across_dispatchers(settings, fake_twilio):
    # Rows to one number under two senders (stored before SMSQ_SENDERS changed), paced by two
    # dispatchers: they race for the same number's places, and only three go in all.
    pool = "+15017122661"
    settings = dispatch_settings(settings, fake_twilio, smsq_senders=pool,
                                 smsq_recipient_limit="3/1h")
    for sender in ("", pool):
        add_notifications(settings, *[{"body": f"race {sender} {i}",
                                       "sms": {"to_phone_number": NUMBER}} for i in range(6)],
                          sender=sender)
    with running_dispatcher(settings), running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 3, "errored": 9}, timeout=30,
                   message="three sent, nine capped")
    assert len(requests_to(fake_twilio, NUMBER)) == 3
    assert {m["from"] for m in requests_to(fake_twilio, NUMBER)} <= {SENDER, pool}


# -- the daily budget ------------------------------------------------------------------------------

def budget_pauses(caplog) -> list:
    return [r for r in caplog.records if getattr(r, "action", None) == "sender_paused"
            and getattr(r, "reason", None) == "daily_budget"]


def pause_of(settings) -> tuple:
    return query(settings, "SELECT pause_reason, pause_message FROM dispatch_sender")[0]


def test_the_daily_budget_pauses_the_sender_until_raised(settings, fake_twilio, caplog):
    caplog.set_level(logging.INFO)
    settings = dispatch_settings(settings, fake_twilio, smsq_daily_segment_limit=3)
    ids = add_notifications(settings, *[{"body": f"budget {i}"} for i in range(5)])
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings).get("sent") == 3, message="three sent")
        wait_until(lambda: pause_of(settings)[0] == "daily_budget", message="paused")
        assert metrics.SENDER_PAUSED.labels("default", "daily_budget")._value.get() == 1
    rows = rows_by_id(settings)
    waiting = [rows[i] for i in ids if rows[i]["status"] != "sent"]
    assert [(r["status"], r["attempts"]) for r in waiting] == [("pending", 0)] * 2
    assert len(arrivals(fake_twilio)) == 3
    assert len(budget_pauses(caplog)) == 1  # one warning per pause
    assert budget_pauses(caplog)[0].levelno == logging.WARNING
    assert query(settings, "SELECT sender, segments FROM sender_day_segments") == [("", 3)]
    assert guard_counted(settings, "budget_paused") == 1

    # Restarted with the same limit, it counts what was sent today and stays paused.
    with running_dispatcher(settings):
        wait_until(lambda: len(budget_pauses(caplog)) == 2, message="paused again at once")
    assert len(arrivals(fake_twilio)) == 3

    # Raised and restarted: the rest goes.
    with running_dispatcher(settings.model_copy(update={"smsq_daily_segment_limit": 10})):
        wait_until(lambda: statuses(settings) == {"sent": 5}, message="the rest sent")
    assert query(settings, "SELECT segments FROM sender_day_segments") == [(5,)]


# -- smsq status ----------------------------------------------------------------------------------

def test_status_shows_the_guard_rails(settings):
    run_smsq(settings, "suppress", "add", NUMBER)
    with psycopg.connect(settings.database_dsn) as conn:
        conn.execute("INSERT INTO guard_count (day, guard, count) VALUES "
                     "((now() AT TIME ZONE 'UTC')::date, 'capped', 4)")
    done = run_smsq(settings, "status", "--json", SMSQ_RECIPIENT_LIMIT="5/1h",
                    SMSQ_ALLOWED_COUNTRIES="US")
    assert done.returncode == 0, done.stderr
    guards = json.loads(done.stdout)["guard_rails"]
    assert guards["suppressed_numbers"] == 1 and guards["today"]["capped"] == 4
    assert guards["settings"]["recipient_limit"] == "5/1h"
    assert guards["settings"]["allowed_countries"] == ["US"]
    text = run_smsq(settings, "status").stdout
    assert "suppressed numbers: 1 (operator 1)" in text and "4 not sent over the recipient" in text


@pytest.fixture
def sandbox_process():
    from consumer.sandbox import spawn
    process, control = spawn("--opted-out", NUMBER)
    yield control
    assert stop(process) == 0


def test_the_sandbox_process_answers_21610_for_an_opted_out_number(sandbox_process):
    from twilio.base.exceptions import TwilioRestException
    from twilio.http.http_client import TwilioHttpClient
    from twilio.rest import Client

    class Local(TwilioHttpClient):
        def request(self, method, url, *args, **kwargs):
            url = url.replace("https://api.twilio.com", sandbox_process.url)
            return super().request(method, url, *args, **kwargs)

    client = Client(sandbox_process.account_sid, sandbox_process.auth_token,
                    http_client=Local())
    with pytest.raises(TwilioRestException) as refused:
        client.messages.create(to=NUMBER, from_=SENDER, body="x")
    assert refused.value.code == 21610
    assert sandbox_process.opt_out(remove=(NUMBER,)) == []
    assert client.messages.create(to=NUMBER, from_=SENDER, body="x").sid


def test_rows_released_while_their_places_are_taken_go_back_when_postgres_goes_away(
        settings, fake_twilio, caplog):
    """Postgres lost while taking recipient places (the work connection killed in the lock
    wait): the rows released for it are handed back at the reconnect, not left in
    processing until their lease (60 s here) ends."""
    settings = dispatch_settings(settings, fake_twilio, smsq_recipient_limit="5/1h",
                                 smsq_lease_seconds=60.0)
    [row_id] = add_notifications(settings, {"body": "code", "sms": {"to_phone_number": NUMBER}})
    caplog.set_level(logging.INFO, logger="consumer.dispatch.loop")
    with psycopg.connect(settings.database_dsn) as holder:
        holder.execute("SELECT pg_advisory_xact_lock(%s, hashtext(%s))",
                       (guards.RECIPIENT_LOCK_NAMESPACE, NUMBER))
        with running_dispatcher(settings):
            waiting = wait_until(lambda: query(
                settings, "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
                          " AND application_name = 'smsq dispatch' AND wait_event_type = 'Lock'"),
                timeout=20, message="the dispatcher waits for the recipient's lock")
            assert query(settings, "SELECT pg_terminate_backend(%s)", waiting[0][0]) == [(True,)]
            holder.rollback()  # the place may be taken now
            wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=20,
                       message="sent after the reconnect, long before its lease ends")
    handed_back = [r for r in caplog.records if getattr(r, "action", "") == "unsent_handed_back"]
    assert [r.count for r in handed_back] == [1]
    assert rows_by_id(settings)[row_id]["status"] == "sent"
    assert len(requests_to(fake_twilio, NUMBER)) == 1


def test_postgres_lost_after_a_recipient_limit_stopped_a_row(settings, fake_twilio, caplog):
    """Two rows to one number with one place, released together: the first takes the place,
    the second is stopped, and Postgres goes away right after (the connection killed while
    the stop is counted). The stopped row keeps its outcome (errored, stopped once); the
    other goes back to pending with its place given back, and is sent once."""
    settings = dispatch_settings(settings, fake_twilio, smsq_recipient_limit="1/1h",
                                 smsq_lease_seconds=60.0, smsq_burst=5)  # released together
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("""
            CREATE SEQUENCE faults;  -- not rolled back with the killed transaction
            CREATE FUNCTION kill_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF NEW.guard = 'capped' AND nextval('faults') = 1 THEN
                    PERFORM pg_terminate_backend(pg_backend_pid());
                    PERFORM pg_sleep(5);  -- the signal ends it here, inside this statement
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER kill_once BEFORE INSERT ON guard_count
                FOR EACH ROW EXECUTE FUNCTION kill_once()""")
    first, second = add_notifications(
        settings, *[{"body": f"code {i}", "priority": "high",
                     "sms": {"to_phone_number": NUMBER}} for i in range(2)])
    caplog.set_level(logging.INFO, logger="consumer.dispatch")
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 1, "errored": 1}, timeout=20,
                   message="one sent, one stopped")
    assert query(settings, "SELECT last_value, is_called FROM faults") == [(1, True)]  # once
    assert any(getattr(r, "action", "") == "postgres_lost" for r in caplog.records)
    rows = rows_by_id(settings)
    stopped = [r for r in caplog.records if getattr(r, "action", "") == "message_capped"]
    assert [r.notification_id for r in stopped] == [str(second)]
    assert rows[second]["status"] == "errored"
    assert "recipient limit" in rows[second]["status_message"]
    assert rows[first]["status"] == "sent"
    assert len(requests_to(fake_twilio, NUMBER)) == 1


def test_rows_released_when_taking_their_places_fails_go_back_at_the_fresh_start(
        settings, fake_twilio, caplog):
    """Not Postgres lost but an error of the statement itself (here a trigger raising once)
    while the place is taken: the loop starts afresh, and the row released for it goes back
    to pending then, not after its lease (60 s here)."""
    settings = dispatch_settings(settings, fake_twilio, smsq_recipient_limit="5/1h",
                                 smsq_lease_seconds=60.0)
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("""
            CREATE SEQUENCE faults;
            CREATE FUNCTION refuse_once() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                IF nextval('faults') = 1 THEN
                    RAISE EXCEPTION 'refused once, by the test';
                END IF;
                RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_once BEFORE INSERT ON recipient_send
                FOR EACH ROW EXECUTE FUNCTION refuse_once()""")
    [row_id] = add_notifications(settings, {"body": "code", "sms": {"to_phone_number": NUMBER}})
    caplog.set_level(logging.INFO, logger="consumer.dispatch.loop")
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=20,
                   message="sent after the fresh start, long before its lease ends")
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert "dispatch_loop_error" in actions  # the fault struck
    handed_back = [r for r in caplog.records if getattr(r, "action", "") == "unsent_handed_back"]
    assert [r.count for r in handed_back] == [1]
    assert len(requests_to(fake_twilio, NUMBER)) == 1
    assert rows_by_id(settings)[row_id]["status"] == "sent"
