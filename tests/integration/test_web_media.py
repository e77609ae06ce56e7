"""GET /media/<token> and the cleanup of expired media."""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import timedelta

import psycopg
import pytest
from starlette.testclient import TestClient

from consumer.serve import queries
from consumer.serve.app import create_app
from tests.support import wait_until
from tests.web_support import conn, insert_media, insert_notification, web_settings  # noqa: F401 - conn is a fixture

GRACE = 3600.0
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)  # any bytes, including NULs and non-UTF-8


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    app = create_app(web_settings(settings, smsq_media_grace_seconds=GRACE))
    with TestClient(app) as test_client:
        yield test_client


def media_ids(conn: psycopg.Connection) -> set:
    return {row[0] for row in conn.execute("SELECT id FROM sms_temporary_media")}


@pytest.mark.parametrize("content_type", ["image/png", "image/jpeg", "image/gif"])
def test_media_is_served_byte_for_byte_with_its_content_type(client, conn, content_type):
    _, token = insert_media(conn, PNG, content_type)
    response = client.get(f"/media/{token}")
    assert response.status_code == 200
    assert response.content == PNG
    assert response.headers["content-type"] == content_type
    assert response.headers["x-content-type-options"] == "nosniff"


@pytest.mark.parametrize("token", ["wrong", "A" * 32, "has%2Fslash%2E%2E", "x" * 500])
def test_a_wrong_token_is_404(client, conn, token):
    insert_media(conn, PNG)
    assert client.get(f"/media/{token}").status_code == 404


def test_a_token_differing_in_one_character_is_404(client, conn):
    _, token = insert_media(conn, PNG)
    other = token[:-1] + ("A" if token[-1] != "A" else "B")
    assert client.get(f"/media/{other}").status_code == 404


def test_expired_media_nobody_needs_is_404_and_deleted_by_the_cleanup(client, conn):
    expired_id, expired = insert_media(conn, PNG, expires_in=timedelta(seconds=-1))
    fresh_id, fresh = insert_media(conn, PNG)
    assert client.get(f"/media/{expired}").status_code == 404
    assert queries.delete_expired_media(conn, GRACE) == 1
    assert media_ids(conn) == {fresh_id}
    assert client.get(f"/media/{fresh}").status_code == 200
    assert expired_id not in media_ids(conn)


@pytest.mark.parametrize("status, sent_ago, kept", [
    ("pending", None, True),
    ("processing", None, True),
    ("sent", timedelta(minutes=5), True),        # Twilio may still be fetching it
    ("sent", timedelta(hours=2), False),         # grace period over
    ("errored", None, False),
    ("canceled", None, False),
])
def test_expired_media_stays_while_a_notification_may_still_need_it(
        client, conn, status, sent_ago, kept):
    media_id, token = insert_media(conn, PNG, expires_in=timedelta(seconds=-1))
    notification_id = insert_notification(conn, status=status, sent_ago=sent_ago,
                                          media_id=media_id)
    # what is served and what the cleanup keeps are the same rule
    assert client.get(f"/media/{token}").status_code == (200 if kept else 404)
    queries.delete_expired_media(conn, GRACE)
    assert (media_id in media_ids(conn)) is kept
    # and the notification forgets media that is gone (no dangling id)
    assert conn.execute("SELECT temporary_media_id FROM sms_notification "
                        "WHERE notification_id = %s", (notification_id,)).fetchone()[0] == (
        media_id if kept else None)


def test_serve_runs_the_cleanup_periodically(settings, conn):
    media_id, _ = insert_media(conn, PNG, expires_in=timedelta(seconds=-1))
    app = create_app(web_settings(settings, smsq_media_cleanup_seconds=0.1))
    with TestClient(app):
        wait_until(lambda: media_id not in media_ids(conn), timeout=10,
                   message="the periodic cleanup to delete expired media")
        # and again later, for media that expires while serve runs
        later_id, _ = insert_media(conn, PNG, expires_in=timedelta(seconds=-1))
        wait_until(lambda: later_id not in media_ids(conn), timeout=10,
                   message="a second cleanup run")
