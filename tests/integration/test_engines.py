"""smsq past one machine, on real engines started here from the installed packages: a node
of a 3-node RabbitMQ cluster stopped under consume, and a Postgres standby promoted under
consume and dispatch. Each prints what it measured (`pytest -s` shows it)."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import pytest
from pydantic import PostgresDsn

from consumer.migrate import migrate
from tests.dispatch_support import dispatch_settings
from tests.engines import PostgresPair, RabbitCluster
from tests.support import (
    StreamPublisher,
    queue_depth,
    run_smsq,
    start_smsq,
    stop,
    wait_until,
)

pytestmark = pytest.mark.engines

STREAM = 20_000
CHUNK = 2_000  # messages per `smsq publish --file` run


@contextmanager
def started(engine_class, prefix: str):
    """An engine in a temporary directory of its own: stopped and deleted whatever happens."""
    base = Path(tempfile.mkdtemp(prefix=prefix))
    engine = engine_class(base)
    try:
        engine.start()
        yield engine
    finally:
        engine.close()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def rabbit_cluster() -> Iterator[RabbitCluster]:
    with started(RabbitCluster, "smsq-rabbit-cluster-") as cluster:
        yield cluster


@pytest.fixture
def postgres_pair() -> Iterator[PostgresPair]:
    with started(PostgresPair, "smsq-pg-pair-") as pair:
        yield pair


def stored_ids(dsn: str) -> list[str]:
    with psycopg.connect(dsn, connect_timeout=5) as conn:
        return [str(row[0]) for row in conn.execute("SELECT id FROM notification")]


def stored_count(dsn: str) -> int:
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            return conn.execute("SELECT count(*) FROM notification").fetchone()[0]
    except psycopg.OperationalError:
        return 0  # between two primaries


def brokers_reached(log: Path) -> list[int]:
    return [int(port) for port in re.findall(r"consume_started .*broker=127\.0\.0\.1:(\d+)",
                                             log.read_text())]


class ChunkPublisher(threading.Thread):
    """The stream through `smsq publish --file -`, a chunk per run; a run that fails (its
    broker went away) is run again whole: the ids repeat, and consume stores an id once."""

    def __init__(self, settings, lines: list[str]) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.chunks = [lines[i:i + CHUNK] for i in range(0, len(lines), CHUNK)]
        self.runs: list[tuple[float, float, int]] = []  # (start, end, exit status)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.chunks:
                self._publish(chunk)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            self.error = exc

    def _publish(self, chunk: list[str]) -> None:
        for _ in range(5):
            start = time.monotonic()
            done = run_smsq(self.settings, "publish", "--file", "-", stdin="\n".join(chunk))
            self.runs.append((start, time.monotonic(), done.returncode))
            if done.returncode == 0:
                return
        raise AssertionError(f"smsq publish failed five times: {done.stderr}")


def test_a_cluster_node_stopped_under_consume_loses_nothing_and_stores_nothing_twice(
        settings, rabbit_cluster, tmp_path):
    settings = settings.model_copy(update={"amqp_url": rabbit_cluster.amqp_url,
                                           "smsq_quorum_queues": True})
    lines = [json.dumps({"id": str(uuid.uuid4()), "body": f"cluster message {n}",
                         "sms": {"to_phone_number": "+14155550123"}}) for n in range(STREAM)]
    log = tmp_path / "consume.log"
    consume = start_smsq(settings, "consume", log_path=log)
    try:
        wait_until(lambda: brokers_reached(log), timeout=30, message="consume connected")
        first = rabbit_cluster.node_on_port(brokers_reached(log)[0])
        publisher = ChunkPublisher(settings, lines)
        started = time.monotonic()
        publisher.start()
        wait_until(lambda: stored_count(settings.database_dsn) >= STREAM // 4, timeout=120,
                   message="a quarter of the stream stored")
        stopped_at, stored_then = time.monotonic(), stored_count(settings.database_dsn)
        first.stop()
        wait_until(lambda: len(brokers_reached(log)) >= 2, timeout=60,
                   message="consume on another node")
        reconnected_after = time.monotonic() - stopped_at
        publisher.join(timeout=300)
        assert publisher.error is None, publisher.error
        wait_until(lambda: stored_count(settings.database_dsn) == STREAM, timeout=120,
                   message="the whole stream stored")
        elapsed = time.monotonic() - started
        wait_until(lambda: queue_depth(settings, settings.smsq_queue) == 0, timeout=30,
                   message="the queue drained")
        assert stop(consume) == 0
    finally:
        if consume.poll() is None:
            consume.kill()
    assert first.process.poll() is not None  # the fault happened: the node is down
    second = brokers_reached(log)[1]
    assert second != first.port
    ids = stored_ids(settings.database_dsn)
    assert len(ids) == len(set(ids)) == STREAM
    assert set(ids) == {json.loads(line)["id"] for line in lines}
    after_stop = [run for run in publisher.runs if run[0] > stopped_at and run[2] == 0]
    assert after_stop, "smsq publish went on after the node stopped"
    failed_runs = sum(1 for run in publisher.runs if run[2] != 0)
    duplicates = sum(int(n) for n in re.findall(r"duplicates_acknowledged count=(\d+)",
                                                log.read_text()))
    print(f"\nRabbitMQ cluster: {STREAM} messages in {elapsed:.1f} s "
          f"({STREAM / elapsed:.0f}/s stored); node {first.name} stopped after {stored_then} "
          f"stored; consume on node :{second} after {reconnected_after:.1f} s; "
          f"{failed_runs} `smsq publish` run(s) cut and run again, "
          f"{len(after_stop)} run(s) after the stop; {duplicates} redelivered or republished "
          f"message(s) acknowledged without storing again; every message stored once")


def test_a_promoted_standby_takes_over_nothing_lost_nothing_sent_twice(
        settings, postgres_pair, fake_twilio, tmp_path):
    database = "smsq_failover"
    postgres_pair.primary.execute(f"CREATE DATABASE {database}")
    url = postgres_pair.database_url(database)
    migrate(url)
    rate = 20.0
    settings = dispatch_settings(settings, fake_twilio, twilio_sms_rate=rate, smsq_burst=1.0,
                                 smsq_lease_seconds=5.0, smsq_dispatch_poll_seconds=1.0,
                                 # Few rows claimed ahead: those claimed when the primary
                                 # dies wait for their reconciliation (about 20 s).
                                 twilio_sms_batch_size=5, database_url=PostgresDsn(url))
    consume = start_smsq(settings, "consume", log_path=tmp_path / "consume.log")
    dispatch = start_smsq(settings, "dispatch", log_path=tmp_path / "dispatch.log")
    # Faster than the rate: a backlog builds, so the sends show the pacing, not the producer.
    publisher = StreamPublisher(settings, interval=1 / (1.5 * rate))
    try:
        publisher.start()
        wait_until(lambda: len(fake_twilio.messages(accepted_only=True)) >= 100, timeout=60,
                   message="a hundred sent before the failover")
        failed_over_at = time.time()
        postgres_pair.fail_over()
        promoted_after = time.time() - failed_over_at
        time.sleep(8)  # publishing and sending go on across the promotion
        publisher.stop()
        published = publisher.published
        wait_until(lambda: sent_bodies(fake_twilio) >= set(published.values()), timeout=150,
                   message="every published message sent")
        assert stop(dispatch) == 0
        assert stop(consume) == 0
    finally:
        for process in (consume, dispatch):
            if process.poll() is None:
                process.kill()
    assert not postgres_pair.primary.running()  # the fault happened: the old primary is gone
    assert postgres_pair.standby.execute("SELECT pg_is_in_recovery()") == [(False,)]
    for program in ("consume", "dispatch"):  # and both programs saw it
        assert "postgres_retry" in (tmp_path / f"{program}.log").read_text(), program
    assert set(stored_ids(settings.database_dsn)) == set(published)  # nothing acked was lost
    status = run_smsq(settings, "status", "--json")  # an operator's command finds it too
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["notifications"]["sent"]
    sends = fake_twilio.messages(accepted_only=True)
    counts = Counter(m["body"] for m in sends)
    assert [body for body, n in counts.items() if n > 1] == []  # nothing sent twice
    times = sorted(m["received_at"] for m in sends)
    # While the producer runs there is a backlog: a pause between two sends is the failover's.
    around = [t for t in times if failed_over_at - 2 <= t <= failed_over_at + 8]
    gap = max(b - a for a, b in zip(around, around[1:]))
    resumed = next(t for t in times if t > failed_over_at + promoted_after) - failed_over_at
    after = [t for t in times if t > failed_over_at]
    busiest = max(sum(1 for t in after if start <= t < start + 5) for start in after)
    # The bucket held across it: in any 5 s, 5 s of tokens and the burst, and one more for
    # the jitter of the arrivals measured at the fake (not at the dispatcher's release).
    assert busiest <= 5 * rate + settings.smsq_burst + 1, busiest
    window = [t for t in times if failed_over_at + resumed + 1 <= t < failed_over_at + resumed + 6]
    print(f"\nPostgres failover: promotion took {promoted_after:.2f} s; sending resumed "
          f"{resumed:.1f} s after the primary died (longest pause between two sends "
          f"{gap:.1f} s), then {len(window) / 5:.1f} sends/s at a rate of {rate:.0f}/s; "
          f"busiest 5 s after: {busiest} sends; {len(published)} published, all stored, "
          f"each sent once; the last (a row claimed before the failover, reconciled) "
          f"{times[-1] - failed_over_at:.0f} s after the failover")


def sent_bodies(fake) -> set[str]:
    return {m["body"] for m in fake.messages(accepted_only=True)}
