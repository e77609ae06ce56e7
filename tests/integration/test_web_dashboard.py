"""The dashboard's pages and actions, health and metrics, and `smsq serve` as a process."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx2
import pika
import psycopg
import pytest
from starlette.testclient import TestClient

from consumer import pipeline
from consumer.serve.app import create_app
from tests.support import declare_queues, publish_raw, queue_depth, start_smsq, stop, wait_until
from tests.web_support import USER, conn, insert_notification, log_in, web_settings  # noqa: F401 - conn is a fixture


@pytest.fixture
def client(settings) -> Iterator[TestClient]:
    with TestClient(create_app(web_settings(settings))) as test_client:
        test_client.csrf = log_in(test_client)
        yield test_client


def status_of(conn: psycopg.Connection, notification_id) -> str:
    return conn.execute("SELECT status FROM notification WHERE id = %s",
                        (notification_id,)).fetchone()[0]


def test_the_overview_shows_counts_sends_senders_age_and_errors(client, conn):
    for _ in range(3):
        insert_notification(conn, status="sent", sent_ago=timedelta(minutes=2))
    insert_notification(conn, status="pending", priority="high", publish_ago=timedelta(minutes=7))
    failed = insert_notification(conn, status="processing")
    conn.execute("UPDATE notification SET status = 'errored', status_message = 'Twilio said no' "
                 "WHERE id = %s", (failed,))
    conn.execute("UPDATE sms_notification SET error_code = 21610 WHERE notification_id = %s",
                 (failed,))
    conn.execute("INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity) "
                 "VALUES ('', '+14155550199', 'host-a:4242', 0.5, 1, 1)")
    stuck = insert_notification(conn, status="processing")
    conn.execute("UPDATE notification SET lease_expire_datetime = now() - interval '1 minute' "
                 "WHERE id = %s", (stuck,))
    page = client.get("/").text
    assert "3 accepted by Twilio" in page            # the chart's hour
    assert "1 past their lease" in page
    assert "+14155550199" in page and "host-a:4242" in page
    assert "7 min" in page                            # oldest due message
    assert "21610" in page and "unsubscribed" in page  # errors by code
    assert '<svg class="chart"' in page


def test_the_overview_shows_each_dispatcher_alive_or_gone(client, conn, settings):
    conn.execute("INSERT INTO dispatcher (holder, senders_held) VALUES ('host-b:1', 4), "
                 "('host-c:2', 4)")
    with psycopg.connect(settings.database_dsn,
                         application_name=pipeline.LOCK_CONNECTION_PREFIX + "host-b:1"):
        page = client.get("/").text
    card = page[page.index("<h2>Dispatchers</h2>"):]
    card = card[:card.index("</section>")]
    alive, gone = card.index("host-b:1"), card.index("host-c:2")
    assert "alive" in card[alive:gone] and "gone" in card[gone:]


def test_pages_link_their_assets_without_a_host_or_scheme(client):
    """Behind a TLS proxy the page is https while serve sees http: an absolute http:// link
    to the stylesheet would be blocked as mixed content."""
    page = client.get("/", headers={"host": "sms.example.com"}).text
    assert 'href="/static/style.css"' in page and 'src="/static/dashboard.js"' in page
    assert "http://" not in page
    assert client.get("/static/style.css").status_code == 200


def test_search_finds_a_notification_by_number_sid_and_id(client, conn):
    sid = "SM" + "b" * 32
    notification_id = insert_notification(conn, status="sent", to="+14155550123", twilio_sid=sid,
                                          sent_ago=timedelta(seconds=5))
    for query in ("+1 (415) 555-0123", sid):
        page = client.get("/notifications", params={"q": query}).text
        assert f"/notifications/{notification_id}" in page, query
    by_id = client.get("/notifications", params={"q": str(notification_id)},
                       follow_redirects=False)
    assert by_id.headers["location"] == f"/notifications/{notification_id}"
    assert "not an id" in client.get("/notifications", params={"q": "hello"}).text
    # digits that match no id: the hint about numbers, not "0 found by id prefix"
    assert "with its + and country code" in client.get(
        "/notifications", params={"q": "4155550123"}).text


def test_search_by_the_short_id_the_lists_show(client, conn):
    first = insert_notification(conn, status="sent")
    shown = str(first)[:8] + "…"  # as the lists show it
    by_prefix = client.get("/notifications", params={"q": shown}, follow_redirects=False)
    assert by_prefix.headers["location"] == f"/notifications/{first}"
    twin = uuid.UUID(str(first)[:8] + str(uuid.uuid4())[8:])
    insert_notification(conn, status="sent", notification_id=twin)
    both = client.get("/notifications", params={"q": str(first)[:8]}).text
    assert "2 found by id prefix" in both
    assert f"/notifications/{first}" in both and f"/notifications/{twin}" in both


def test_a_short_id_that_is_also_a_phone_number_is_still_found(settings, conn):
    """With SMSQ_DEFAULT_REGION=DE, 30123456 is a Berlin number as well as an id's start."""
    digits_first = insert_notification(conn, status="sent",
                                       notification_id=uuid.UUID("30123456" + "0" * 24))
    with TestClient(create_app(web_settings(settings, smsq_default_region="DE"))) as de_client:
        log_in(de_client)
        found = de_client.get("/notifications", params={"q": "30123456…"},
                              follow_redirects=False)
    assert found.headers["location"] == f"/notifications/{digits_first}"


def test_a_notification_page_shows_its_history(client, conn):
    notification_id = insert_notification(conn, status="pending")
    for status in ("processing", "sent"):
        conn.execute("UPDATE notification SET status = %s WHERE id = %s", (status, notification_id))
    conn.execute("UPDATE sms_notification SET delivery_status = 'undelivered', error_code = 30003 "
                 "WHERE notification_id = %s", (notification_id,))
    page = client.get(f"/notifications/{notification_id}").text
    history = page[page.index("History"):]
    for text in ("stored as", "processing", "sent", "undelivered", "30003",
                 "unreachable destination handset"):
        assert text in history
    assert history.index("processing") < history.index("undelivered")


def test_retry_from_the_errors_page_and_cancel_from_a_notification(client, conn, caplog):
    caplog.set_level("INFO", logger="consumer.serve.dashboard")
    errored = insert_notification(conn, status="processing", error_code=30007)
    conn.execute("UPDATE notification SET status = 'errored' WHERE id = %s", (errored,))
    pending = insert_notification(conn, status="pending")
    assert str(errored) in client.get("/errors?code=30007").text
    retried = client.post("/actions/retry", data={"csrf_token": client.csrf,
                                                  "id": str(errored), "next": "/errors"})
    assert "1 notification back to pending" in retried.text
    assert status_of(conn, errored) == "pending"
    canceled = client.post("/actions/cancel", data={"csrf_token": client.csrf,
                                                    "id": str(pending),
                                                    "next": f"/notifications/{pending}"})
    assert "1 notification canceled" in canceled.text
    assert status_of(conn, pending) == "canceled"
    audit = {r.action: r for r in caplog.records if getattr(r, "action", "").startswith("dash")}
    assert (audit["dashboard_retry"].ids, audit["dashboard_cancel"].ids) == (
        str(errored), str(pending))
    assert audit["dashboard_cancel"].user == USER and audit["dashboard_cancel"].client


def test_retry_every_errored_notification_of_one_twilio_code(client, conn):
    ids = {code: insert_notification(conn, status="processing", error_code=code)
           for code in (30007, 21211)}
    conn.execute("UPDATE notification SET status = 'errored'")
    response = client.post("/actions/retry", data={"csrf_token": client.csrf, "code": "30007",
                                                   "next": "/errors?code=30007"})
    assert "1 notification back to pending" in response.text
    assert status_of(conn, ids[30007]) == "pending"
    assert status_of(conn, ids[21211]) == "errored"


def test_dead_letters_are_listed_with_their_reason_and_requeued(client, settings):
    declare_queues(settings)
    reason = "sms.to_phone_number: not a valid phone number: '+1123'"
    publish_raw(settings, [b'{"body": "hi", "sms": {"to_phone_number": "+1123"}}'],
                pika.BasicProperties(message_id="dead-1", headers={"x-error": reason}),
                exchange="", routing_key=settings.dead_queue)
    page = client.get("/dead-letters").text
    assert "not a valid phone number" in page and "dead-1" in page
    overview = client.get("/").text
    assert f"0 waiting in {settings.smsq_queue}, not yet consumed" in overview
    response = client.post("/actions/requeue", data={"csrf_token": client.csrf,
                                                     "key": "dead-1", "next": "/dead-letters"})
    assert "1 dead letter sent back" in response.text
    assert queue_depth(settings, settings.dead_queue) == 0
    assert queue_depth(settings, settings.smsq_queue) == 1


def test_health_readiness_and_metrics(client):
    assert client.get("/healthz").text == "ok\n"
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"ready": True, "postgres": "ok", "rabbitmq": "ok"}
    metrics = client.get("/metrics")
    assert "smsq_status_callbacks_total" in metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")


def closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("missing", ["postgres", "rabbitmq"])
def test_readyz_says_which_dependency_is_unreachable(settings, missing):
    port = closed_port()
    broken = ({"database_url": f"postgresql://postgres@127.0.0.1:{port}/smsq"}
              if missing == "postgres" else
              {"amqp_url": f"amqp://guest:guest@127.0.0.1:{port}/%2F"})
    with TestClient(create_app(web_settings(settings, **broken))) as client:
        response = client.get("/readyz")
    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body[missing].startswith("unreachable")
    other = "rabbitmq" if missing == "postgres" else "postgres"
    assert body[other] == "ok"


def test_smsq_serve_listens_and_stops_cleanly_on_sigterm(settings, tmp_path):
    port = closed_port()
    log_path = tmp_path / "serve.log"
    process = start_smsq(web_settings(settings, smsq_http_port=port), "serve",
                         log_path=log_path)
    try:
        wait_until(lambda: _answers(f"http://127.0.0.1:{port}/healthz"), timeout=20,
                   message="smsq serve to answer")
        assert httpx2.get(f"http://127.0.0.1:{port}/", follow_redirects=False).status_code == 303
        assert stop(process, timeout=10) == 0
    finally:
        if process.poll() is None:
            process.kill()
    assert "serve_stopped" in log_path.read_text()


def _answers(url: str) -> bool:
    try:
        return httpx2.get(url, timeout=1).status_code == 200
    except httpx2.HTTPError:
        return False


def test_the_overview_still_shows_postgres_figures_when_rabbitmq_is_away(settings, conn):
    insert_notification(conn, status="pending", priority="high")
    broken = web_settings(settings, amqp_url=f"amqp://guest:guest@127.0.0.1:{closed_port()}/%2F")
    with TestClient(create_app(broken)) as client:
        log_in(client)
        response = client.get("/")
    assert response.status_code == 200
    assert "RabbitMQ unreachable" in response.text
    assert "1 high priority" in response.text


def test_pages_say_when_postgres_is_unreachable(settings):
    nowhere = f"postgresql://postgres@127.0.0.1:{closed_port()}/smsq"
    broken = web_settings(settings, database_url=nowhere)
    with TestClient(create_app(broken)) as client:
        # The login form too: the session key and the sessions are kept in Postgres.
        for page in ("/login", "/"):
            response = client.get(page, follow_redirects=False)
            assert response.status_code == 503, page
            assert "Postgres is unreachable" in response.text
        assert client.get("/healthz").status_code == 200  # machines' paths read no session
