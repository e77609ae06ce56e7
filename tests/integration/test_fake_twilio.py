"""`smsq fake-twilio`, driven by the official twilio client as smsq's dispatcher drives Twilio."""

from __future__ import annotations

import http.client
import json
import logging
import re
import signal
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from requests.adapters import HTTPAdapter
from twilio.base.exceptions import TwilioException, TwilioRestException
from twilio.http.http_client import TwilioHttpClient
from twilio.request_validator import RequestValidator
from twilio.rest import Client

from consumer.sandbox import (
    FAKE_ACCOUNT_SID,
    UNDELIVERABLE_TO,
    FakeTwilio,
    FakeTwilioControl,
    FaultError,
    FaultRule,
    spawn,
)
from tests.support import wait_until

TWILIO_API_URL = "https://api.twilio.com"
TO = "+14155550123"
FROM = "+15005550006"


class FakeBaseUrlHttpClient(TwilioHttpClient):
    """The official client's HTTP layer, sent to the fake (see notes/twilio-base-url.md)."""

    def __init__(self, base_url: str, read_timeout: float = 5) -> None:
        super().__init__(pool_connections=True)
        self.timeout = (2, read_timeout)
        self.base_url = base_url
        adapter = HTTPAdapter(pool_maxsize=20, max_retries=0)
        self.session.mount("http://", adapter)

    def request(self, method, url, *args, **kwargs):
        return super().request(method, url.replace(TWILIO_API_URL, self.base_url, 1),
                               *args, **kwargs)


def client_for(fake: FakeTwilioControl, read_timeout: float = 5,
               auth_token: str | None = None) -> Client:
    return Client(fake.account_sid, auth_token or fake.auth_token,
                  http_client=FakeBaseUrlHttpClient(fake.url, read_timeout))


@pytest.fixture
def client(fake_twilio: FakeTwilioControl) -> Client:
    return client_for(fake_twilio)


def raw_create(fake: FakeTwilioControl, form: dict) -> requests.Response:
    return requests.post(f"{fake.url}/2010-04-01/Accounts/{fake.account_sid}/Messages.json",
                         data=form, auth=(fake.account_sid, fake.auth_token), timeout=5)


# --- create, fetch, list ---------------------------------------------------------------------

def test_create_answers_201_with_a_twilio_shaped_message(fake_twilio: FakeTwilioControl) -> None:
    response = raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "a" * 161,
                                        "MediaUrl": ["https://example.com/a.png",
                                                     "https://example.com/b.png"]})
    assert response.status_code == 201
    message = response.json()
    assert re.fullmatch(r"MM[0-9a-f]{32}", message["sid"])  # with media: an MMS
    assert message["status"] == "queued" and message["date_sent"] is None
    assert message | {"sid": "", "date_created": "", "date_updated": ""} == {
        "account_sid": fake_twilio.account_sid, "api_version": "2010-04-01", "body": "a" * 161,
        "date_created": "", "date_sent": None, "date_updated": "", "direction": "outbound-api",
        "error_code": None, "error_message": None, "fake_fault": None, "from": FROM,
        "messaging_service_sid": None,
        "num_media": "2", "num_segments": "2", "price": None, "price_unit": "USD", "sid": "",
        "status": "queued", "to": TO,
        "subresource_uris": {
            "media": f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages/"
                     f"{message['sid']}/Media.json",
            "feedback": f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages/"
                        f"{message['sid']}/Feedback.json"},
        "uri": f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages/{message['sid']}.json",
    }
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d \+0000", message["date_created"])


def test_sids_are_shaped_as_twilios(client: Client) -> None:
    assert re.fullmatch(r"AC[0-9a-f]{32}", FAKE_ACCOUNT_SID)
    sms = client.messages.create(to=TO, from_=FROM, body="text only")
    mms = client.messages.create(to=TO, from_=FROM, body="with a picture",
                                 media_url=["https://example.com/a.png"])
    assert re.fullmatch(r"SM[0-9a-f]{32}", sms.sid)
    assert re.fullmatch(r"MM[0-9a-f]{32}", mms.sid)
    assert sms.account_sid == mms.account_sid == FAKE_ACCOUNT_SID
    assert client.messages(mms.sid).fetch().num_media == "1"


def test_official_client_creates_and_fetches(client: Client, fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.configure(send_delay_ms=50, deliver_delay_ms=50)
    before = datetime.now(timezone.utc).replace(microsecond=0)
    created = client.messages.create(to=TO, from_=FROM, body="Your code is 123456 €")
    assert created.status == "queued"
    assert created.num_segments == "1"
    assert before <= created.date_created <= datetime.now(timezone.utc)
    wait_until(lambda: client.messages(created.sid).fetch().status == "delivered",
               message="the message to move on from queued")
    fetched = client.messages(created.sid).fetch()
    assert (fetched.to, fetched.from_, fetched.body) == (TO, FROM, "Your code is 123456 €")
    assert fetched.date_sent is not None


def test_messaging_service_messages_are_accepted_without_a_sender_yet(client: Client) -> None:
    created = client.messages.create(to=TO, messaging_service_sid="MG" + "1" * 32, body="hi")
    assert (created.status, created.from_, created.num_segments) == ("accepted", None, "0")
    assert created.messaging_service_sid == "MG" + "1" * 32


def test_fetching_an_unknown_sid_raises_404(client: Client) -> None:
    with pytest.raises(TwilioRestException) as raised:
        client.messages("SM" + "0" * 32).fetch()
    assert (raised.value.status, raised.value.code) == (404, 20404)


def test_list_filters_by_to_newest_first_across_pages(client: Client,
                                                      fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.configure(send_delay_ms=0)
    for n in range(5):
        client.messages.create(to=TO, from_=FROM, body=f"mine {n}")
    client.messages.create(to="+14155550999", from_=FROM, body="someone else's")
    listed = client.messages.list(to=TO, page_size=2)  # three pages, followed by the client
    assert [m.body for m in listed] == [f"mine {n}" for n in (4, 3, 2, 1, 0)]
    assert [m.body for m in client.messages.list(to=TO, limit=3)] == ["mine 4", "mine 3", "mine 2"]
    assert len(client.messages.list(from_=FROM)) == 6
    assert fake_twilio.stats()["list"] >= 3 + 1 + 1


def test_list_by_date_sent_compares_days_and_skips_messages_not_sent_yet(
        client: Client, fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.configure(send_delay_ms=60_000)
    client.messages.create(to=TO, from_=FROM, body="still queued")
    fake_twilio.configure(send_delay_ms=0)
    client.messages.create(to=TO, from_=FROM, body="sent")
    now = datetime.now(timezone.utc)
    today, day = now.date(), timedelta(days=1)

    def bodies(**filters: object) -> list[str]:
        return [m.body for m in client.messages.list(to=TO, **filters)]

    assert bodies() == ["sent", "still queued"]
    # twilio-python sends datetimes; Twilio (and the fake) look at their day only
    assert bodies(date_sent_after=now + timedelta(minutes=1)) == ["sent"]
    assert bodies(date_sent_after=now - day) == ["sent"]
    assert bodies(date_sent_after=now + day) == []
    assert bodies(date_sent_before=now) == ["sent"]
    assert bodies(date_sent_before=now - day) == []
    assert bodies(date_sent=today.isoformat()) == ["sent"]
    assert bodies(date_sent=(today - day).isoformat()) == []


def test_date_sent_filters_take_a_date_or_a_datetime_and_compare_gmt_days(
        fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.configure(send_delay_ms=0)
    raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "sent"})
    fake_twilio.set_fault("fail-30001", count=1)
    raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "failed"})
    fake_twilio.configure(send_delay_ms=60_000)
    raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "queued"})
    sent_at = datetime.fromtimestamp(fake_twilio.messages()[0]["sent_at"], timezone.utc)
    day = timedelta(days=1)
    east, west = timezone(timedelta(hours=14)), timezone(timedelta(hours=-12))

    def bodies(**filters: str) -> list[str]:
        response = requests.get(
            f"{fake_twilio.url}/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json",
            params={"To": TO, **filters}, auth=(fake_twilio.account_sid, fake_twilio.auth_token),
            timeout=5)
        assert response.status_code == 200, response.text
        return [message["body"] for message in response.json()["messages"]]

    assert bodies() == ["queued", "failed", "sent"]  # newest first, queued and failed too
    # The same GMT day, written as a date, as twilio-python's datetimes, and in other zones
    # whose calendar shows another day: only the message with a date_sent matches.
    for value in (sent_at.date().isoformat(), sent_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                  sent_at.replace(tzinfo=None).isoformat(), sent_at.astimezone(east).isoformat(),
                  sent_at.astimezone(west).isoformat()):
        assert bodies(DateSent=value) == ["sent"], value
        assert bodies(**{"DateSent>": value}) == ["sent"], value
        assert bodies(**{"DateSent<": value}) == ["sent"], value
    for value in ((sent_at + day).date().isoformat(), (sent_at + day).isoformat(),
                  (sent_at + day).astimezone(west).isoformat()):
        assert bodies(DateSent=value) == [], value
        assert bodies(**{"DateSent>": value}) == [], value
        assert bodies(**{"DateSent<": value}) == ["sent"], value
    assert bodies(**{"DateSent<": (sent_at - day).isoformat()}) == []
    response = requests.get(
        f"{fake_twilio.url}/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json",
        params={"DateSent": "yesterday"}, auth=(fake_twilio.account_sid, fake_twilio.auth_token),
        timeout=5)
    assert (response.status_code, response.json()["code"]) == (400, 20001)


# --- errors ------------------------------------------------------------------------------

@pytest.mark.parametrize(("form", "code"), [
    ({"From": FROM, "Body": "x"}, 21604),
    ({"To": TO, "Body": "x"}, 21603),
    ({"To": TO, "From": FROM}, 21602),
    ({"To": TO, "From": FROM, "Body": "x" * 1601}, 21617),
    ({"To": "not-a-number", "From": FROM, "Body": "x"}, 21211),
    ({"To": "+15005550001", "From": FROM, "Body": "x"}, 21211),
    ({"To": "+15005550002", "From": FROM, "Body": "x"}, 21612),
    ({"To": "+15005550003", "From": FROM, "Body": "x"}, 21408),
    ({"To": "+15005550004", "From": FROM, "Body": "x"}, 21610),
    ({"To": "+15005550009", "From": FROM, "Body": "x"}, 21614),
    ({"To": TO, "From": "+15005550001", "Body": "x"}, 21212),
    ({"To": TO, "From": "+15005550008", "Body": "x"}, 21611),
])
def test_invalid_requests_get_twilios_legacy_error_body(fake_twilio: FakeTwilioControl,
                                                        form: dict, code: int) -> None:
    response = raw_create(fake_twilio, form)
    assert response.status_code == 400
    error = response.json()
    assert set(error) == {"code", "message", "more_info", "status"}
    assert (error["code"], error["status"]) == (code, 400)
    assert error["more_info"] == f"https://www.twilio.com/docs/errors/{code}"
    expected = {"accepted": False, "http_status": 400, "error_code": code, "sid": None}
    assert expected.items() <= fake_twilio.messages()[-1].items()


def test_media_without_body_is_an_mms(fake_twilio: FakeTwilioControl) -> None:
    response = raw_create(fake_twilio, {"To": TO, "From": FROM,
                                        "MediaUrl": "https://example.com/a.png"})
    assert response.status_code == 201
    assert response.json()["num_media"] == "1"


def test_magic_numbers_raise_twilio_rest_exception_through_the_client(client: Client) -> None:
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to="+15005550009", from_=FROM, body="x")
    assert (raised.value.status, raised.value.code) == (400, 21614)
    assert "not a valid mobile number" in raised.value.msg


@pytest.mark.parametrize("auth", [("ACwrong", "fake-token"), ("right-sid", "wrong-token"), None])
def test_bad_credentials_get_401_20003(fake_twilio: FakeTwilioControl, auth) -> None:
    if auth and auth[0] == "right-sid":
        auth = (fake_twilio.account_sid, auth[1])
    response = requests.post(
        f"{fake_twilio.url}/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json",
        data={"To": TO, "From": FROM, "Body": "x"}, auth=auth, timeout=5)
    assert response.status_code == 401
    assert response.json()["code"] == 20003
    assert fake_twilio.messages() == []


def test_bad_credentials_through_the_client(fake_twilio: FakeTwilioControl) -> None:
    with pytest.raises(TwilioRestException) as raised:
        client_for(fake_twilio, auth_token="wrong").messages.create(to=TO, from_=FROM, body="x")
    assert (raised.value.status, raised.value.code) == (401, 20003)


# --- faults ------------------------------------------------------------------------------

def test_429_fault_with_retry_after_for_the_next_n_requests(client: Client,
                                                           fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("429", count=2, retry_after=7)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as raised:
            client.messages.create(to=TO, from_=FROM, body="x")
        assert (raised.value.status, raised.value.code) == (429, 20429)
        assert client.http_client._test_only_last_response.headers["Retry-After"] == "7"
    assert client.messages.create(to=TO, from_=FROM, body="x").status == "queued"
    assert fake_twilio.faults() == []  # used up
    outcomes = [(m["http_status"], m["error_code"], m["fault"]) for m in fake_twilio.messages()]
    assert outcomes == [(429, 20429, "429"), (429, 20429, "429"), (201, None, None)]


@pytest.mark.parametrize(("mode", "status", "code"), [("500", 500, 20500), ("503", 503, 20503),
                                                      ("21611", 400, 21611)])
def test_error_faults(client: Client, fake_twilio: FakeTwilioControl, mode: str, status: int,
                      code: int) -> None:
    fake_twilio.set_fault(mode, count=1)
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to=TO, from_=FROM, body="x")
    assert (raised.value.status, raised.value.code) == (status, code)
    assert client.messages.list(to=TO) == []  # not accepted


@pytest.mark.parametrize(("mode", "status", "code", "json_body"), [
    ("created-500", 500, 20500, True), ("created-503", 503, 20503, True),
    ("created-502", 502, 502, False), ("created-504", 504, 504, False)])
def test_created_5xx_faults_create_the_message_and_answer_an_error(
        client: Client, fake_twilio: FakeTwilioControl, callback_receiver: CallbackReceiver,
        mode: str, status: int, code: int, json_body: bool) -> None:
    fake_twilio.configure(send_delay_ms=0, deliver_delay_ms=0)
    fake_twilio.set_fault(mode, count=1)
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to=TO, from_=FROM, body="created anyway",
                               status_callback=callback_receiver.url)
    assert (raised.value.status, raised.value.code) == (status, code)
    answer = client.http_client._test_only_last_response
    if json_body:  # Twilio's own error body
        assert answer.headers["Content-Type"].startswith("application/json")
    else:  # a proxy's page
        assert answer.headers["Content-Type"].startswith("text/html")
        assert f"<title>{status} " in answer.text
    [logged] = fake_twilio.messages()
    assert (logged["accepted"], logged["http_status"], logged["fault"]) == (True, status, mode)
    [listed] = client.messages.list(to=TO)
    assert (listed.sid, listed.body) == (logged["sid"], "created anyway")
    assert client.messages(listed.sid).fetch().status == "delivered"
    assert requests.get(f"{fake_twilio.url}/2010-04-01/Accounts/{fake_twilio.account_sid}/"
                        f"Messages/{listed.sid}.json", auth=(fake_twilio.account_sid,
                        fake_twilio.auth_token), timeout=5).json()["fake_fault"] == mode
    wait_until(lambda: len(callback_receiver.received) == 2, message="its status callbacks")
    assert fake_twilio.stats()[f"fault_{mode}"] == 1


@pytest.mark.parametrize("status", [502, 504])
def test_proxy_errors_without_creation(client: Client, fake_twilio: FakeTwilioControl,
                                       status: int) -> None:
    fake_twilio.set_fault(str(status), count=1)
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to=TO, from_=FROM, body="lost at the proxy")
    assert raised.value.status == status
    assert client.http_client._test_only_last_response.headers["Content-Type"].startswith(
        "text/html")
    assert client.messages.list(to=TO) == []
    assert fake_twilio.messages()[0]["accepted"] is False


def test_hold_keeps_the_message_queued_without_date_sent_then_sends_it(
        client: Client, fake_twilio: FakeTwilioControl,
        callback_receiver: CallbackReceiver) -> None:
    fake_twilio.configure(send_delay_ms=0, deliver_delay_ms=0)
    fake_twilio.set_fault("hold", count=1, hold_ms=1500)
    held = client.messages.create(to=TO, from_=FROM, body="held",
                                  status_callback=callback_receiver.url)
    other = client.messages.create(to=TO, from_=FROM, body="not held",
                                   status_callback=callback_receiver.url)
    assert held.status == "queued"
    fetched = client.messages(held.sid).fetch()
    assert (fetched.status, fetched.date_sent) == ("queued", None)
    assert client.messages(other.sid).fetch().status == "delivered"
    today = datetime.now(timezone.utc).date().isoformat()
    assert [m.body for m in client.messages.list(to=TO, date_sent=today)] == ["not held"]
    assert [m.body for m in client.messages.list(to=TO)] == ["not held", "held"]
    wait_until(lambda: client.messages(held.sid).fetch().status == "delivered",
               message="the held message to be sent")
    wait_until(lambda: len(callback_receiver.received) == 4, message="four callbacks")
    [logged, _] = fake_twilio.messages()
    assert (logged["fault"], logged["sent_at"]) == ("hold", pytest.approx(
        logged["received_at"] + 1.5))
    held_callbacks = [c for c in fake_twilio.callbacks() if c["sid"] == held.sid]
    assert [c["status"] for c in held_callbacks] == ["sent", "delivered"]
    assert all(c["posted_at"] >= logged["received_at"] + 1.5 for c in held_callbacks)


@pytest.mark.parametrize(("mode", "status", "code", "message"), [
    ("20003", 401, 20003, "Authenticate"),
    ("20404", 404, 20404, "was not found"),
    ("63038", 429, 63038, "Account exceeded the daily messages limit")])
def test_account_wide_errors_create_nothing(client: Client, fake_twilio: FakeTwilioControl,
                                            mode: str, status: int, code: int,
                                            message: str) -> None:
    fake_twilio.set_fault(mode, count=2)
    for _ in range(2):
        with pytest.raises(TwilioRestException) as raised:
            client.messages.create(to=TO, from_=FROM, body="x")
        assert (raised.value.status, raised.value.code) == (status, code)
        assert message in raised.value.msg
    assert [(m["accepted"], m["fault"]) for m in fake_twilio.messages()] == [(False, mode)] * 2
    assert client.messages.list(to=TO) == []
    assert client.messages.create(to=TO, from_=FROM, body="x").status == "queued"


def test_an_account_wide_fault_for_a_while_answers_every_request(
        client: Client, fake_twilio: FakeTwilioControl) -> None:
    sent = client.messages.create(to=TO, from_=FROM, body="before")
    fake_twilio.set_fault("20003", seconds=1.5)
    [rule] = fake_twilio.faults()
    assert rule["expires_at"] == pytest.approx(time.time() + 1.5, abs=1)
    for request in (lambda: client.messages.create(to=TO, from_=FROM, body="during"),
                    lambda: client.messages.list(to=TO),
                    lambda: client.messages(sent.sid).fetch()):
        with pytest.raises(TwilioException):
            request()
        answer = client.http_client._test_only_last_response
        assert (answer.status_code, json.loads(answer.text)["code"]) == (401, 20003)
    assert fake_twilio.stats()["fault_20003"] == 3
    wait_until(lambda: fake_twilio.faults() == [], message="the fault to end")
    assert client.messages.create(to=TO, from_=FROM, body="after").status == "queued"
    assert [m.body for m in client.messages.list(to=TO)] == ["after", "before"]


def test_seconds_ends_a_rule_whatever_its_count(fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_faults([{"mode": "63038", "count": 1000, "seconds": 0.5},
                            {"mode": "20003", "to": "+14155550111", "seconds": 0.5}])
    assert raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "x"}).status_code == 429
    wait_until(lambda: fake_twilio.faults() == [], message="the rules to end")
    assert raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "x"}).status_code == 201


@pytest.mark.parametrize(("mode", "code", "error_message"), [
    ("fail-30001", 30001, "Queue overflow"),
    ("fail-30022", 30022, "US A2P 10DLC - Rate Limits Exceeded")])
def test_fail_faults_accept_then_fail_the_message(
        client: Client, fake_twilio: FakeTwilioControl, callback_receiver: CallbackReceiver,
        mode: str, code: int, error_message: str) -> None:
    fake_twilio.configure(send_delay_ms=50, deliver_delay_ms=0)
    fake_twilio.set_fault(mode, count=1)
    created = client.messages.create(to=TO, from_=FROM, body="dropped by Twilio",
                                     status_callback=callback_receiver.url)
    assert (created.status, created.error_code) == ("queued", None)
    wait_until(lambda: client.messages(created.sid).fetch().status == "failed",
               message="the message to fail")
    fetched = client.messages(created.sid).fetch()
    assert (fetched.error_code, fetched.error_message, fetched.date_sent) == (
        code, error_message, None)
    [listed] = client.messages.list(to=TO)
    assert (listed.status, listed.error_code, listed.error_message) == (
        "failed", code, error_message)
    wait_until(lambda: callback_receiver.received, message="the failed callback")
    [(_, form, _)] = callback_receiver.received  # no `sent` callback: it never left Twilio
    assert (form["MessageStatus"], form["ErrorCode"]) == ("failed", str(code))
    [logged] = fake_twilio.messages()
    assert (logged["fault"], logged["status"], logged["final_error_code"]) == (mode, "failed", code)


def test_faults_can_target_one_recipient_or_sender(client: Client,
                                                   fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_faults([{"mode": "500", "to": "+14155550111"},
                            {"mode": "429", "sender": "+15005550010"}])
    assert client.messages.create(to=TO, from_=FROM, body="x").sid
    with pytest.raises(TwilioRestException, match="internal server error"):
        client.messages.create(to="+14155550111", from_=FROM, body="x")
    with pytest.raises(TwilioRestException) as raised:
        client.messages.create(to=TO, from_="+15005550010", body="x")
    assert raised.value.status == 429
    assert len(fake_twilio.faults()) == 2  # no count: they stay


def test_drop_fault_accepts_the_message_then_closes_the_connection_without_answer(
        fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("drop", count=1)
    form = b"To=%2B14155550123&From=%2B15005550006&Body=dropped"
    address = urlsplit(fake_twilio.url)
    with socket.create_connection((address.hostname, address.port), timeout=5) as sock:
        auth = requests.auth._basic_auth_str(fake_twilio.account_sid, fake_twilio.auth_token)
        sock.sendall(
            f"POST /2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json HTTP/1.1\r\n"
            f"Host: x\r\nAuthorization: {auth}\r\n"
            f"Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(form)}\r\n\r\n".encode() + form)
        assert sock.recv(1024) == b""  # end of stream, not a single byte of answer
    [received] = fake_twilio.messages()
    assert received["accepted"] and received["fault"] == "drop"
    assert received["http_status"] is None and received["body"] == "dropped"


def test_drop_through_the_client_is_a_lost_answer_for_an_existing_message(
        client: Client, fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("drop", count=1)
    with pytest.raises(requests.ConnectionError, match="without response"):
        client.messages.create(to=TO, from_=FROM, body="lost answer")
    assert [m.body for m in client.messages.list(to=TO)] == ["lost answer"]


def test_drop_unrecorded_loses_the_message_too(client: Client,
                                               fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("drop-unrecorded", count=1)
    with pytest.raises(requests.ConnectionError):
        client.messages.create(to=TO, from_=FROM, body="never arrived")
    assert client.messages.list(to=TO) == []
    assert fake_twilio.messages()[0]["fault"] == "drop-unrecorded"


def test_slow_fault_answers_after_the_clients_read_timeout(fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("slow", count=1, slow_ms=1500)
    impatient = client_for(fake_twilio, read_timeout=0.2)
    with pytest.raises(requests.exceptions.ReadTimeout):
        impatient.messages.create(to=TO, from_=FROM, body="slow")
    [received] = fake_twilio.messages(accepted_only=True)
    assert received["http_status"] == 201 and received["fault"] == "slow"


def test_probability_fault_hits_some_requests(fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_fault("500", probability=0.5)
    statuses = [raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": "x"}).status_code
                for _ in range(60)]
    assert set(statuses) == {201, 500}  # (0.5**60 chance of a false failure)


def test_control_api_rejects_nonsense(fake_twilio: FakeTwilioControl) -> None:
    for bad in ({"mode": "teapot"}, {"mode": "429", "count": 0}, {"mode": "429", "colour": 1}):
        response = requests.post(f"{fake_twilio.url}/_fake/faults", json=bad, timeout=5)
        assert response.status_code == 400
    for bad in ({"speed": 1}, {"callback_duplicates": 2}, {"callback_reorder": "yes"}):
        response = requests.post(f"{fake_twilio.url}/_fake/config", json=bad, timeout=5)
        assert response.status_code == 400, bad


def test_fault_flag_syntax() -> None:
    assert FaultRule.parse("429:count=3,retry_after=2.5") == FaultRule(
        "429", count=3, retry_after=2.5)
    assert FaultRule.parse("drop") == FaultRule("drop")
    assert FaultRule.parse("500:probability=0.1,to=+14155550123") == FaultRule(
        "500", probability=0.1, to="+14155550123")
    assert FaultRule.parse("20003:seconds=60") == FaultRule("20003", seconds=60)
    assert FaultRule.parse("hold:hold_ms=5000,count=2") == FaultRule("hold", hold_ms=5000, count=2)
    assert FaultRule.parse("fail-30001:sender=MG" + "1" * 32) == FaultRule(
        "fail-30001", sender="MG" + "1" * 32)
    for bad in ("teapot", "429:count", "429:count=0", "429:probability=2", "slow:speed=1",
                "20003:seconds=0", "hold:expires_at=1", "hold:hold_ms=-1"):
        with pytest.raises(FaultError):
            FaultRule.parse(bad)


# --- latency, concurrency, keep-alive -----------------------------------------------------

def test_latency_with_jitter_stays_in_its_range_and_varies() -> None:
    fake = FakeTwilio(latency_ms=100, jitter_ms=50)
    samples = [fake.latency() for _ in range(100)]
    assert all(0.1 <= sample <= 0.15 for sample in samples)
    assert len(set(samples)) > 1
    assert FakeTwilio(latency_ms=200).latency() == 0.2


def test_latency_is_added_and_requests_are_served_concurrently(
        fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.set_latency(500)
    answered: list[float] = []
    barrier = threading.Barrier(10)

    def send(n: int) -> None:
        barrier.wait()
        started = time.monotonic()
        assert raw_create(fake_twilio, {"To": TO, "From": FROM, "Body": str(n)}).status_code == 201
        answered.append(time.monotonic())
        assert answered[-1] - started >= 0.5  # the latency is really added

    threads = [threading.Thread(target=send, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    received = [m["received_monotonic"] for m in fake_twilio.messages()]
    assert len(received) == 10
    # All ten were received before the first answer went out: served in parallel, not in turn.
    assert max(received) < min(answered)


def test_connections_are_kept_alive(fake_twilio: FakeTwilioControl) -> None:
    connection = http.client.HTTPConnection(urlsplit(fake_twilio.url).netloc, timeout=5)
    auth = requests.auth._basic_auth_str(fake_twilio.account_sid, fake_twilio.auth_token)
    path = f"/2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json"
    sockets = []
    for n in range(3):
        connection.request("POST", path, body=f"To=%2B14155550123&From=%2B15005550006&Body={n}",
                           headers={"Authorization": auth,
                                    "Content-Type": "application/x-www-form-urlencoded"})
        response = connection.getresponse()
        assert response.status == 201
        response.read()
        sockets.append(connection.sock)
    assert sockets[0] is not None and sockets.count(sockets[0]) == 3
    connection.close()


def test_arrival_is_when_the_first_packet_came_not_when_python_read_it(
        fake_twilio: FakeTwilioControl) -> None:
    """The request's head goes first, its body half a second later: the arrival recorded is
    the head's, stamped by the kernel, as Twilio's clock would see a request leave."""
    auth = requests.auth._basic_auth_str(fake_twilio.account_sid, fake_twilio.auth_token)
    body = b"To=%2B14155550123&From=%2B15005550006&Body=split"
    head = (f"POST /2010-04-01/Accounts/{fake_twilio.account_sid}/Messages.json HTTP/1.1\r\n"
            f"Host: fake\r\nAuthorization: {auth}\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(urlsplit(fake_twilio.url).netloc.split(":"), timeout=5) as sock:
        head_sent = time.monotonic()
        sock.sendall(head)
        time.sleep(0.5)
        body_sent = time.monotonic()
        sock.sendall(body)
        assert sock.recv(100).startswith(b"HTTP/1.1 201")
    (message,) = fake_twilio.messages()
    # 1 ms for converting the kernel's wall-clock stamp to the monotonic clock.
    assert head_sent - 0.001 <= message["received_monotonic"] < body_sent


def test_a_client_that_resets_its_connection_is_logged_quietly(
        fake_twilio: FakeTwilioControl, caplog: pytest.LogCaptureFixture) -> None:
    """A dispatcher killed mid-request resets its connections: one debug line each, no
    traceback on the sandbox's stderr."""
    caplog.set_level("DEBUG", logger="consumer.sandbox.http")
    sock = socket.create_connection(urlsplit(fake_twilio.url).netloc.split(":"), timeout=5)
    sock.sendall(b"POST /2010-04-01/Accounts/x/Messages.json HTTP/1.1\r\n")  # half a head
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()  # with linger 0: a reset, not a FIN
    wait_until(lambda: any(getattr(r, "action", None) == "fake_client_gone"
                           for r in caplog.records))
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


# --- status callbacks ----------------------------------------------------------------------

class CallbackReceiver:
    """A stand-in for `smsq serve`'s /twilio/status: records each POST."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict[str, str], str]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                receiver.received.append((self.path, form, self.headers["X-Twilio-Signature"]))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/twilio/status"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True).start()


@pytest.fixture
def callback_receiver() -> Iterator[CallbackReceiver]:
    receiver = CallbackReceiver()
    yield receiver
    receiver.server.shutdown()
    receiver.server.server_close()


@pytest.mark.parametrize(("to", "final", "error_code"), [(TO, "delivered", None),
                                                         (UNDELIVERABLE_TO, "undelivered", "30003")])
def test_signed_status_callbacks_sent_then_final(client: Client, fake_twilio: FakeTwilioControl,
                                                 callback_receiver: CallbackReceiver, to: str,
                                                 final: str, error_code: str | None) -> None:
    fake_twilio.configure(send_delay_ms=20, deliver_delay_ms=50)
    query = f"?n={uuid.uuid4()}&x=a%2Bb"
    message = client.messages.create(to=to, from_=FROM, body="hi",
                                     status_callback=callback_receiver.url + query)
    wait_until(lambda: len(callback_receiver.received) == 2, timeout=10,
               message="two status callbacks")
    validator = RequestValidator(fake_twilio.auth_token)
    statuses = []
    for path, form, signature in callback_receiver.received:
        assert path == "/twilio/status" + query  # the URL as given, query string and all
        assert validator.validate(callback_receiver.url + query, form, signature)
        assert not validator.validate(callback_receiver.url, form, signature)
        assert not RequestValidator("another-token").validate(
            callback_receiver.url + query, form, signature)
        expected = {"MessageSid": message.sid, "SmsSid": message.sid, "To": to, "From": FROM,
                    "AccountSid": fake_twilio.account_sid, "ApiVersion": "2010-04-01",
                    "SmsStatus": form["MessageStatus"]}
        assert expected.items() <= form.items()
        assert form.get("ErrorCode") == (error_code if form["MessageStatus"] == final else None)
        statuses.append(form["MessageStatus"])
    assert statuses == ["sent", final]
    fetched = client.messages(message.sid).fetch()
    assert fetched.status == final
    assert (fetched.error_code, fetched.error_message) == (
        (30003, "Unreachable destination handset") if error_code else (None, None))
    wait_until(lambda: fake_twilio.stats().get("callbacks_ok") == 2, message="callback log")
    assert [c["status"] for c in fake_twilio.callbacks()] == ["sent", final]


@pytest.mark.parametrize(("settings", "expected"), [
    ({"callback_duplicates": 1}, ["sent", "sent", "delivered", "delivered"]),
    ({"callback_reorder": 1}, ["delivered", "sent"]),
    ({"callback_duplicates": 1, "callback_reorder": 1},
     ["delivered", "delivered", "sent", "sent"]),
])
def test_duplicate_and_reordered_callbacks(client: Client, fake_twilio: FakeTwilioControl,
                                           callback_receiver: CallbackReceiver, settings: dict,
                                           expected: list[str]) -> None:
    fake_twilio.configure(send_delay_ms=20, deliver_delay_ms=50, **settings)
    message = client.messages.create(to=TO, from_=FROM, body="hi",
                                     status_callback=callback_receiver.url)
    wait_until(lambda: fake_twilio.stats()["callbacks_waiting"] == 0
               and len(callback_receiver.received) == len(expected),
               message="every status callback")
    validator = RequestValidator(fake_twilio.auth_token)
    assert [form["MessageStatus"] for _, form, _ in callback_receiver.received] == expected
    for _, form, signature in callback_receiver.received:
        assert form["MessageSid"] == message.sid
        assert validator.validate(callback_receiver.url, form, signature)
    wait_until(lambda: fake_twilio.stats()["callbacks_ok"] == len(expected), message="the log")


# --- the command ---------------------------------------------------------------------------

def test_command_runs_on_a_free_port_with_faults_and_stops_on_sigterm() -> None:
    process, fake = spawn("--fault", "500:count=1", "--latency-ms", "1")
    try:
        client = client_for(fake)
        with pytest.raises(TwilioRestException) as raised:
            client.messages.create(to=TO, from_=FROM, body="x")
        assert raised.value.status == 500
        assert client.messages.create(to=TO, from_=FROM, body="x").status == "queued"
        assert [m["http_status"] for m in fake.messages()] == [500, 201]
        first, second = fake.messages()
        assert [m["sid"] for m in fake.messages(after=first["seq"])] == [second["sid"]]
        assert fake.messages(after=second["seq"]) == []
        fake.clear()
        assert fake.messages() == []
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_command_flags_for_created_faults_and_callbacks() -> None:
    process, fake = spawn("--fault", "created-503:count=1", "--callback-reorder")
    try:
        config = fake.configure()
        assert (config["callback_reorder"], config["callback_duplicates"]) == (1, 0)
        client = client_for(fake)
        with pytest.raises(TwilioRestException) as raised:
            client.messages.create(to=TO, from_=FROM, body="x")
        assert (raised.value.status, raised.value.code) == (503, 20503)
        assert [m.sid for m in client.messages.list(to=TO)] == [fake.messages()[0]["sid"]]
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0


def test_command_rejects_a_bad_fault_with_exit_2(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(RuntimeError, match="exit status 2"):
        spawn("--fault", "teapot")
    assert "unknown fault mode 'teapot'" in capfd.readouterr().err


def test_the_price_is_filled_in_some_time_after_sending_and_failures_cost_nothing(
        client: Client, fake_twilio: FakeTwilioControl) -> None:
    fake_twilio.configure(send_delay_ms=0, price_delay_ms=700)
    fake_twilio.set_faults([{"mode": "fail-30001", "to": "+14155550124"}])
    sent = client.messages.create(to="+14155550123", from_="+15005550006", body="x" * 200)
    failed = client.messages.create(to="+14155550124", from_="+15005550006", body="dropped")
    assert sent.price is None and sent.price_unit == "USD"
    wait_until(lambda: client.messages(sent.sid).fetch().price is not None, timeout=5,
               message="the price filled in")
    assert client.messages(sent.sid).fetch().price == "-0.01580"  # two segments
    assert client.messages(failed.sid).fetch().price is None
