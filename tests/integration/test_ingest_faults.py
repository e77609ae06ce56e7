"""smsq consume under faults: killed, Postgres stopped, RabbitMQ connection closed, SIGTERM.

`smsq consume` runs as its own process (tests.support.start_smsq), as an operator runs it.
Every test checks that each published message ends stored exactly once (or, after a
SIGTERM, stored or still queued, never both and never neither), and proves that its fault
really happened.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pika
import psycopg
import pytest
from pydantic import PostgresDsn

from consumer.migrate import migrate
from consumer.settings import Settings
from tests.support import (
    close_amqp_connections_of,
    declare_queues,
    free_port,
    start_smsq,
    stop,
    wait_until,
)

PG_BIN = Path("/usr/lib/postgresql/15/bin")

pytestmark = pytest.mark.slow


# -- helpers ----------------------------------------------------------------------------------

def messages(count: int) -> tuple[list[bytes], set[uuid.UUID]]:
    ids = [uuid.uuid4() for _ in range(count)]
    bodies = [json.dumps({"id": str(i), "body": f"code {n}",
                          "sms": {"to_phone_number": "+14155550123"}}).encode()
              for n, i in enumerate(ids)]
    return bodies, set(ids)


def publish_in_transactions(settings: Settings, bodies: list[bytes], per_commit: int = 500) -> None:
    """Publish persistently; each tx_commit returns once the broker holds the messages."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.tx_select()
        properties = pika.BasicProperties(delivery_mode=2, content_type="application/json")
        for start in range(0, len(bodies), per_commit):
            for body in bodies[start:start + per_commit]:
                channel.basic_publish(settings.smsq_exchange, settings.smsq_routing_key, body,
                                      properties, mandatory=True)
            channel.tx_commit()
    finally:
        connection.close()


def publish_in_background(settings: Settings, bodies: list[bytes]) -> threading.Thread:
    thread = threading.Thread(target=publish_in_transactions, args=(settings, bodies))
    thread.start()
    return thread


def stored_ids(database_url: str) -> list[uuid.UUID]:
    with psycopg.connect(database_url) as conn:
        return [row[0] for row in conn.execute(
            "SELECT n.id FROM notification n JOIN sms_notification s ON s.notification_id = n.id")]


def stored_count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT count(*) FROM notification").fetchone()[0]


def queue_counts(queue: str) -> tuple[int, int]:
    """(ready, unacknowledged) as the broker itself reports them."""
    out = subprocess.run(
        ["rabbitmqctl", "list_queues", "-q", "--no-table-headers",
         "name", "messages_ready", "messages_unacknowledged"],
        check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        name, ready, unacked = line.split("\t")
        if name == queue:
            return int(ready), int(unacked)
    raise AssertionError(f"queue {queue} not found")


def assert_stored_exactly_once(settings: Settings, published: set[uuid.UUID]) -> None:
    ids = stored_ids(settings.database_dsn)
    assert len(ids) == len(set(ids)) == len(published)
    assert set(ids) == published
    assert stored_count(settings.database_dsn) == len(published)  # no notification without sms
    assert queue_counts(settings.smsq_queue) == (0, 0)
    assert queue_counts(settings.dead_queue) == (0, 0)


def log_of(path: Path) -> str:
    return path.read_text(errors="replace")


# -- killed with SIGKILL -------------------------------------------------------------------------

def test_killed_several_times_during_a_stream_every_message_is_stored_once(settings, tmp_path):
    """The first kill is aimed: the test holds the first message's id in an open transaction,
    so the first batch waits on that lock while later batches commit, and none of them can be
    acknowledged before it. The broker redelivers those committed ones to the next consumer,
    which must acknowledge them without storing them again. The other kills land anywhere."""
    bodies, published = messages(20_000)
    log_path = tmp_path / "consume.log"
    declare_queues(settings)
    publisher = publish_in_background(settings, bodies)
    with psycopg.connect(settings.database_dsn) as holder:
        holder.execute("INSERT INTO notification (id, body) VALUES (%s, 'held by the test')",
                       (json.loads(bodies[0])["id"],))
        consumer = start_smsq(settings, "consume", log_path=log_path)
        wait_until(lambda: stored_count(settings.database_dsn) >= 2_000, timeout=60,
                   message="batches committed behind the held one")
        kill(consumer)
        committed_unacknowledged = stored_count(settings.database_dsn)
        holder.rollback()
    stored_at_kill = [committed_unacknowledged]
    for kill_number in range(2, 5):
        consumer = start_smsq(settings, "consume", log_path=log_path)
        wait_until(lambda: stored_count(settings.database_dsn) >= kill_number * 3_000,
                   timeout=60, message=f"progress before kill {kill_number}")
        kill(consumer)
        stored_at_kill.append(stored_count(settings.database_dsn))
    publisher.join()
    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: stored_count(settings.database_dsn) == len(published)
               and queue_counts(settings.smsq_queue) == (0, 0), timeout=60,
               message="everything stored after the last restart")
    assert stop(consumer) == 0
    # The kills came mid-stream, each with messages still to come.
    assert all(0 < count < len(published) for count in stored_at_kill), stored_at_kill
    assert_stored_exactly_once(settings, published)
    # Every message committed but unacknowledged at the first kill came again, a duplicate.
    assert duplicates_acknowledged(log_of(log_path)) >= committed_unacknowledged


def kill(consumer: subprocess.Popen) -> None:
    consumer.send_signal(signal.SIGKILL)
    assert consumer.wait(timeout=10) == -signal.SIGKILL


def duplicates_acknowledged(log: str) -> int:
    """Messages consume acknowledged without storing them, having stored them already."""
    return sum(int(n) for n in re.findall(r"action=duplicates_acknowledged count=(\d+)", log))


# -- Postgres stopped ----------------------------------------------------------------------------

class OwnPostgres:
    """A throwaway Postgres cluster of this test's own, so it can be stopped at will."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.data = directory / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, cwd=self.directory)

    def create(self) -> None:
        self._pg(str(PG_BIN / "initdb"), "-D", str(self.data), "-A", "trust", "-U", "postgres",
                 "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1"
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-o", options,
                 "-l", str(self.directory / "postgres.log"), "-w", "start")

    def stop(self) -> None:
        self._pg(str(PG_BIN / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def answers(self) -> bool:
        try:
            psycopg.connect(self.url, connect_timeout=2).close()
            return True
        except psycopg.OperationalError:
            return False


@pytest.fixture
def own_postgres() -> Iterator[OwnPostgres]:
    directory = Path(tempfile.mkdtemp(prefix="smsq-pg-"))
    shutil.chown(directory, "postgres")
    server = OwnPostgres(directory)
    server.create()
    server.start()
    try:
        yield server
    finally:
        if server.answers():
            server.stop()
        shutil.rmtree(directory, ignore_errors=True)


def test_postgres_stopped_nothing_acknowledged_meanwhile_all_stored_once_back(
        settings, own_postgres, tmp_path):
    migrate(own_postgres.url)
    settings = settings.model_copy(update={"database_url": PostgresDsn(own_postgres.url)})
    log_path = tmp_path / "consume.log"
    before, before_ids = messages(2_000)
    during, during_ids = messages(3_000)
    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: "consume_started" in log_of(log_path), message="consumer started")
    publish_in_transactions(settings, before)
    wait_until(lambda: stored_count(own_postgres.url) == 2_000, message="first part stored")

    own_postgres.stop()
    assert not own_postgres.answers()
    publish_in_transactions(settings, during)
    wait_until(lambda: log_of(log_path).count("postgres_retry") >= 2, timeout=30,
               message="the consumer to fail to reach Postgres")
    # Nothing acknowledged while Postgres is away: every message of the outage is still
    # with the broker, the prefetched ones unacknowledged, and it stays so. (A quorum queue
    # reports its counts to rabbitmqctl a few seconds late: the first look waits for them.)
    wait_until(lambda: sum(queue_counts(settings.smsq_queue)) == 3_000, timeout=15,
               message="the broker's counts of the outage's messages")
    for _ in range(3):
        ready, unacked = queue_counts(settings.smsq_queue)
        assert ready + unacked == 3_000 and unacked > 0
    assert not own_postgres.answers()

    own_postgres.start()
    wait_until(lambda: stored_count(own_postgres.url) == 5_000
               and queue_counts(settings.smsq_queue) == (0, 0), timeout=60,
               message="everything stored once Postgres is back")
    assert stop(consumer) == 0
    assert_stored_exactly_once(settings, before_ids | during_ids)



def test_the_prefetch_bounds_what_the_consumer_holds_while_postgres_is_away(
        settings, own_postgres, tmp_path):
    """Ten times the prefetch published during the outage: the consumer holds the prefetch,
    no more (memory stays bounded), and the rest waits in the broker."""
    migrate(own_postgres.url)
    prefetch, published = 50, 500
    settings = settings.model_copy(update={"database_url": PostgresDsn(own_postgres.url),
                                           "smsq_prefetch": prefetch,
                                           "smsq_ingest_batch_size": 10})
    log_path = tmp_path / "consume.log"
    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: "consume_started" in log_of(log_path), message="consumer started")
    own_postgres.stop()
    bodies, ids = messages(published)
    publish_in_transactions(settings, bodies)
    wait_until(lambda: queue_counts(settings.smsq_queue)[1] >= prefetch,
               message="the consumer to take its prefetch")
    wait_until(lambda: log_of(log_path).count("postgres_retry") >= 2, timeout=30,
               message="the consumer to fail to reach Postgres")
    for _ in range(3):  # and it stays so while the writers retry
        assert queue_counts(settings.smsq_queue) == (published - prefetch, prefetch)

    own_postgres.start()
    wait_until(lambda: stored_count(own_postgres.url) == published
               and queue_counts(settings.smsq_queue) == (0, 0), timeout=60,
               message="everything stored once Postgres is back")
    assert stop(consumer) == 0
    assert_stored_exactly_once(settings, ids)

# -- RabbitMQ connection closed ------------------------------------------------------------------

def test_rabbitmq_connection_closed_reconnects_and_loses_nothing(settings, tmp_path):
    log_path = tmp_path / "consume.log"
    bodies, published = messages(10_000)
    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: "consume_started" in log_of(log_path), message="consumer started")
    publisher = publish_in_background(settings, bodies)
    for closing in range(1, 3):
        wait_until(lambda: stored_count(settings.database_dsn) >= closing * 2_500, timeout=60,
                   message=f"progress before closing {closing}")
        assert close_amqp_connections_of(consumer.pid) == 1
        wait_until(lambda: log_of(log_path).count("consume_started") == closing + 1,
                   timeout=30, message="the consumer to reconnect")
    publisher.join()
    wait_until(lambda: stored_count(settings.database_dsn) == len(published)
               and queue_counts(settings.smsq_queue) == (0, 0), timeout=60,
               message="everything stored")
    assert stop(consumer) == 0
    assert log_of(log_path).count("rabbitmq_lost") == 2
    assert_stored_exactly_once(settings, published)


# -- SIGTERM -------------------------------------------------------------------------------------

def test_sigterm_exits_0_and_loses_nothing(settings, tmp_path):
    log_path = tmp_path / "consume.log"
    bodies, published = messages(20_000)
    declare_queues(settings)
    publish_in_transactions(settings, bodies)
    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: stored_count(settings.database_dsn) > 0, message="consuming")
    consumer.send_signal(signal.SIGTERM)
    assert consumer.wait(timeout=10) == 0
    assert "consume_stopped" in log_of(log_path)

    # Stopped mid-stream: each message is stored or back in the queue, never both (the
    # stored batch was acknowledged) and never neither (nothing acknowledged unstored).
    stored = set(stored_ids(settings.database_dsn))
    # A quorum queue reports its counts to rabbitmqctl a few seconds late: wait for counts
    # that add up (a message lost or stored twice never lets them).
    ready, unacked = wait_until(lambda: (counts := queue_counts(settings.smsq_queue))[1] == 0
                                and len(stored) + counts[0] == len(published) and counts,
                                message="the broker to take back what was held")
    assert 0 < len(stored) < len(published)
    assert len(stored) + ready == len(published)

    consumer = start_smsq(settings, "consume", log_path=log_path)
    wait_until(lambda: stored_count(settings.database_dsn) == len(published)
               and queue_counts(settings.smsq_queue) == (0, 0), message="the rest stored")
    assert stop(consumer) == 0
    assert_stored_exactly_once(settings, published)


def test_a_second_signal_exits_at_once(settings, tmp_path):
    """With the database hanging, the first SIGTERM waits for the batch; the second does not."""
    with socket.socket() as silent:  # accepts connections, never answers: a hung Postgres
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        # A connect timeout longer than the test: on a loaded machine the default 5 s could
        # run out before the first signal, and the consumer would exit on its own.
        hung_url = (f"postgresql://postgres@127.0.0.1:{silent.getsockname()[1]}/smsq"
                    "?connect_timeout=60")
        settings = settings.model_copy(update={"database_url": PostgresDsn(hung_url)})
        log_path = tmp_path / "consume.log"
        consumer = start_smsq(settings, "consume", log_path=log_path)
        wait_until(lambda: "consume_started" in log_of(log_path), message="consumer started")
        publish_in_transactions(settings, messages(1)[0])
        wait_until(lambda: queue_counts(settings.smsq_queue) == (0, 1), message="delivered")
        consumer.send_signal(signal.SIGTERM)
        wait_until(lambda: "stop_requested" in log_of(log_path), message="first signal seen")
        # Longer than the loop's idle wake (1 s), shorter than the writer's connect timeout
        # (60 s): a consumer that did not wait for its batch would have exited by now.
        time.sleep(1.5)
        assert consumer.poll() is None  # still waiting for the hung database
        consumer.send_signal(signal.SIGTERM)
        assert consumer.wait(timeout=5) == 1
        assert "stop_forced" in log_of(log_path)
    wait_until(lambda: queue_counts(settings.smsq_queue) == (1, 0),  # handed back, not lost
               message="the broker to take the message back")
