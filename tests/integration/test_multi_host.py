"""AMQP_URL's broker list and DATABASE_URL's hosts, with a first one that does not answer:
every program goes on to the next. (The engines failing for real: tests/test_engines.py.)"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import pika
import pytest
from pydantic import PostgresDsn

from tests.support import count_rows, free_port, run_smsq, start_smsq, stop, wait_until


@pytest.fixture
def black_hole() -> Iterator[str]:
    """host:port of a listener that accepts TCP connections and never says a word, as a
    host whose packets vanish looks to a client waiting for its greeting."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield f"127.0.0.1:{listener.getsockname()[1]}"


def test_publish_and_consume_use_the_next_broker_when_the_first_is_down(settings, tmp_path):
    """AMQP_URL lists a broker that does not answer first: each program goes on to the next."""
    down = f"amqp://guest:guest@127.0.0.1:{free_port()}/%2F"
    listed = settings.model_copy(update={"amqp_url": f"{down},{settings.amqp_url}"})
    published = run_smsq(listed, "publish", "--to", "+14155550123", "--body", "hello")
    assert published.returncode == 0, published.stderr
    log = tmp_path / "consume.log"
    consume = start_smsq(listed, "consume", log_path=log)
    try:
        wait_until(lambda: count_rows(listed) == 1, message="the message stored")
    finally:
        assert stop(consume) == 0
    reached = pika.URLParameters(settings.amqp_url)
    assert f"broker={reached.host}:{reached.port}]" in log.read_text()
    status = run_smsq(listed, "status", "--json")
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["queues"][settings.smsq_queue] == 0


def test_a_black_holed_first_postgres_host_costs_the_connect_timeout_not_minutes(
        settings, black_hole):
    """Without connect_timeout psycopg waits 130 s for the silent host before the next."""
    real = settings.database_dsn.split("@", 1)[1].split("/", 1)[0]
    name = settings.database_dsn.rsplit("/", 1)[1].split("?")[0]
    url = f"postgresql://postgres@{black_hole},{real}/{name}?target_session_attrs=read-write"
    listed = settings.model_copy(update={"database_url": PostgresDsn(url)})
    started = time.monotonic()
    status = run_smsq(listed, "status", "--json")  # run_smsq gives up after 60 s
    took = time.monotonic() - started
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["notifications"] is not None
    print(f"\nsmsq status past a black-holed first host: {took:.1f} s")
