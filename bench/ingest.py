"""Ingest benchmark: `smsq consume` against the raw pika ceiling and a naive loop.

    .venv/bin/python bench/ingest.py                      # 100,000 messages
    .venv/bin/python bench/ingest.py --backlog 1000000    # and again with 1M rows stored

Everything is measured in the same run, on the same broker and database server, from a
queue filled beforehand with the same kind of messages:

- raw pika ceiling: consume and `basic_ack(multiple=True)` every batch, nothing else;
- naive loop: validate, insert, commit and ack one message at a time (slow, so it gets
  fewer messages and reports a rate);
- `smsq consume`, the real program in its own process with its default settings: from
  the moment it consumes to the commit of the last message. Commits are durable (the
  server's fsync and synchronous_commit are printed, and must be on).

The bench works in a database and on queues of its own, named after its process id, and
removes them at the end (also on Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from consumer.migrate import migrate  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from schemas.errors import parse_notification  # noqa: E402

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/smsq"
DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", "--messages", type=int, default=100_000,
                        help="messages for the ceiling and for smsq consume (default 100000)")
    parser.add_argument("--naive-messages", type=int, default=5_000,
                        help="messages for the naive loop, which is slow (default 5000)")
    parser.add_argument("--recipients", type=int, default=10_000,
                        help="distinct phone numbers the messages go to (default 10000)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="measure the ceiling and smsq this many times each, keep the best "
                             "(other load on the machine only ever slows a round down)")
    parser.add_argument("--backlog", type=int, default=0,
                        help="also measure smsq consume with this many rows already stored")
    return parser.parse_args(argv)


# -- the messages ------------------------------------------------------------------------------

def phone_numbers(count: int) -> list[str]:
    """Valid US numbers (555-01xx are fictional and not valid, so real-looking area codes)."""
    rng = random.Random(7)
    numbers = set()
    while len(numbers) < count:
        numbers.add(f"+1415{rng.randrange(2_000_000, 9_999_999)}")
    return sorted(numbers)


def message_bodies(count: int, recipients: int) -> tuple[list[bytes], list[uuid.UUID]]:
    """Typical one-time-code messages; ids in publish order."""
    rng = random.Random(42)
    numbers = phone_numbers(recipients)
    ids = [uuid.uuid4() for _ in range(count)]
    bodies = [
        json.dumps({
            "id": str(notification_id),
            "user_id": str(rng.randrange(1_000_000)),
            "body": f"Your one-time code is {rng.randrange(1_000_000):06d}. "
                    "It expires in 10 minutes.",
            "priority": rng.choice(("low", "medium", "high")),
            "sms": {"to_phone_number": rng.choice(numbers)},
        }).encode()
        for notification_id in ids
    ]
    return bodies, ids


# -- broker and database ----------------------------------------------------------------------

def connect_amqp(settings: Settings) -> pika.BlockingConnection:
    return pika.BlockingConnection(pika.URLParameters(settings.amqp_url))


def declare(settings: Settings) -> None:
    with connect_amqp(settings) as connection:
        channel = connection.channel()
        channel.exchange_declare(settings.smsq_exchange, exchange_type="topic", durable=True)
        for queue in (settings.smsq_queue, settings.dead_queue):
            channel.queue_declare(queue, durable=True)
        channel.queue_bind(settings.smsq_queue, settings.smsq_exchange, settings.smsq_routing_key)


def fill_queue(settings: Settings, bodies: list[bytes]) -> None:
    """Publish persistent messages as a fast producer would, then wait until all are queued."""
    properties = pika.BasicProperties(content_type="application/json", delivery_mode=2)
    with connect_amqp(settings) as connection:
        channel = connection.channel()
        channel.queue_purge(settings.smsq_queue)
        for body in bodies:
            channel.basic_publish(settings.smsq_exchange, settings.smsq_routing_key, body,
                                  properties)
        deadline = time.monotonic() + 120
        while queue_state(channel, settings.smsq_queue)[0] < len(bodies):
            if time.monotonic() > deadline:
                raise RuntimeError("the broker did not queue every published message")
            connection.sleep(0.05)


def queue_state(channel, queue: str) -> tuple[int, int]:
    """(messages ready, consumers) of a queue."""
    method = channel.queue_declare(queue, passive=True).method
    return method.message_count, method.consumer_count


def admin_dsn(server_url: str, dbname: str) -> str:
    info = psycopg.conninfo.conninfo_to_dict(server_url)
    info["dbname"] = dbname
    return psycopg.conninfo.make_conninfo(**info)


@contextmanager
def bench_database(server_url: str, name: str) -> Iterator[str]:
    admin = admin_dsn(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = server_url.rsplit("/", 1)[0] + "/" + name
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


@contextmanager
def bench_queues(settings: Settings) -> Iterator[None]:
    declare(settings)
    try:
        yield
    finally:
        with connect_amqp(settings) as connection:
            channel = connection.channel()
            for queue in (settings.smsq_queue, settings.dead_queue):
                channel.queue_delete(queue)
            channel.exchange_delete(settings.smsq_exchange)


def durability(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        fsync = conn.execute("SHOW fsync").fetchone()[0]
        sync_commit = conn.execute("SHOW synchronous_commit").fetchone()[0]
    if fsync != "on" or sync_commit != "on":
        raise SystemExit(f"commits would not be durable (fsync={fsync}, "
                         f"synchronous_commit={sync_commit}): refusing to measure")
    return f"fsync={fsync}, synchronous_commit={sync_commit}"


def clear_tables(dsn: str) -> None:
    """Empty, as after a fresh migration (TRUNCATE also forgets the statistics)."""
    with psycopg.connect(dsn) as conn:
        conn.execute("TRUNCATE notification, sms_notification, sms_temporary_media")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CHECKPOINT")


def store_backlog(dsn: str, rows: int) -> None:
    """`rows` notifications already stored (mostly sent, a tenth pending), in bulk."""
    with psycopg.connect(dsn) as conn:
        conn.execute("""
            INSERT INTO notification (id, user_id, body, priority, status, publish_datetime,
                                      sent_datetime)
            SELECT gen_random_uuid(), (i % 100000)::text, 'Backlog message ' || i,
                   (ARRAY['low', 'medium', 'high'])[1 + i % 3],
                   CASE WHEN i % 10 = 0 THEN 'pending' ELSE 'sent' END,
                   now() - make_interval(secs => i), now() - make_interval(secs => i)
            FROM generate_series(1, %s) AS i""", (rows,))
        conn.execute("""
            INSERT INTO sms_notification (notification_id, to_phone_number)
            SELECT id, '+1415' || (2000000 + abs(hashtext(id::text)) % 7000000)
            FROM notification""")
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE notification")
        conn.execute("VACUUM ANALYZE sms_notification")
        conn.execute("CHECKPOINT")


def stored(dsn: str, ids: list[uuid.UUID]) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT count(*) FROM notification WHERE id = ANY(%s)",
                            (ids,)).fetchone()[0]


# -- the three consumers ----------------------------------------------------------------------

def measure_ceiling(settings: Settings, count: int) -> float:
    """Seconds for a bare pika consumer to take `count` messages and ack them in batches."""
    connection = connect_amqp(settings)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=settings.smsq_prefetch)
    batch = settings.smsq_ingest_batch_size
    seen = 0

    def on_message(ch, method, _properties, _body) -> None:
        nonlocal seen
        seen += 1
        if seen % batch == 0 or seen == count:
            ch.basic_ack(method.delivery_tag, multiple=True)
        if seen == count:
            ch.stop_consuming()

    channel.basic_consume(settings.smsq_queue, on_message)
    started = time.perf_counter()
    channel.start_consuming()
    elapsed = time.perf_counter() - started
    connection.close()
    return elapsed


def measure_naive(settings: Settings, count: int) -> float:
    """Seconds for validate + insert + commit + ack, one message at a time."""
    connection = connect_amqp(settings)
    channel = connection.channel()
    channel.basic_qos(prefetch_count=settings.smsq_prefetch)
    db = psycopg.connect(settings.database_dsn)
    seen = 0

    def on_message(ch, method, properties, body) -> None:
        nonlocal seen
        n = parse_notification(body)
        db.execute(
            "INSERT INTO notification (id, user_id, body, priority) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING", (n.id, n.user_id, n.body, n.priority))
        db.execute("INSERT INTO sms_notification (notification_id, to_phone_number)"
                   " VALUES (%s, %s) ON CONFLICT DO NOTHING", (n.id, n.sms.to_phone_number))
        db.commit()
        ch.basic_ack(method.delivery_tag)
        seen += 1
        if seen == count:
            ch.stop_consuming()

    channel.basic_consume(settings.smsq_queue, on_message)
    started = time.perf_counter()
    channel.start_consuming()
    elapsed = time.perf_counter() - started
    connection.close()
    db.close()
    return elapsed


def measure_smsq(settings: Settings, last_id: uuid.UUID) -> tuple[float, int]:
    """(seconds from consuming to the last commit, peak RSS in bytes) of `smsq consume`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env.update(DATABASE_URL=settings.database_dsn, AMQP_URL=settings.amqp_url,
               SMSQ_EXCHANGE=settings.smsq_exchange, SMSQ_QUEUE=settings.smsq_queue,
               SMSQ_LOG_LEVEL="WARNING",
               SMSQ_INGEST_BATCH_SIZE=str(settings.smsq_ingest_batch_size),
               SMSQ_INGEST_BATCH_MS=str(settings.smsq_ingest_batch_ms),
               SMSQ_PREFETCH=str(settings.smsq_prefetch))
    process = subprocess.Popen([sys.executable, "-m", "consumer.cli", "consume"], env=env,
                               cwd=ROOT)
    try:
        started = wait_for_consumer(settings, process)
        committed = wait_for_commit(settings.database_dsn, last_id, process)
        peak_rss = peak_rss_of(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    if code != 0:
        raise RuntimeError(f"smsq consume exited with {code}")
    return committed - started, peak_rss


def wait_for_consumer(settings: Settings, process: subprocess.Popen) -> float:
    with connect_amqp(settings) as connection:
        channel = connection.channel()
        while queue_state(channel, settings.smsq_queue)[1] == 0:
            if process.poll() is not None:
                raise RuntimeError("smsq consume exited before consuming")
            time.sleep(0.002)
    return time.perf_counter()


def wait_for_commit(dsn: str, last_id: uuid.UUID, process: subprocess.Popen) -> float:
    """Queues are first in, first out and batches commit in order: the last id comes last."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not conn.execute("SELECT 1 FROM notification WHERE id = %s",
                               (last_id,)).fetchone():
            if process.poll() is not None:
                raise RuntimeError("smsq consume exited before storing everything")
            time.sleep(0.01)
    return time.perf_counter()


def peak_rss_of(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc")


# -- the run ----------------------------------------------------------------------------------

def run(args: argparse.Namespace, settings: Settings) -> None:
    print(f"database: {durability(settings.database_dsn)}; {os.cpu_count()} CPUs; "
          f"{args.messages:,} messages to {args.recipients:,} recipients; batch "
          f"{settings.smsq_ingest_batch_size}, prefetch {settings.smsq_prefetch}; best of "
          f"{args.rounds} rounds, ceiling and smsq taking turns", flush=True)
    bodies, ids = message_bodies(args.messages, args.recipients)

    ceilings, rates, rss = [], [], 0
    for _ in range(args.rounds):
        fill_queue(settings, bodies)
        ceilings.append(args.messages / measure_ceiling(settings, args.messages))
        clear_tables(settings.database_dsn)
        rate, peak = smsq_rate(settings, bodies, ids)
        rates.append(rate)
        rss = max(rss, peak)
        print(f"  round {len(rates)}: ceiling {ceilings[-1]:,.0f} msg/s, "
              f"smsq consume {rate:,.0f} msg/s", flush=True)
    ceiling, rate = max(ceilings), max(rates)

    clear_tables(settings.database_dsn)
    naive_bodies = bodies[: args.naive_messages]
    fill_queue(settings, naive_bodies)
    naive = args.naive_messages / measure_naive(settings, args.naive_messages)

    print(f"raw pika ceiling      {ceiling:10,.0f} msg/s")
    print(f"naive loop            {naive:10,.0f} msg/s  ({args.naive_messages:,} messages)")
    print(f"smsq consume          {rate:10,.0f} msg/s")
    print(f"smsq / ceiling        {rate / ceiling:10.2f} x   (target >= 0.75)")
    print(f"smsq / naive          {rate / naive:10.1f} x   (target >= 15)")
    print(f"peak RSS              {rss / 2**20:10.1f} MB  (target < 100)", flush=True)

    if args.backlog:
        clear_tables(settings.database_dsn)
        started = time.perf_counter()
        store_backlog(settings.database_dsn, args.backlog)
        print(f"backlog of {args.backlog:,} rows stored in "
              f"{time.perf_counter() - started:.0f} s", flush=True)
        backlog_rates = []
        for _ in range(args.rounds):
            backlog_rate, peak = smsq_rate(settings, bodies, ids)
            backlog_rates.append(backlog_rate)
            delete_messages(settings.database_dsn, ids)
            print(f"  round {len(backlog_rates)}: smsq consume {backlog_rate:,.0f} msg/s "
                  f"with the backlog", flush=True)
        backlog_rate = max(backlog_rates)
        print(f"smsq consume, backlog {backlog_rate:10,.0f} msg/s  (peak RSS "
              f"{peak / 2**20:.1f} MB)")
        print(f"backlog / empty       {backlog_rate / rate:10.2f} x   (target >= 0.80)")


def delete_messages(dsn: str, ids: list[uuid.UUID]) -> None:
    """Take the measured messages out again, leaving the backlog as it was."""
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM notification WHERE id = ANY(%s)", (ids,))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM notification")
        conn.execute("VACUUM sms_notification")
        conn.execute("CHECKPOINT")


def smsq_rate(settings: Settings, bodies: list[bytes], ids: list[uuid.UUID]) -> tuple[float, int]:
    fill_queue(settings, bodies)
    seconds, rss = measure_smsq(settings, ids[-1])
    found = stored(settings.database_dsn, ids)
    if found != len(ids):
        raise RuntimeError(f"smsq consume stored {found} of {len(ids)} messages")
    return len(ids) / seconds, rss


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    server_url = os.environ.get("DATABASE_URL", DEFAULT_DATABASE_URL)
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with bench_database(server_url, f"smsq_bench_{suffix}") as database_url:
        settings = Settings(_env_file=None, database_url=database_url, amqp_url=amqp_url,
                            smsq_exchange=f"bench.{suffix}", smsq_queue=f"bench.{suffix}.sms")
        with bench_queues(settings):
            run(args, settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
