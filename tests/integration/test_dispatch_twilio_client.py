"""The Twilio adapter against the fake over HTTP: what went out, and how each failure is read."""

from __future__ import annotations

import base64
import select
import socket
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from email.utils import format_datetime
from types import SimpleNamespace

import pytest
from pydantic import AnyHttpUrl, SecretStr

from consumer.dispatch.outcomes import RetryPolicy, decide
from consumer.dispatch.twilio_client import (
    CLOCK_SLACK,
    KEEPALIVE_EXPIRY_SECONDS,
    MAX_VALIDITY_SECONDS,
    TRIAL_PREFIX,
    MissingPublicUrl,
    Outgoing,
    TwilioSender,
    _departure,
    _Leaving,
    _seconds_of_retry_after,
    _StampedHTTPConnection,
    validity_period,
)
from consumer.settings import Settings
from tests.dispatch_support import (
    add_notifications,
    dispatch_settings,
    running_dispatcher,
    statuses,
)
from tests.support import wait_until

FROM = "+15005550006"
TO = "+14155550123"


class RecordingSender(TwilioSender):
    """Keeps every request the twilio library built (method, params, form), to check them."""

    def __init__(self, settings: Settings, pool_size: int) -> None:
        super().__init__(settings, pool_size)
        self.http.requests = []
        request = self.http.request

        def recording(method, url, params=None, data=None, *args, **kwargs):
            self.http.requests.append(SimpleNamespace(method=method, params=params or {},
                                                      data=data or {}))
            return request(method, url, params, data, *args, **kwargs)
        self.http.request = recording


def sender_for(fake, **changes) -> RecordingSender:
    settings = Settings(_env_file=None, twilio_api_url=AnyHttpUrl(fake.url),
                        twilio_account_sid=fake.account_sid,
                        twilio_auth_token=SecretStr(fake.auth_token),
                        smsq_twilio_read_timeout=1.0, **changes)
    return RecordingSender(settings, pool_size=4)


def test_an_accepted_message_gives_its_sid_and_segments(fake_twilio):
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "hello " * 40))
    [received] = fake_twilio.messages()
    assert attempt.request_sent and attempt.http_status == 201
    assert attempt.sid == received["sid"] and attempt.segments == 2
    assert received["status_callback"] is None  # no SMSQ_PUBLIC_URL, no callback


def test_the_departure_is_stamped_once_after_the_request_left():
    """The pacing counts a token from this stamp, so it must never come before the request's
    bytes are in the kernel: when it is called, the server's side can already read them."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        readable_at_departure: list[bool] = []

        def departed(at: float) -> None:
            try:  # connected yet? then it waits in the backlog
                connection, _ = listener.accept()
            except BlockingIOError:
                readable_at_departure.append(False)
                return
            readable_at_departure.append(bool(select.select([connection], [], [], 0)[0]))
            connection.close()  # no answer: the request ends as a lost answer

        listener.setblocking(False)

        host, port = listener.getsockname()
        nowhere = type("Silent", (), {"url": f"http://{host}:{port}", "account_sid": "AC1",
                                      "auth_token": "x"})
        attempt = sender_for(nowhere).send(Outgoing(TO, FROM, "hello"), departed)
    assert attempt.request_sent
    assert readable_at_departure == [True]


def test_the_whole_request_is_written_before_its_departure_is_stamped():
    """Twilio takes a message once its whole request is in: when the departure is stamped,
    the body is already readable on the server's side, with the head."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        readable_at_departure: list[bytes] = []

        def departed(at: float) -> None:
            connection, _ = listener.accept()
            readable_at_departure.append(connection.recv(65536, socket.MSG_PEEK))
            connection.close()  # no answer: the request ends as a lost answer

        host, port = listener.getsockname()
        nowhere = type("Silent", (), {"url": f"http://{host}:{port}", "account_sid": "AC1",
                                      "auth_token": "x"})
        sender_for(nowhere).send(Outgoing(TO, FROM, "the whole body"), departed)
    [request] = readable_at_departure
    head, _, body = request.partition(b"\r\n\r\n")
    assert head.startswith(b"POST ") and b"Body=the+whole+body" in body


def test_a_request_whose_body_fails_sends_nothing_not_even_its_head():
    """The head waits for the body; a body that fails to come must not let the head go out
    alone, stamped as a departure (a departure would count a token for nothing sent)."""
    def failing_body():
        raise OSError("the body could not be read")
        yield b""  # a generator: urllib3 sends it chunk by chunk

    with socket.create_server(("127.0.0.1", 0)) as listener:
        host, port = listener.getsockname()
        connection = _StampedHTTPConnection(host, port)
        departures: list[float] = []
        _departure.leaving = _Leaving(notify=departures.append)
        try:
            with pytest.raises(OSError, match="could not be read"):
                connection.request("POST", "/", body=failing_body())
        finally:
            _departure.leaving = None
        listener.setblocking(False)
        try:
            server_side, _ = listener.accept()
        except BlockingIOError:
            received = b""  # it never even connected
        else:
            server_side.setblocking(False)
            try:
                received = server_side.recv(65536)
            except BlockingIOError:
                received = b""
            server_side.close()
        connection.close()
    assert received == b""
    assert departures == []


def test_a_request_released_ahead_leaves_no_earlier_than_its_tokens(fake_twilio):
    """Released before its tokens are there (RELEASE_LEAD_SECONDS), a request is built and
    connected at once but reaches Twilio only once they are."""
    twilio = sender_for(fake_twilio)
    twilio.send(Outgoing(TO, FROM, "warm"))  # the connection is open: only the hold waits
    departures: list[float] = []
    not_before = time.monotonic() + 0.3
    attempt = twilio.send(Outgoing(TO, FROM, "ahead"), departures.append, not_before)
    [received] = [m for m in fake_twilio.messages() if m["body"] == "ahead"]
    assert attempt.request_sent and len(departures) == 1
    assert departures[0] >= not_before
    assert received["received_monotonic"] >= not_before  # the sandbox's own clock reading


def _pool(twilio: TwilioSender, url: str):
    return twilio.http.pool.connection_from_url(url)


def _open_connections(twilio: TwilioSender, url: str) -> list:
    return [conn for conn in list(_pool(twilio, url).pool.queue)
            if conn is not None and not conn.is_closed]


def _burst(twilio: TwilioSender, bodies: list[str]) -> list:
    """Send `bodies` at once, each on its own connection: every request holds its connection
    until all have one (`withhold` runs once a request has its connection)."""
    everyone_connected = threading.Barrier(len(bodies))
    attempts: list = []
    threads = [threading.Thread(target=lambda b=body: attempts.append(twilio.send(
        Outgoing(TO, FROM, b), withhold=lambda: everyone_connected.wait(5) is None)))
        for body in bodies]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return attempts


def _age_idle_connections(twilio: TwilioSender, url: str, seconds: float) -> None:
    """As if the pooled connections had lain idle `seconds` longer."""
    queue = _pool(twilio, url).pool
    with queue.mutex:
        for conn in queue.queue:
            if conn is not None:
                conn.smsq_idle_since -= seconds


def test_keep_alive_connections_a_burst_opened_are_closed_once_idle(fake_twilio):
    """A burst opens a connection per request on the wire; idle past the expiry, they are
    closed (a descriptor each), and connect again when needed."""
    twilio = sender_for(fake_twilio)
    burst = _burst(twilio, ["burst 1", "burst 2", "burst 3"])
    assert len(_open_connections(twilio, fake_twilio.url)) == 3
    _age_idle_connections(twilio, fake_twilio.url, KEEPALIVE_EXPIRY_SECONDS + 1)
    twilio.close_idle()  # the dispatcher's tick
    assert _open_connections(twilio, fake_twilio.url) == []
    again = _burst(twilio, ["again 1", "again 2", "again 3"])
    assert [a.http_status for a in burst + again] == [201] * 6
    assert len(fake_twilio.messages()) == 6


def test_keep_alive_connections_idle_less_than_the_expiry_stay_open(fake_twilio):
    twilio = sender_for(fake_twilio)
    _burst(twilio, ["burst 1", "burst 2", "burst 3"])
    _age_idle_connections(twilio, fake_twilio.url, KEEPALIVE_EXPIRY_SECONDS - 1)
    twilio.close_idle()
    assert len(_open_connections(twilio, fake_twilio.url)) == 3


def test_the_dispatcher_closes_idle_connections_on_its_tick(settings, fake_twilio):
    """With nothing more to send, nothing takes a connection from the pool again: the
    dispatcher's own tick closes the idle one."""
    settings = dispatch_settings(settings, fake_twilio)
    add_notifications(settings, {"body": "one"})
    with running_dispatcher(settings) as dispatcher:
        wait_until(lambda: statuses(settings) == {"sent": 1}, timeout=15, message="sent")
        assert len(_open_connections(dispatcher.twilio, fake_twilio.url)) == 1
        _age_idle_connections(dispatcher.twilio, fake_twilio.url, KEEPALIVE_EXPIRY_SECONDS + 1)
        wait_until(lambda: _open_connections(dispatcher.twilio, fake_twilio.url) == [],
                   timeout=5, message="the idle connection closed by a tick")


def test_a_request_is_not_written_on_a_connection_idle_past_the_expiry(fake_twilio):
    """A server closes a connection idle too long, and a request written on it as it does
    has an unknown outcome: one idle past the expiry connects again first."""
    twilio = sender_for(fake_twilio)
    twilio.send(Outgoing(TO, FROM, "first"))
    [before] = _open_connections(twilio, fake_twilio.url)
    first_port = before.sock.getsockname()[1]
    _age_idle_connections(twilio, fake_twilio.url, KEEPALIVE_EXPIRY_SECONDS + 1)
    attempt = twilio.send(Outgoing(TO, FROM, "second"))
    [after] = _open_connections(twilio, fake_twilio.url)
    assert attempt.http_status == 201
    assert after.sock.getsockname()[1] != first_port


def test_a_failed_tls_handshake_means_the_request_did_not_leave():
    """Over HTTPS a new connection's handshake comes before any byte of the request: a
    handshake that fails (here the server answers it with garbage) sent nothing."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        def answer_with_garbage() -> None:
            connection, _ = listener.accept()
            connection.recv(4096)  # the ClientHello
            connection.sendall(b"this is not TLS\r\n" * 4)
            connection.close()

        server = threading.Thread(target=answer_with_garbage)
        server.start()
        host, port = listener.getsockname()
        tls = type("Tls", (), {"url": f"https://{host}:{port}", "account_sid": "AC1",
                               "auth_token": "x"})
        departures: list[float] = []
        attempt = sender_for(tls).send(Outgoing(TO, FROM, "hello"), departures.append)
        server.join()
    assert "SSL" in attempt.error_message  # the handshake is what failed
    assert not attempt.request_sent and departures == []


def test_a_request_that_never_left_has_no_departure():
    departures: list[float] = []
    attempt = sender_for(nowhere()).send(Outgoing(TO, FROM, "hello"), departures.append)
    assert not attempt.request_sent and departures == []


def nowhere():
    """A fake's address that refuses connections."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return type("Nowhere", (), {"url": f"http://127.0.0.1:{port}", "account_sid": "AC1",
                                "auth_token": "x"})


def test_a_refused_connection_was_not_sent():
    attempt = sender_for(nowhere()).send(Outgoing(TO, FROM, "hello"))
    assert not attempt.request_sent
    assert attempt.error_message.startswith("NewConnectionError")  # refused, as it claims
    policy = RetryPolicy(max_attempts=5, backoff=1, backoff_max=10)
    assert decide(attempt, 1, policy).status == "pending"


@pytest.mark.parametrize("fault, failure", [
    ({"mode": "drop"}, "ProtocolError"),  # closed without an answer
    ({"mode": "slow", "slow_ms": 3000}, "ReadTimeoutError"),  # past the 1 s read timeout
])
def test_an_answer_lost_after_sending_is_unknown(fake_twilio, fault, failure):
    fake_twilio.set_faults([fault])
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "hello"))
    [received] = fake_twilio.messages()
    assert received["accepted"] and received["fault"] == fault["mode"]
    assert attempt.request_sent and attempt.http_status is None
    assert attempt.error_message.startswith(failure)
    decision = decide(attempt, 1, RetryPolicy(5, 1, 10))
    assert decision.status == "processing"


def test_every_media_url_reaches_twilio_under_a_repeated_key(fake_twilio):
    media = ("https://cdn.example.com/a.png", "https://cdn.example.com/b.png?size=2&name=é")
    attempt = sender_for(fake_twilio).send(Outgoing(TO, FROM, "two pictures", media_url=media))
    [received] = fake_twilio.messages()
    assert attempt.http_status == 201 and attempt.sid.startswith("MM")
    assert received["media_url"] == list(media)


def test_a_list_follows_twilios_next_page_urls(fake_twilio):
    twilio = sender_for(fake_twilio)
    sids = {twilio.send(Outgoing(TO, FROM, f"number {n}")).sid for n in range(5)}
    twilio.send(Outgoing("+14155550100", FROM, "someone else's"))
    assert {m.sid for m in twilio.client.messages.list(to=TO, page_size=2)} == sids
    # The first page by its query parameters, the next two by the URLs Twilio gave.
    assert [request.params for request in fake_list_requests(twilio)] == [
        {"To": TO, "PageSize": 2}, {}, {}]


PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture
def no_proxy_variables(monkeypatch):
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


def sender_made_with(fake, monkeypatch, **variables: str) -> RecordingSender:
    """A sender made while these proxy variables were set; they are gone once it exists (the
    fake's own control reads them too, on its first call)."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    twilio = sender_for(fake)
    for name in variables:
        monkeypatch.delenv(name)
    return twilio


def test_a_refused_proxy_means_the_request_did_not_leave(fake_twilio, no_proxy_variables):
    twilio = sender_made_with(fake_twilio, no_proxy_variables, HTTP_PROXY=nowhere().url)
    attempt = twilio.send(Outgoing(TO, FROM, "hello"))
    assert not attempt.request_sent and "proxy" in attempt.error_message
    assert fake_twilio.messages() == []


def test_the_proxy_variables_are_read_once_when_the_client_is_made(fake_twilio,
                                                                   no_proxy_variables):
    direct = sender_for(fake_twilio)
    no_proxy_variables.setenv("HTTP_PROXY", nowhere().url)
    assert direct.send(Outgoing(TO, FROM, "direct")).http_status == 201
    proxied = sender_made_with(fake_twilio, no_proxy_variables, HTTP_PROXY=nowhere().url)
    assert not proxied.send(Outgoing(TO, FROM, "through the proxy")).request_sent
    assert [m["body"] for m in fake_twilio.messages()] == ["direct"]


def test_no_proxy_names_the_hosts_reached_directly(fake_twilio, no_proxy_variables):
    twilio = sender_made_with(fake_twilio, no_proxy_variables, HTTP_PROXY=nowhere().url,
                              NO_PROXY="localhost,127.0.0.1")
    assert twilio.send(Outgoing(TO, FROM, "direct")).http_status == 201


def test_a_request_goes_through_the_proxy_named_with_its_credentials(fake_twilio,
                                                                     no_proxy_variables):
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        heads: list[bytes] = []

        def take_one_request() -> None:
            connection, _ = proxy.accept()
            with connection:
                head = b""
                while b"\r\n\r\n" not in head and (chunk := connection.recv(65536)):
                    head += chunk
                heads.append(head)  # then closed without an answer

        listener = threading.Thread(target=take_one_request, daemon=True)
        listener.start()
        host, port = proxy.getsockname()
        twilio = sender_made_with(fake_twilio, no_proxy_variables,
                                  HTTP_PROXY=f"http://smsq:s%40cret@{host}:{port}")
        attempt = twilio.send(Outgoing(TO, FROM, "hello"))
        listener.join(timeout=10)
    [head] = heads
    request_line, *header_lines = head.decode().split("\r\n\r\n")[0].split("\r\n")
    assert request_line.startswith(f"POST {fake_twilio.url}/2010-04-01/Accounts/")
    headers = dict(line.split(": ", 1) for line in header_lines)
    proxy_authorization = {v for k, v in headers.items() if k.lower() == "proxy-authorization"}
    assert proxy_authorization == {"Basic " + base64.b64encode(b"smsq:s@cret").decode()}
    assert attempt.request_sent and attempt.http_status is None  # left, answer lost
    assert fake_twilio.messages() == []


def test_a_proxy_tunnel_is_not_the_requests_departure(no_proxy_variables):
    """The CONNECT of an HTTPS tunnel is written through the same send() that stamps a
    departure: stamped, a request would count as gone a TLS handshake before its bytes."""
    with socket.create_server(("127.0.0.1", 0)) as proxy:
        heads: list[bytes] = []

        def open_a_tunnel_then_close() -> None:
            connection, _ = proxy.accept()
            with connection:
                heads.append(connection.recv(65536))
                connection.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        listener = threading.Thread(target=open_a_tunnel_then_close, daemon=True)
        listener.start()
        host, port = proxy.getsockname()
        twilio_far_away = type("Far", (), {"url": "https://api.twilio.test", "account_sid": "AC1",
                                           "auth_token": "x"})
        twilio = sender_made_with(twilio_far_away, no_proxy_variables,
                                  HTTPS_PROXY=f"http://{host}:{port}")
        departures: list[float] = []
        attempt = twilio.send(Outgoing(TO, FROM, "hello"), departures.append)
        listener.join(timeout=10)
    assert heads and heads[0].startswith(b"CONNECT api.twilio.test:443")  # the tunnel opened
    assert departures == []  # TLS failed inside it: the request itself never left
    assert not attempt.request_sent  # nothing of it left: sent again, not reconciled


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


def test_find_sent_takes_only_the_exact_body_from_that_sender_after_the_claim(fake_twilio):
    twilio = sender_for(fake_twilio)
    earlier = twilio.send(Outgoing(TO, FROM, "your code is 1"))  # before the claim
    time.sleep(CLOCK_SLACK.total_seconds() + 1.1)  # Twilio's dates have whole seconds
    since = datetime.now(timezone.utc)
    for body in ("Your code is 1", "xyour code is 1", "your code is 1 ", "code is 1"):
        twilio.send(Outgoing(TO, FROM, body))  # another application's, or another text
    assert twilio.find_sent(Outgoing(TO, FROM, "your code is 1"), since) == []
    first = twilio.send(Outgoing(TO, FROM, "your code is 1"))
    second = twilio.send(Outgoing(TO, FROM, "your code is 1"))
    found = twilio.find_sent(Outgoing(TO, FROM, "your code is 1"), since)
    assert earlier.sid not in [f.sid for f in found]
    assert {f.sid for f in found} == {first.sid, second.sid}


def test_find_sent_accepts_the_trial_accounts_prefix(fake_twilio):
    twilio = sender_for(fake_twilio)
    since = datetime.now(timezone.utc)
    trial = twilio.send(Outgoing(TO, FROM, TRIAL_PREFIX + "hello"))
    assert [f.sid for f in twilio.find_sent(Outgoing(TO, FROM, "hello"), since)] == [trial.sid]


def test_find_sent_asks_for_messages_sent_since_a_gmt_date(fake_twilio):
    """Twilio documents DateSent as a GMT date; the library would write a datetime."""
    twilio = sender_for(fake_twilio)
    since = datetime(2026, 12, 2, 0, 30, tzinfo=timezone(timedelta(hours=2)))
    twilio.find_sent(Outgoing(TO, FROM, "hello"), since)
    asked = [request.params for request in fake_list_requests(twilio)]
    assert {"To": TO, "From": FROM, "DateSent>": "2026-12-01", "PageSize": 50} in asked
    assert any("DateSent>" not in params for params in asked)  # the queued ones too


def fake_list_requests(twilio: TwilioSender) -> list:
    return [request for request in twilio.http.requests if request.method == "GET"]


def test_validity_period_follows_expire_datetime_within_twilios_range() -> None:
    now = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
    assert validity_period(None, now) is None
    assert validity_period(now + timedelta(minutes=10), now) == 600
    assert validity_period(now + timedelta(seconds=0.2), now) == 1
    assert validity_period(now - timedelta(seconds=5), now) == 1
    assert validity_period(now + timedelta(days=3), now) == MAX_VALIDITY_SECONDS == 36_000


def test_the_request_carries_validity_period_and_our_id_and_overrides_in_the_callback(fake_twilio):
    twilio = sender_for(fake_twilio, smsq_public_url=AnyHttpUrl("https://smsq.example.com"))
    notification_id = uuid.uuid4()
    expire = datetime.now(timezone.utc) + timedelta(minutes=10)
    twilio.send(Outgoing(TO, FROM, "hello", notification_id=notification_id,
                         expire_datetime=expire))
    [request] = [r for r in twilio.http.requests if r.method == "POST"]
    assert 590 <= int(request.data["ValidityPeriod"]) <= 600
    # With Twilio's connection overrides: it retries a receipt serve did not take.
    assert request.data["StatusCallback"] == (
        f"https://smsq.example.com/twilio/status?n={notification_id}"
        "#rc=5&rp=all&ct=2000&rt=5000&tt=15000")
    twilio.send(Outgoing(TO, FROM, "no expiry"))
    assert "ValidityPeriod" not in [r for r in twilio.http.requests if r.method == "POST"][-1].data


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
