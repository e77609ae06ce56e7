"""The Twilio adapter against the fake over HTTP: what went out, and how each failure is read."""

from __future__ import annotations

import socket
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime

import pytest
from pydantic import AnyHttpUrl, SecretStr

from consumer.outcomes import RetryPolicy, decide
from consumer.settings import Settings
from consumer.twilio_client import (
    MissingPublicUrl, Outgoing, TwilioSender, _seconds_of_retry_after,
)

FROM = "+15005550006"
TO = "+14155550123"


def sender_for(fake, **changes) -> TwilioSender:
    settings = Settings(_env_file=None, twilio_api_url=AnyHttpUrl(fake.url),
                        twilio_account_sid=fake.account_sid,
                        twilio_auth_token=SecretStr(fake.auth_token),
                        smsq_twilio_read_timeout=1.0, **changes)
    return TwilioSender(settings, pool_size=4)


def test_an_accepted_message_gives_its_sid_and_segments(fake_twilio):
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "hello " * 40))
    [received] = fake_twilio.messages()
    assert attempt.request_sent and attempt.http_status == 201
    assert attempt.sid == received["sid"] and attempt.segments == 2
    assert received["status_callback"] is None  # no SMSQ_PUBLIC_URL, no callback


def test_a_refused_connection_was_not_sent():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    fake = type("Nowhere", (), {"url": f"http://127.0.0.1:{port}", "account_sid": "AC1",
                                "auth_token": "x"})
    attempt = sender_for(fake).send(Outgoing(TO, FROM, "hello"))
    assert not attempt.request_sent
    policy = RetryPolicy(max_attempts=5, backoff=1, backoff_max=10)
    assert decide(attempt, 1, policy).status == "pending"


@pytest.mark.parametrize("fault", [{"mode": "drop"}, {"mode": "slow", "slow_ms": 3000}])
def test_an_answer_lost_after_sending_is_unknown(fake_twilio, fault):
    fake_twilio.set_faults([fault])
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "hello"))
    [received] = fake_twilio.messages()
    assert received["accepted"] and received["fault"] == fault["mode"]
    assert attempt.request_sent and attempt.http_status is None
    decision = decide(attempt, 1, RetryPolicy(5, 1, 10))
    assert decision.status == "processing"


def test_too_many_requests_carries_retry_after(fake_twilio):
    fake_twilio.set_fault("429", retry_after=7)
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "hello"))
    assert attempt.http_status == 429 and attempt.error_code == 20429
    assert attempt.retry_after == 7.0


def test_retry_after_may_be_an_http_date():
    later = datetime.now(timezone.utc) + timedelta(seconds=30)
    assert 25 <= _seconds_of_retry_after(format_datetime(later, usegmt=True)) <= 30
    assert _seconds_of_retry_after("3") == 3.0
    assert _seconds_of_retry_after("soon") is None


def test_hosted_media_needs_a_public_url(fake_twilio):
    with pytest.raises(MissingPublicUrl):
        sender_for(fake_twilio).send(Outgoing(TO, FROM, "label", media_token="abc"))
    assert fake_twilio.messages() == []


def test_find_sent_matches_recipient_body_and_sender_even_while_queued(fake_twilio):
    fake_twilio.configure(send_delay_ms=60_000)  # still queued: no DateSent yet
    twilio = sender_for(fake_twilio)
    since = datetime.now(timezone.utc)
    sent = twilio.send(Outgoing(TO, FROM, "your code is 1"))
    twilio.send(Outgoing(TO, FROM, "your code is 2"))
    twilio.send(Outgoing(TO, "+15017122661", "your code is 1"))
    twilio.send(Outgoing("+14155550100", FROM, "your code is 1"))
    [found] = twilio.find_sent(Outgoing(TO, FROM, "your code is 1"), since)
    assert found.sid == sent.sid and found.segments == 1
    assert twilio.find_sent(Outgoing(TO, FROM, "never sent"), since) == []


def test_find_sent_through_a_messaging_service(fake_twilio):
    service = "MG" + "2" * 32
    twilio = sender_for(fake_twilio)
    sent = twilio.send(Outgoing(TO, service, "via the service"))
    [received] = fake_twilio.messages()
    assert received["messaging_service_sid"] == service and received["from"] is None
    found = twilio.find_sent(Outgoing(TO, service, "via the service"),
                             datetime.now(timezone.utc) - timedelta(seconds=5))
    assert [f.sid for f in found] == [sent.sid]


def test_without_credentials_it_uses_the_ones_the_fake_accepts(fake_twilio):
    settings = Settings(_env_file=None, twilio_api_url=AnyHttpUrl(fake_twilio.url))
    attempt = TwilioSender(settings, pool_size=1).send(Outgoing(TO, FROM, "sandbox"))
    assert attempt.http_status == 201
