"""`smsq serve` attacked as it would be on the open internet (issue 13): from outside, and
with a stolen cookie. Each test names the attack and what must hold."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import socket
from collections.abc import Iterator

import httpx2 as httpx
import itsdangerous
import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from consumer import metrics
from consumer.logs import JsonFormatter, TextFormatter
from consumer.serve import sessions
from consumer.serve.app import POOL_SIZE, create_app
from schemas.errors import InvalidMessage, parse_notification
from tests.support import free_port, run_smsq, start_smsq, stop, wait_until
from tests.web_support import (  # noqa: F401 - app, client and conn are fixtures
    AUTH_TOKEN,
    PASSWORD,
    PUBLIC_URL,
    USER,
    app,
    client,
    conn,
    csrf_of,
    insert_media,
    insert_notification,
    log_in,
    web_settings,
)

CALLBACK = "/twilio/status"
SHARED_KEY = "shared-key-secret-0123456789"


def signed_callback(client: TestClient, form: dict[str, str], secret: str = AUTH_TOKEN,
                    algorithm: str | None = None):
    signature = RequestValidator(secret).compute_signature(PUBLIC_URL + CALLBACK, form,
                                                           algorithm)
    headers = {"X-Twilio-Signature": signature}
    if algorithm:
        headers["X-Twilio-Webhooks-Signature-Settings"] = f"key=KS0123,algorithm={algorithm}"
    return client.post(CALLBACK, data=form, headers=headers)


# ---------------------------------------------------------------- the session cookie


def test_the_cookie_handed_to_anyone_cannot_be_checked_against_password_guesses(
        client, conn):
    client.get("/login")
    cookie = client.cookies[sessions.SESSION_COOKIE]
    # The old key, derived from the password: a guess could be checked offline with it.
    derived = hmac.new(PASSWORD.encode(), b"smsq session " + USER.encode(),
                       hashlib.sha256).hexdigest()
    with pytest.raises(itsdangerous.BadSignature):
        itsdangerous.TimestampSigner(derived).unsign(cookie)
    secret = bytes(conn.execute("SELECT secret FROM dashboard_key").fetchone()[0])
    assert len(secret) >= 32
    itsdangerous.TimestampSigner(secret).unsign(cookie)  # the random key in Postgres signs it


def test_every_serve_copy_shares_the_key_and_the_sessions(settings, client):
    log_in(client)
    with TestClient(create_app(web_settings(settings)), cookies=client.cookies) as other_copy:
        assert other_copy.get("/", follow_redirects=False).status_code == 200


def stolen_copy(app, client: TestClient) -> TestClient:
    return TestClient(app, cookies={sessions.SESSION_COOKIE:
                                    client.cookies[sessions.SESSION_COOKIE]})


def test_a_cookie_copied_before_logout_opens_nothing_after_it(app, client, conn):
    token = log_in(client)
    errored = insert_notification(conn, status="errored", error_code=21211)
    with stolen_copy(app, client) as thief:
        assert thief.get("/", follow_redirects=False).status_code == 200
        client.post("/logout", data={"csrf_token": token})
        assert thief.get("/", follow_redirects=False).status_code == 303
        action = thief.post("/actions/retry", data={"csrf_token": token, "id": str(errored)},
                            follow_redirects=False)
    assert action.status_code == 403
    assert conn.execute("SELECT status FROM notification WHERE id = %s",
                        (errored,)).fetchone()[0] == "errored"


def test_a_session_ends_12_hours_after_its_login_however_often_it_is_signed_again(
        client, conn):
    log_in(client)
    expires = conn.execute("SELECT expire_datetime FROM dashboard_session").fetchone()[0]
    for _ in range(3):  # each flash message signs the cookie again
        client.post("/actions/cancel", data={"csrf_token": csrf_of(client.get("/").text)})
    assert conn.execute("SELECT expire_datetime FROM dashboard_session").fetchone()[0] == expires
    conn.execute("UPDATE dashboard_session SET expire_datetime = now() - interval '1 second'")
    assert client.get("/", follow_redirects=False).status_code == 303


def test_logout_all_ends_every_session_and_replaces_the_key(settings, app, client, conn):
    log_in(client)
    before = bytes(conn.execute("SELECT secret FROM dashboard_key").fetchone()[0])
    result = run_smsq(web_settings(settings), "logout-all")
    assert result.returncode == 0, result.stderr
    assert "ended 1 dashboard session" in result.stdout
    assert bytes(conn.execute("SELECT secret FROM dashboard_key").fetchone()[0]) != before
    assert client.get("/", follow_redirects=False).status_code == 303
    log_in(client)  # this copy learns the new key and signs with it
    with TestClient(create_app(web_settings(settings)), cookies=client.cookies) as other_copy:
        assert other_copy.get("/", follow_redirects=False).status_code == 200


@pytest.mark.parametrize(("public_url", "override", "secure"), [
    ("https://smsq.example.test", None, True), ("http://smsq.example.test", None, False),
    ("https://smsq.example.test", False, False), ("http://smsq.example.test", True, True)])
def test_cookies_are_secure_when_served_over_https_or_told_so(settings, public_url, override,
                                                              secure):
    app = create_app(web_settings(settings, smsq_public_url=public_url,
                                  smsq_secure_cookies=override))
    with TestClient(app) as test_client:
        cookie = test_client.get("/login").headers["set-cookie"].lower()
    assert ("; secure" in cookie) == secure
    assert "httponly" in cookie


# ---------------------------------------------------------------- odd input


@pytest.mark.parametrize(("url", "named"), [
    ("/errors?code=%C2%B2", "code"), ("/errors?code=99999999999", "code"),
    ("/errors?code=-1", "code"), ("/notifications?q=%00", "q"),
    ("/notifications?q=SM" + "%00" * 32, "q"), ("/notifications?q=" + "1" * 600, "q"),
    ("/notifications/not-an-id", "notification_id"), ("/login?next=%00", "next")])
def test_a_malformed_parameter_of_any_page_is_a_400_naming_it(app, url, named):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        log_in(test_client)
        response = test_client.get(url, follow_redirects=False)
    assert response.status_code == 400, response.text
    assert response.text.startswith(f"{named}: ")


@pytest.mark.parametrize(("form", "named"), [
    ({"id": "not-an-id"}, "id"), ({"code": "99999999999"}, "code"),
    ({"code": "3\u00b2"}, "code"), ({"next": "/\x00"}, "next")])
def test_a_malformed_form_field_of_an_action_is_a_400_naming_it(app, form, named):
    with TestClient(app, raise_server_exceptions=False) as test_client:
        token = log_in(test_client)
        response = test_client.post("/actions/retry", data={"csrf_token": token, **form},
                                    follow_redirects=False)
    assert response.status_code == 400, response.text
    assert response.text.startswith(f"{named}: ")


def test_a_replayed_callback_for_an_unknown_sid_is_parked_once(client, conn):
    form = {"MessageSid": "SM" + "e" * 32, "MessageStatus": "delivered"}
    for _ in range(3):
        assert signed_callback(client, form).status_code == 200
    assert conn.execute("SELECT count(*) FROM delivery_receipt_early").fetchone()[0] == 1


@pytest.mark.parametrize("algorithm", [None, "HMAC_SHA1", "HMAC_SHA256"])
def test_callbacks_signed_with_the_auth_token_or_a_shared_key_are_applied(settings, conn,
                                                                          algorithm):
    app = create_app(web_settings(settings, smsq_webhook_shared_key=SHARED_KEY))
    sid = "SM" + "a" * 32
    insert_notification(conn, status="sent", twilio_sid=sid)
    form = {"MessageSid": sid, "MessageStatus": "delivered"}
    with TestClient(app) as test_client:
        secret = SHARED_KEY if algorithm else AUTH_TOKEN
        assert signed_callback(test_client, form, secret, algorithm).status_code == 200
        # The other secret with the same claim is refused.
        other = AUTH_TOKEN if algorithm else SHARED_KEY
        assert signed_callback(test_client, form, other, algorithm).status_code == 403
    assert conn.execute("SELECT delivery_status FROM sms_notification WHERE twilio_sid = %s",
                        (sid,)).fetchone()[0] == "delivered"


def test_a_sha256_callback_without_a_configured_shared_key_is_refused(client, caplog):
    form = {"MessageSid": "SM" + "b" * 32, "MessageStatus": "delivered"}
    assert signed_callback(client, form, SHARED_KEY, "HMAC_SHA256").status_code == 403
    assert any(getattr(r, "missing", None) == "SMSQ_WEBHOOK_SHARED_KEY" for r in caplog.records)


# ---------------------------------------------------------------- labels and logs


def test_an_unknown_field_with_a_huge_name_is_labelled_unknown_field_and_logged_short():
    huge = "f" * 20_000
    raw = json.dumps({"body": "hi", "sms": {"to_phone_number": "+14155550123"},
                      huge: 1}).encode()
    with pytest.raises(InvalidMessage) as refused:
        parse_notification(raw)
    reason = str(refused.value)
    # As consume labels a dead letter: by the text before the first colon of the reason.
    metrics.MESSAGES_DEAD_LETTERED.labels(reason.split(":", 1)[0]).inc()
    metrics.MESSAGES_DEAD_LETTERED.labels("sms.media_url.3").inc()
    registry = CollectorRegistry()
    registry.register(metrics.MESSAGES_DEAD_LETTERED)
    exported = generate_latest(registry).decode()
    assert huge not in exported and 'field="unknown_field"' in exported
    assert 'field="sms.media_url"' in exported
    record = logging.makeLogRecord({"msg": "message dead-lettered", "levelname": "WARNING",
                                    "action": "message_dead_lettered", "reason": reason})
    for formatter in (TextFormatter(), JsonFormatter()):
        assert len(formatter.format(record)) < 1500


@pytest.mark.parametrize(("written", "shown"), [
    ("4155550123", "******0123"), ("+1 415 555 0123", "+* *** *** 0123"),
    ("(415) 555-0123", "(***) ***-0123"), ("+14155550123", "+*******0123"),
    ("07911 123456", "***** **3456")])
def test_phone_numbers_written_any_way_are_masked_in_logs(written, shown):
    record = logging.makeLogRecord({"msg": f"sent to {written}", "levelname": "INFO",
                                    "to": written})
    line = TextFormatter().format(record)
    assert written not in line
    assert f"sent to {shown} [to={shown}" in line


def test_ids_times_and_addresses_are_not_taken_for_phone_numbers():
    kept = ("2026-11-24 12:00:00", "0b9a3c1e-6f0d-4a51-9d57-201234567890",
            "client=192.168.100.200", "count=1234567", "SM01234567890123456789012345678901")
    for text in kept:
        line = TextFormatter().format(logging.makeLogRecord({"msg": text, "levelname": "INFO"}))
        assert text in line


# ---------------------------------------------------------------- readiness and metrics


def sessions_opened(conn: psycopg.Connection) -> int:
    """Connections ever opened to this test's database (pg_stat_database, PostgreSQL 14+)."""
    return conn.execute("SELECT sessions FROM pg_stat_database WHERE datname = "
                        "current_database()").fetchone()[0]


def test_scrapes_and_readiness_checks_use_the_pool_not_a_connection_each(client, conn):
    client.get("/readyz")  # the pool is open
    before = sessions_opened(conn)
    for _ in range(3 * POOL_SIZE):
        client.get("/metrics")
        client.get("/readyz")
    assert sessions_opened(conn) - before <= POOL_SIZE


def test_readiness_is_checked_once_a_second_and_says_no_internal_detail(settings, caplog):
    closed = free_port()
    app = create_app(web_settings(settings,
                                  amqp_url=f"amqp://guest:guest@127.0.0.1:{closed}/%2F"))
    now = [100.0]
    with TestClient(app) as test_client:
        app.state.readiness.clock = lambda: now[0]
        answers = [test_client.get("/readyz") for _ in range(5)]
        now[0] += 1.5
        answers.append(test_client.get("/readyz"))
    assert all(a.status_code == 503 for a in answers)
    assert answers[0].json() == {"ready": False, "postgres": "ok", "rabbitmq": "unreachable"}
    unready = [r for r in caplog.records if getattr(r, "action", "") == "readyz_unready"]
    assert [r.dependency for r in unready] == ["rabbitmq", "rabbitmq"]  # 5 answers, 1 check
    assert unready[0].error and unready[0].error not in answers[0].text


# ---------------------------------------------------------------- the login throttle


def test_guesses_from_behind_an_untrusted_proxy_lock_out_only_the_name_guessed(settings):
    # The proxy (this test client) is not trusted: every request has its address.
    app = create_app(web_settings(settings, smsq_trusted_proxies="10.0.0.1"))
    with TestClient(app, client=("127.0.0.1", 50000)) as proxy:
        token = csrf_of(proxy.get("/login").text)
        for forwarded in ("203.0.113.5", "203.0.113.6", "203.0.113.7", "203.0.113.8",
                          "203.0.113.9", "203.0.113.10"):
            guess = proxy.post("/login", data={"user": "admin", "password": "guess",
                                               "csrf_token": token},
                               headers={"X-Forwarded-For": forwarded})
        assert guess.status_code == 429  # X-Forwarded-For from 127.0.0.1 is not believed
        assert proxy.post("/login", data={"user": USER, "password": PASSWORD,
                                          "csrf_token": token},
                          follow_redirects=False).status_code == 303


def test_a_trusted_proxy_forwarding_another_address_is_believed(settings):
    app = create_app(web_settings(settings))  # 127.0.0.1 trusted by default
    with TestClient(app, client=("127.0.0.1", 50000)) as proxy:
        token = csrf_of(proxy.get("/login").text)
        for _ in range(5):
            proxy.post("/login", data={"user": USER, "password": "guess", "csrf_token": token},
                       headers={"X-Forwarded-For": "203.0.113.5"})
        locked = proxy.post("/login", data={"user": USER, "password": PASSWORD,
                                            "csrf_token": token},
                            headers={"X-Forwarded-For": "203.0.113.5"})
        other = proxy.post("/login", data={"user": USER, "password": PASSWORD,
                                           "csrf_token": token},
                           headers={"X-Forwarded-For": "198.51.100.7"}, follow_redirects=False)
    assert (locked.status_code, other.status_code) == (429, 303)


# ---------------------------------------------------------------- the access log


def test_the_access_log_has_a_line_per_request_without_media_tokens_or_cookies(
        settings, conn, caplog):
    _, token = insert_media(conn, b"\x89PNG")
    app = create_app(web_settings(settings, smsq_access_log=True))
    caplog.set_level(logging.INFO, logger="smsq.access")
    with TestClient(app) as test_client:
        log_in(test_client)
        cookie = test_client.cookies[sessions.SESSION_COOKIE]
        test_client.get(f"/media/{token}?sig=secret-in-query")
        test_client.get("/errors?code=30003")
    lines = [r for r in caplog.records if r.name == "smsq.access"]
    assert [(r.method, r.path, r.status) for r in lines] == [
        ("GET", "/login", 200), ("POST", "/login", 303), ("GET", "/", 200),
        ("GET", "/media/…", 200), ("GET", "/errors?code=30003", 200)]
    text = "\n".join(TextFormatter().format(r) for r in caplog.records)
    assert token not in text and "secret-in-query" not in text and cookie not in text


def test_without_smsq_access_log_there_is_none(client, caplog):
    caplog.set_level(logging.INFO, logger="smsq.access")
    client.get("/healthz")
    assert not [r for r in caplog.records if r.name == "smsq.access"]


# ---------------------------------------------------------------- the real server


HEADER_TIMEOUT, BODY_TIMEOUT = 2, 2


@pytest.fixture
def served(settings, tmp_path) -> Iterator[tuple[str, int]]:
    """`smsq serve` as Twilio and everyone else would reach it: (host, port)."""
    port = free_port()
    process = start_smsq(web_settings(settings), "serve", log_path=tmp_path / "serve.log",
                         SMSQ_HTTP_PORT=str(port), SMSQ_HTTP_HEADER_TIMEOUT=str(HEADER_TIMEOUT),
                         SMSQ_HTTP_BODY_TIMEOUT=str(BODY_TIMEOUT))
    wait_until(lambda: _answers(port), message="smsq serve to listen")
    yield "127.0.0.1", port
    stop(process)


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def raw_request(address: tuple[str, int], head: str, body: bytes = b"",
                wait: float = 20) -> bytes:
    """Send `head` (and `body`), then read what the server answers until it closes."""
    with socket.create_connection(address, timeout=wait) as sock:
        sock.sendall(head.encode() + body)
        return _read_all(sock)


def _read_all(sock: socket.socket) -> bytes:
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    return answer


def post_head(path: str, length: int, content_type: str) -> str:
    return (f"POST {path} HTTP/1.1\r\nHost: smsq\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\n\r\n")


@pytest.mark.parametrize(("path", "content_type", "length"), [
    (CALLBACK, "application/x-www-form-urlencoded", 30 * 1024 * 1024),
    ("/login", "multipart/form-data; boundary=x", 40 * 1024 * 1024),
    ("/actions/retry", "application/x-www-form-urlencoded", 1024 * 1024 + 1)])
def test_a_body_declared_too_large_is_refused_before_a_byte_of_it_is_read(served, path,
                                                                          content_type, length):
    answer = raw_request(served, post_head(path, length, content_type))
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_a_body_streamed_past_the_limit_is_refused_when_it_passes_it(served):
    head = (f"POST {CALLBACK} HTTP/1.1\r\nHost: smsq\r\nTransfer-Encoding: chunked\r\n"
            "Content-Type: application/x-www-form-urlencoded\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16 * 1024, b"a" * 16 * 1024)
    # 80 KB of a body of no declared length, and no end: the answer cannot wait for it.
    answer = raw_request(served, head, chunk * 5)
    assert answer.startswith(b"HTTP/1.1 413 ")


def test_a_multipart_callback_is_refused_as_unsupported(served):
    body = b"--x\r\nContent-Disposition: form-data; name=\"MessageSid\"\r\n\r\nSM1\r\n--x--\r\n"
    answer = raw_request(served, post_head(CALLBACK, len(body),
                                           "multipart/form-data; boundary=x"), body)
    assert answer.startswith(b"HTTP/1.1 415 ")


def test_slow_senders_are_closed_and_the_dashboard_answers_while_200_of_them_wait(served):
    slow = []
    for number in range(200):
        sock = socket.create_connection(served, timeout=30)
        # headers never finished, a body never sent, nothing at all
        sock.sendall([b"GET /login HTTP/1.1\r\nHost: sm",
                      post_head(CALLBACK, 100, "application/x-www-form-urlencoded").encode()
                      + b"Message", b""][number % 3])
        slow.append(sock)
    try:
        with httpx.Client(base_url=f"http://{served[0]}:{served[1]}") as browser:
            page = browser.get("/login")
            assert page.status_code == 200
            assert browser.post("/login", data={"user": USER, "password": PASSWORD,
                                                "csrf_token": csrf_of(page.text)}
                                ).status_code == 303
            assert browser.get("/").status_code == 200
        answers = [_read_all(sock) for sock in slow]  # each ends: the server closed it
    finally:
        for sock in slow:
            sock.close()
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers)


def test_past_the_connection_cap_new_requests_are_answered_503(settings, tmp_path):
    port = free_port()
    process = start_smsq(web_settings(settings), "serve", log_path=tmp_path / "serve.log",
                         SMSQ_HTTP_PORT=str(port), SMSQ_HTTP_MAX_CONNECTIONS="10")
    try:
        wait_until(lambda: _answers(port), message="smsq serve to listen")
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        answer = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10)
        for sock in idle:
            sock.close()
    finally:
        stop(process)
    assert answer.status_code == 503
