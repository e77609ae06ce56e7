"""Authentication on every page and action of the dashboard, and CSRF on every form."""

from __future__ import annotations

import uuid

import psycopg
from starlette.routing import Mount, Route
from starlette.testclient import TestClient

from consumer.serve import auth
from consumer.serve.app import create_app
from tests.web_support import (  # noqa: F401 - app and client are fixtures
    PASSWORD,
    USER,
    app,
    client,
    csrf_of,
    insert_notification,
    log_in,
    web_settings,
)

# The only routes that answer without a login: Twilio, Prometheus, load balancers, the form.
EXPECTED_PUBLIC = {
    ("/twilio/status", "POST"), ("/twilio/inbound", "POST"), ("/media/{token}", "GET"),
    ("/metrics", "GET"),
    ("/healthz", "GET"), ("/readyz", "GET"), ("/login", "GET"), ("/login", "POST"),
}
CSRF_EXEMPT = {"/twilio/status", "/twilio/inbound"}  # signed by Twilio instead


def endpoints(app, notification_id: uuid.UUID | None = None) -> list[tuple[str, str, str]]:
    """(route path, method, a concrete URL) for every route of the app, HEAD aside; a page of
    one notification is of `notification_id`, else of a made-up one."""
    found = []
    for route in app.routes:
        if isinstance(route, Mount):
            continue
        assert isinstance(route, Route)
        url = route.path.replace("{token}", "A" * 32).replace(
            "{notification_id}", str(notification_id or uuid.uuid4()))
        found += [(route.path, method, url) for method in sorted(route.methods - {"HEAD"})]
    return found


def test_only_the_expected_routes_are_public(app):
    public = {(path, method) for path, method, url in endpoints(app) if auth.is_public(url)}
    assert public == EXPECTED_PUBLIC
    assert len(endpoints(app)) > len(EXPECTED_PUBLIC)  # the iteration sees the dashboard too


def test_every_other_page_and_action_refuses_without_a_login(app, client):
    for path, method, url in endpoints(app):
        if (path, method) in EXPECTED_PUBLIC:
            continue
        response = client.request(method, url, follow_redirects=False)
        if method == "GET":
            assert response.status_code == 303, url
            assert response.headers["location"].startswith("/login?next="), url
        else:  # refused by the login check, not merely by the missing CSRF token
            assert response.status_code == 403, f"{method} {url}"
            assert response.text == "log in first\n", f"{method} {url}"


def test_without_configured_credentials_everything_of_the_dashboard_refuses(settings):
    app = create_app(web_settings(settings, smsq_dashboard_user=None,
                                  smsq_dashboard_password=None))
    with TestClient(app) as client:
        for path, method, url in endpoints(app):
            if auth.is_public(url) and path != "/login":
                continue
            response = client.request(method, url, follow_redirects=False)
            assert response.status_code == 403, f"{method} {url}"
            assert "SMSQ_DASHBOARD_PASSWORD" in response.text


def test_logging_in_opens_every_page_and_no_page_can_be_framed(app, client, settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        notification_id = insert_notification(conn)
    log_in(client)
    for _, method, url in endpoints(app, notification_id):
        if method == "GET" and not auth.is_public(url):
            response = client.get(url, follow_redirects=False)
            assert response.status_code == 200, url
            assert "frame-ancestors 'none'" in response.headers["content-security-policy"], url
            assert response.headers["x-frame-options"] == "DENY", url


def test_a_wrong_password_is_refused_and_opens_nothing(client):
    token = csrf_of(client.get("/login").text)
    for user, password in [(USER, "wrong"), ("someone", PASSWORD), ("", "")]:
        response = client.post("/login", data={"user": user, "password": password,
                                               "csrf_token": token}, follow_redirects=False)
        assert response.status_code == 401
        assert "Wrong user name or password" in response.text
    assert client.get("/", follow_redirects=False).status_code == 303


def test_login_redirects_only_within_the_site(client):
    for next_url, expected in [("/errors?code=30003", "/errors?code=30003"),
                               ("//evil.example/", "/"), ("https://evil.example/", "/")]:
        token = csrf_of(client.get("/login").text)
        response = client.post("/login", data={"user": USER, "password": PASSWORD,
                                               "csrf_token": token, "next": next_url},
                               follow_redirects=False)
        assert response.headers["location"] == expected


def test_a_session_ends_when_the_password_changes(settings, client):
    log_in(client)
    assert client.get("/", follow_redirects=False).status_code == 200
    other = create_app(web_settings(settings, smsq_dashboard_password="a new password"))
    with TestClient(other, cookies=client.cookies) as same_browser:
        assert same_browser.get("/", follow_redirects=False).status_code == 303


def test_every_form_refuses_a_missing_or_wrong_csrf_token(app, client, settings):
    log_in(client)
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        errored = insert_notification(conn, status="errored", error_code=21211)
        for path, method, url in endpoints(app):
            if method != "POST" or path in CSRF_EXEMPT:
                continue
            for token in (None, "forged-token"):
                data = {"id": str(errored), "all": "1", "user": USER, "password": PASSWORD}
                if token:
                    data["csrf_token"] = token
                response = client.post(url, data=data, follow_redirects=False)
                assert response.status_code == 403, f"{url} with csrf_token={token!r}"
        status = conn.execute("SELECT status FROM notification WHERE id = %s",
                              (errored,)).fetchone()[0]
    assert status == "errored"
    assert client.get("/", follow_redirects=False).status_code == 200  # still logged in


def test_logging_out_ends_the_session(client):
    token = log_in(client)
    assert client.post("/logout", data={"csrf_token": token},
                       follow_redirects=False).status_code == 303
    assert client.get("/", follow_redirects=False).status_code == 303


def test_after_five_wrong_passwords_even_the_right_one_is_refused_for_a_while(client):
    token = csrf_of(client.get("/login").text)
    for _ in range(5):
        assert client.post("/login", data={"user": USER, "password": "guess",
                                           "csrf_token": token}).status_code == 401
    response = client.post("/login", data={"user": USER, "password": PASSWORD,
                                            "csrf_token": token}, follow_redirects=False)
    assert response.status_code == 429
    assert "Too many wrong passwords" in response.text
    assert 0 < int(response.headers["retry-after"]) <= 900
    assert client.get("/", follow_redirects=False).status_code == 303  # still logged out


def test_the_throttle_forgets_old_failures_and_a_success():
    now = [0.0]
    throttle = auth.LoginThrottle(limit=3, window_seconds=60, clock=lambda: now[0])
    for second in (0, 10, 20):
        now[0] = second
        assert throttle.wait_seconds(USER, "a") == 0
        throttle.failed(USER, "a")
    assert throttle.wait_seconds(USER, "a") == 40  # until the failure at 0 is 60 s old
    assert throttle.wait_seconds(USER, "b") == 0  # another address is not held back
    now[0] = 60
    assert throttle.wait_seconds(USER, "a") == 0
    throttle.failed(USER, "a")
    throttle.succeeded(USER, "a")
    assert throttle.wait_seconds(USER, "a") == 0 and (USER, "a") not in throttle.failures


def test_the_throttle_holds_a_name_from_one_address_and_an_address_trying_many_names():
    throttle = auth.LoginThrottle(limit=2, address_limit=5, clock=lambda: 0.0)
    for _ in range(2):
        throttle.failed("someone-else", "proxy")
    assert throttle.wait_seconds("someone-else", "proxy") > 0
    assert throttle.wait_seconds(USER, "proxy") == 0  # a guess at another name locks nobody out
    for name in ("a", "b", "c"):
        throttle.failed(name, "proxy")
    assert throttle.wait_seconds(USER, "proxy") > 0  # five failures from one address
    assert throttle.wait_seconds(USER, "elsewhere") == 0
