"""Each class of Twilio outcome, end to end: the fake injects it, the row ends as DESIGN.md says.

The faults are real: the fake answers 429/500/20003, rejects Twilio's test numbers, answers
too late, or closes the connection after accepting; each test checks the fake saw it happen.
"""

from __future__ import annotations

import socket

import psycopg
from pydantic import AnyHttpUrl, SecretStr

from consumer import metrics
from consumer.dispatch import loop
from consumer.dispatch.outcomes import RECONCILE_DELAYS
from tests.dispatch_support import (
    add_notifications,
    arrivals,
    dispatch_settings,
    rows_by_id,
    running_dispatcher,
    statuses,
)
from tests.support import wait_until

TRANSIENT = {"+14155550101": ("429", {"retry_after": 1})}
REJECTED = {"+15005550001": 21211, "+15005550004": 21610, "+15005550009": 21614}
UNKNOWN = {"+14155550104": ("slow", {"slow_ms": 4000}), "+14155550105": ("drop", {})}
# Answered 500 without creating it, or lost on the way in: an unknown outcome whose
# reconciliation finds nothing, so it is sent again, once.
NEVER_CREATED = {"+14155550102": "500", "+14155550106": "drop-unrecorded"}


def all_settled(settings, count: int) -> bool:
    done = statuses(settings)
    return done.get("sent", 0) + done.get("errored", 0) == count


def sends_counted(outcome: str, error_code: str) -> float:
    [family] = metrics.DISPATCH_SENDS.collect()
    wanted = {"outcome": outcome, "error_code": error_code}
    return sum(sample.value for sample in family.samples
               if sample.name == "smsq_dispatch_sends_total" and sample.labels == wanted)


def requests_to(fake, number: str) -> list[dict]:
    return [m for m in arrivals(fake, accepted_only=False) if m["to"] == number]


def test_every_outcome_class_ends_in_its_status(settings, fake_twilio):
    faults = [{"mode": mode, "count": 1, "to": to, **options}
              for to, (mode, options) in (TRANSIENT | UNKNOWN).items()]
    faults += [{"mode": mode, "count": 1, "to": to} for to, mode in NEVER_CREATED.items()]
    fake_twilio.set_faults(faults)
    settings = dispatch_settings(settings, fake_twilio, smsq_twilio_read_timeout=1.0,
                                 smsq_lease_seconds=1.5)
    rejected_before = sends_counted("errored", "21211")
    numbers = [*TRANSIENT, *REJECTED, *UNKNOWN, *NEVER_CREATED, "+14155550100"]
    ids = dict(zip(numbers, add_notifications(
        settings, *[{"body": f"to {n}", "sms": {"to_phone_number": n}} for n in numbers])))
    with running_dispatcher(settings):
        wait_until(lambda: all_settled(settings, len(numbers)), timeout=40,
                   message="every row sent or errored")
    rows = {number: rows_by_id(settings)[row_id] for number, row_id in ids.items()}

    for number in TRANSIENT:  # retried once, then accepted
        first, second = requests_to(fake_twilio, number)
        assert first["fault"] == TRANSIENT[number][0] and second["accepted"]
        assert rows[number]["status"] == "sent" and rows[number]["attempts"] == 2
        assert rows[number]["twilio_sid"] == second["sid"]
    retry_after = requests_to(fake_twilio, "+14155550101")
    assert retry_after[1]["received_at"] - retry_after[0]["received_at"] >= 1.0

    for number, code in REJECTED.items():  # errored at once, never retried
        [request] = requests_to(fake_twilio, number)
        assert request["error_code"] == code
        assert rows[number]["status"] == "errored" and rows[number]["error_code"] == code
        assert rows[number]["status_message"] and rows[number]["attempts"] == 1

    for number, (mode, _) in UNKNOWN.items():  # accepted, answer lost: reconciled, not resent
        [request] = requests_to(fake_twilio, number)
        assert request["fault"] == mode and request["accepted"]
        assert rows[number]["status"] == "sent"
        assert rows[number]["twilio_sid"] == request["sid"]

    # Twilio never had it: reconciliation finds nothing, so it is sent again, once, and
    # only after every check answered (each check is a pair of list requests).
    for number, mode in NEVER_CREATED.items():
        lost, resent = requests_to(fake_twilio, number)
        assert lost["fault"] == mode and not lost["accepted"]
        assert resent["accepted"] and rows[number]["twilio_sid"] == resent["sid"]
        assert resent["received_at"] - lost["received_at"] >= sum(RECONCILE_DELAYS)
        assert rows[number]["attempts"] == 2

    assert sends_counted("errored", "21211") == rejected_before + 1  # the metric, by code

    [plain] = requests_to(fake_twilio, "+14155550100")
    assert rows["+14155550100"]["twilio_sid"] == plain["sid"]


def test_bad_credentials_pause_the_sender_and_keep_the_backlog_pending(settings, fake_twilio,
                                                                      caplog):
    settings = dispatch_settings(settings, fake_twilio, twilio_auth_token=SecretStr("wrong"),
                                 smsq_retry_backoff=0.5, smsq_retry_backoff_max=1.0)
    ids = add_notifications(settings, *[{"body": f"who are you {n}"} for n in range(20)])
    with running_dispatcher(settings):
        wait_until(lambda: len(paused_log(caplog)) >= 3, timeout=15,
                   message="three pauses in a row")
        assert paused_gauge("account_auth") == 1
    rows = rows_by_id(settings)
    assert {rows[i]["status"] for i in ids} == {"pending"}  # never drained into errored
    assert {rows[i]["attempts"] for i in ids} == {0}  # no attempt counted
    assert {rows[i]["error_code"] for i in ids} <= {None, 20003}
    # One probe a pause, not one request a row: the 20 rows waited behind it.
    assert fake_twilio.stats().get("create", 0) == 0  # refused at the door, nothing stored
    pauses = paused_log(caplog)
    assert all(record.reason == "account_auth" for record in pauses)
    assert [record.pauses_in_a_row for record in pauses][:3] == [1, 2, 3]


def paused_log(caplog) -> list:
    return [r for r in caplog.records if getattr(r, "action", None) == "sender_paused"]


def paused_gauge(reason: str) -> float:
    [family] = metrics.SENDER_PAUSED.collect()
    return sum(sample.value for sample in family.samples
               if sample.labels == {"sender": "default", "reason": reason})


def test_gives_up_after_the_configured_attempts(settings, fake_twilio):
    fake_twilio.set_fault("429", retry_after=0)
    settings = dispatch_settings(settings, fake_twilio, smsq_max_attempts=3,
                                 smsq_retry_backoff=0.1, smsq_retry_backoff_max=0.2)
    [row_id] = add_notifications(settings, {"body": "never accepted"})
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"errored": 1}, timeout=15, message="errored")
    row = rows_by_id(settings)[row_id]
    assert row["attempts"] == 3 and len(arrivals(fake_twilio, accepted_only=False)) == 3
    assert row["status_message"].startswith("gave up after 3 attempts")


def test_a_connection_that_fails_before_sending_is_retried_later(settings, fake_twilio):
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = dispatch_settings(settings, fake_twilio,
                                 twilio_api_url=AnyHttpUrl(f"http://127.0.0.1:{closed_port}"),
                                 smsq_retry_backoff=30.0, smsq_retry_backoff_max=60.0)
    [row_id] = add_notifications(settings, {"body": "no route"})
    with running_dispatcher(settings):
        wait_until(lambda: rows_by_id(settings)[row_id]["attempts"] == 1, timeout=10,
                   message="one attempt")
    row = rows_by_id(settings)[row_id]
    assert row["status"] == "pending" and row["retry_datetime"] is not None
    assert "before the request was sent" in row["status_message"]


def test_reconciliation_never_takes_the_sid_of_another_row(settings, fake_twilio):
    """The same text twice to one number: the first is lost before Twilio stores it, the
    second is accepted. Twilio lists the second when the first is reconciled; that SID is
    the second row's, so the first must be sent again, not marked sent."""
    fake_twilio.set_faults([{"mode": "drop-unrecorded", "count": 1}])
    settings = dispatch_settings(settings, fake_twilio, smsq_lease_seconds=1.0)
    lost, kept = add_notifications(settings, {"body": "your code is 1", "priority": "high"},
                                   {"body": "your code is 1"})
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 2}, timeout=40, message="both sent")
    rows = rows_by_id(settings)
    accepted = fake_twilio.messages(accepted_only=True)
    assert len(accepted) == 2 and len(fake_twilio.messages()) == 3
    assert {rows[lost]["twilio_sid"], rows[kept]["twilio_sid"]} == {m["sid"] for m in accepted}


def test_retry_after_holds_every_row_of_the_sender_not_only_the_one_refused(
        settings, fake_twilio):
    """Twilio's Retry-After asks the account to slow down: the sender's next rows wait too."""
    fake_twilio.set_fault("429", count=1, retry_after=2)
    # One request at a time: the 429 is handled before any other row could be released, so
    # each later request shows whether the pause held it back.
    settings = dispatch_settings(settings, fake_twilio, smsq_dispatch_concurrency=1)
    add_notifications(settings, *[{"body": f"row {i}"} for i in range(4)])
    with running_dispatcher(settings):
        wait_until(lambda: statuses(settings) == {"sent": 4}, timeout=20, message="all sent")
    refused, *later = arrivals(fake_twilio, accepted_only=False)
    assert refused["fault"] == "429" and len(later) == 4  # the three others, and the retry
    pause_ends = refused["received_monotonic"] + 2
    assert [m["body"] for m in later if m["received_monotonic"] < pause_ends] == []


def test_an_outcome_smsq_cannot_handle_fails_its_row_and_its_sender_goes_on(
        settings, fake_twilio, monkeypatch):
    """The first request never leaves (refused) and its outcome raises in smsq: the row is
    failed, and its sender does not wait for ever for a departure that will never come."""
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    settings = dispatch_settings(settings, fake_twilio,
                                 twilio_api_url=AnyHttpUrl(f"http://127.0.0.1:{closed_port}"),
                                 twilio_sms_rate=1.0, smsq_burst=1.0,
                                 smsq_retry_backoff=30.0, smsq_retry_backoff_max=60.0)
    raised: list[str] = []
    decide = loop.decide

    def decide_raising_once(*args, **kwargs):
        if not raised:
            raised.append("once")
            raise RuntimeError("a bug of smsq's, injected")
        return decide(*args, **kwargs)

    monkeypatch.setattr(loop, "decide", decide_raising_once)
    first, second = add_notifications(settings, {"body": "first"}, {"body": "second"})
    with running_dispatcher(settings):
        wait_until(lambda: rows_by_id(settings)[second]["attempts"] == 1, timeout=15,
                   message="the second row attempted after the first one's outcome raised")
    rows = rows_by_id(settings)
    assert raised == ["once"]
    assert rows[first]["status"] == "failed" and "injected" in rows[first]["status_message"]
    assert "before the request was sent" in rows[second]["status_message"]



def test_rows_in_hand_whose_lease_ran_out_are_sent_not_reconciled(settings, fake_twilio):
    """A loop stalled past the lease: the rows it still holds in its queue read as stale in
    Postgres. They are this dispatcher's own, so it sends them, once each, and asks Twilio
    about none of them."""
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=1.0, smsq_burst=1.0,
                                 smsq_lease_seconds=60.0)  # renewed only every 15 s
    add_notifications(settings, *[{"body": f"row {i}"} for i in range(4)])
    with running_dispatcher(settings):
        wait_until(lambda: arrivals(fake_twilio), timeout=10, message="the first send")
        with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
            expired = conn.execute(
                "UPDATE notification SET lease_expire_datetime = now() - interval '1 second'"
                " WHERE status = 'processing'").rowcount
        wait_until(lambda: statuses(settings) == {"sent": 4}, timeout=20, message="all sent")
    assert expired >= 1  # rows in hand: queued, or on the wire
    assert sorted(m["body"] for m in arrivals(fake_twilio, accepted_only=False)) == [
        f"row {i}" for i in range(4)]
    assert fake_twilio.stats().get("list", 0) == 0
