"""Helpers for the `smsq serve` tests: settings with a dashboard, rows, a logged-in client."""

from __future__ import annotations

import re
import secrets
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import psycopg
import pytest
from starlette.testclient import TestClient

from consumer.serve.app import create_app
from consumer.settings import Settings

USER, PASSWORD = "operator", "correct horse battery staple"
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
PUBLIC_URL = "https://smsq.example.test"


def web_settings(settings: Settings, **overrides: object) -> Settings:
    """The test's settings with a dashboard login, a Twilio auth token and a public URL.

    Cookies are not Secure: the test client speaks plain HTTP to the app (as a proxy that
    ends TLS would)."""
    values = {"smsq_dashboard_user": USER, "smsq_dashboard_password": PASSWORD,
              "twilio_auth_token": AUTH_TOKEN, "smsq_public_url": PUBLIC_URL,
              "smsq_secure_cookies": False, **overrides}
    return Settings(_env_file=None, **{**settings.model_dump(), **values})


@pytest.fixture
def app(settings: Settings):
    """The app of `smsq serve` with web_settings (import it into a test module)."""
    return create_app(web_settings(settings))


@pytest.fixture
def client(app) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture
def conn(settings: Settings) -> Iterator[psycopg.Connection]:
    """An autocommit connection to the test's database (import it into a test module)."""
    with psycopg.connect(settings.database_dsn, autocommit=True) as connection:
        yield connection


def now() -> datetime:
    return datetime.now(timezone.utc)


def insert_notification(conn: psycopg.Connection, *, status: str = "pending",
                        to: str = "+14155550123", body: str = "Your code is 482910",
                        priority: str = "low", twilio_sid: str | None = None,
                        sent_ago: timedelta | None = None, error_code: int | None = None,
                        status_message: str = "", media_id: uuid.UUID | None = None,
                        publish_ago: timedelta = timedelta(0),
                        notification_id: uuid.UUID | None = None) -> uuid.UUID:
    """A stored notification as the dispatcher would have left it (committed)."""
    notification_id = notification_id or uuid.uuid4()
    sent = now() - sent_ago if sent_ago is not None else None
    conn.execute(
        """INSERT INTO notification (id, body, priority, status, status_message,
                                     publish_datetime, sent_datetime)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (notification_id, body, priority, status, status_message, now() - publish_ago, sent))
    conn.execute(
        """INSERT INTO sms_notification (notification_id, to_phone_number, twilio_sid,
                                         error_code, temporary_media_id, segments)
           VALUES (%s, %s, %s, %s, %s, 1)""",
        (notification_id, to, twilio_sid, error_code, media_id))
    conn.commit()
    return notification_id


def insert_media(conn: psycopg.Connection, content: bytes, content_type: str = "image/png",
                 expires_in: timedelta = timedelta(days=7)) -> tuple[uuid.UUID, str]:
    """(media id, access token) of hosted media, as ingest stores it."""
    media_id, token = uuid.uuid4(), secrets.token_urlsafe(24)
    conn.execute(
        """INSERT INTO sms_temporary_media (id, access_token, name, content_type, content,
                                            expire_datetime) VALUES (%s, %s, %s, %s, %s, %s)""",
        (media_id, token, "label.png", content_type, content, now() + expires_in))
    conn.commit()
    return media_id, token


_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


def csrf_of(html: str) -> str:
    found = _CSRF.search(html)
    assert found, "no CSRF token in the page"
    return found.group(1)


def log_in(client: TestClient) -> str:
    """Log in through the form; the session's CSRF token for later forms."""
    token = csrf_of(client.get("/login").text)
    response = client.post("/login", data={"user": USER, "password": PASSWORD,
                                           "csrf_token": token, "next": "/"},
                           follow_redirects=False)
    assert response.status_code == 303, response.text
    return csrf_of(client.get("/").text)


class RecordingCursor(psycopg.Cursor):
    """Remembers every statement run through it, to EXPLAIN them afterwards."""

    statements: list[tuple[str, object]] = []

    def execute(self, query, params=None, **kwargs):
        RecordingCursor.statements.append((query, params))
        return super().execute(query, params, **kwargs)
