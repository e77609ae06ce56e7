"""Fixtures: the real RabbitMQ and Postgres, and per-test isolation.

Each test gets its own database (cloned from a migrated template, which is fast) and its
own exchange and queues (unique names, deleted afterwards). A missing service is an error,
never a skip: where neither service answers and a Docker engine runs, testcontainers
starts them.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from urllib.parse import quote, urlencode

import pika
import psycopg
import pytest
from psycopg import sql

from consumer.migrate import migrate
from consumer.sandbox import FakeTwilioControl, FakeTwilioServer
from consumer.services import answers, broker_addresses, postgres_addresses
from consumer.settings import Settings
from schemas.publish import broker_parameters

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/smsq"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def pytest_configure(config: pytest.Config) -> None:
    """A run stopped with SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C: the fixtures
    still clean up, so no engine test leaves RabbitMQ nodes or a Postgres cluster running."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _interrupt)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def _with_dbname(url: str, name: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(url)
    info["dbname"] = name
    return psycopg.conninfo.make_conninfo(**info)


def _as_url(conninfo: str) -> str:
    """A URL again, libpq's multi-host form (host1:5432,host2:5432) and options kept."""
    info = psycopg.conninfo.conninfo_to_dict(conninfo)
    hosts = ",".join(f"{host}:{port}" for host, port in postgres_addresses(conninfo))
    user = quote(info.pop("user", "postgres"), safe="")
    password = f":{quote(info.pop('password'), safe='')}" if info.get("password") else ""
    name = info.pop("dbname")
    options = {k: v for k, v in info.items() if k not in ("host", "port", "password")}
    query = f"?{urlencode(options)}" if options else ""
    return f"postgresql://{user}{password}@{hosts}/{name}{query}"


@pytest.fixture(scope="session")
def service_urls() -> Iterator[tuple[str, str]]:
    """(database server URL, AMQP URL) of services that answer, started if need be."""
    db_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    if answers(postgres_addresses(db_url)) and answers(broker_addresses(amqp_url)):
        yield db_url, amqp_url
        return
    yield from _containers()


def _containers() -> Iterator[tuple[str, str]]:
    try:
        from testcontainers.postgres import PostgresContainer
        from testcontainers.rabbitmq import RabbitMqContainer
        postgres = PostgresContainer("postgres:16", driver=None)
        rabbitmq = RabbitMqContainer("rabbitmq:3.13-management")
        postgres.start()
        rabbitmq.start()
    except Exception as exc:  # noqa: BLE001 - any failure here means no services at all
        pytest.fail(f"RabbitMQ and Postgres do not answer at AMQP_URL / DATABASE_URL, and "
                    f"no containers could be started ({exc}); run ./scripts/test.sh", pytrace=False)
    try:
        params = rabbitmq.get_connection_params()
        amqp_url = f"amqp://guest:guest@{params.host}:{params.port}/%2F"
        yield postgres.get_connection_url(), amqp_url
    finally:
        rabbitmq.stop()
        postgres.stop()


@pytest.fixture(scope="session")
def template_database(service_urls: tuple[str, str]) -> Iterator[str]:
    """A migrated database that each test's database is cloned from."""
    server_url, _ = service_urls
    name = f"smsq_test_template_{os.getpid()}"
    admin = _with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    migrate(_with_dbname(server_url, name))
    yield name
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def database_url(service_urls: tuple[str, str], template_database: str) -> Iterator[str]:
    """A fresh, migrated database of this test's own."""
    yield from cloned_database(service_urls[0], template_database)


def cloned_database(server_url: str, template_database: str) -> Iterator[str]:
    """A migrated database cloned from the template (its URL), dropped afterwards; for a
    fixture of any scope."""
    name = f"smsq_test_{uuid.uuid4().hex[:12]}"
    admin = _with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(
            sql.Identifier(name), sql.Identifier(template_database)))
    yield _as_url(_with_dbname(server_url, name))
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def amqp_names(service_urls: tuple[str, str]) -> Iterator[dict[str, str]]:
    """Exchange and queue names of this test's own; deleted afterwards."""
    _, amqp_url = service_urls
    suffix = uuid.uuid4().hex[:10]
    names = {"smsq_exchange": f"test.{suffix}", "smsq_queue": f"test.{suffix}.sms"}
    yield names
    connection = pika.BlockingConnection(broker_parameters(amqp_url))
    try:
        channel = connection.channel()
        for queue in (names["smsq_queue"], names["smsq_queue"] + ".dead"):
            channel.queue_delete(queue)
        channel.exchange_delete(names["smsq_exchange"])
    finally:
        connection.close()


@pytest.fixture
def settings(database_url: str, amqp_names: dict[str, str],
             service_urls: tuple[str, str]) -> Settings:
    """Settings pointing at this test's own database and queues."""
    return Settings(
        _env_file=None,
        database_url=database_url,
        amqp_url=service_urls[1],
        smsq_ingest_batch_ms=20,
        **amqp_names,
    )


@pytest.fixture
def fake_twilio() -> Iterator[FakeTwilioControl]:
    """A fake Twilio on a free port, in this process: `.url`, `.account_sid`, `.auth_token`,
    `.messages()`, `.set_fault(mode, count=..., ...)`, `.set_latency(ms)`, `.clear()`.
    For a separate process use `consumer.sandbox.spawn()`."""
    with FakeTwilioServer() as server:
        yield FakeTwilioControl(server.url, server.fake.account_sid, server.fake.auth_token)
