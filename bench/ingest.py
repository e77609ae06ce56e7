"""Ingest benchmark: `smsq consume` against the raw pika ceiling and a naive loop.

    .venv/bin/python bench/ingest.py                      # 100,000 messages
    .venv/bin/python bench/ingest.py --backlog 1000000    # and again with 1M rows stored

Everything is measured in the same run, on the same broker and database server, from a
queue filled beforehand with the same kind of messages:

- raw pika ceiling: consume and `basic_ack(multiple=True)` every batch, nothing else;
- reader ceiling: the same, reading the deliveries with smsq's delivery reader, as smsq
  does (faster than stock pika, so a fairer ceiling for smsq);
- naive loop: validate, insert, commit and ack one message at a time (slow, so it gets
  fewer messages and reports a rate);
- `smsq consume`, the real program in its own process with its default settings: from
  the moment it consumes to the commit of the last message. Commits are durable (the
  server's fsync and synchronous_commit are printed, and must be on).

It also prints the CPU each process spends per message, and what that allows at best: the
rate at which smsq's CPU per message would keep every CPU of the machine busy, as a ratio
to the ceiling ("reachable / ceiling"). The broker and the database share these CPUs.

The bench works in a database and on queues of its own, named after its process id, and
removes them at the end (also on Ctrl-C). Its queues are declared by smsq's own code, as
`smsq consume` declares them: quorum queues, or classic ones with `--classic-queues` (then
smsq runs with SMSQ_QUORUM_QUEUES=false, and the ceilings read from classic queues too).
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
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psycopg
from pika.adapters.blocking_connection import BlockingChannel
from pydantic import PostgresDsn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import scratch_database  # noqa: E402
from consumer import amqp  # noqa: E402
from consumer.ingest.delivery_reader import DeliveryReader  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from schemas.errors import parse_notification  # noqa: E402

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
                        help="rounds of ceiling, smsq (and smsq with the backlog) taking turns; "
                             "ratios are taken within each round")
    parser.add_argument("--backlog", type=int, default=0,
                        help="also measure smsq consume, in each round, on a database where "
                             "this many rows are already stored")
    parser.add_argument("--classic-queues", action="store_true",
                        help="classic queues instead of quorum ones, for the ceilings and "
                             "for smsq (SMSQ_QUORUM_QUEUES=false)")
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
    """The queues as `smsq consume` declares them (which refuses a queue of another kind)."""
    with connect_amqp(settings) as connection:
        amqp.declare_topology(connection.channel(), settings)


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
        conn.execute("TRUNCATE notification, sms_notification, sms_temporary_media CASCADE")


def store_backlog(dsn: str, rows: int) -> None:
    """`rows` notifications already stored (mostly sent, a tenth pending), in bulk."""
    with psycopg.connect(dsn) as conn:
        conn.execute("""
            INSERT INTO notification (id, user_id, body, priority, status, publish_datetime,
                                      sent_datetime)
            SELECT gen_random_uuid(), (i %% 100000)::text, 'Backlog message ' || i,
                   (ARRAY['low', 'medium', 'high'])[1 + i %% 3],
                   CASE WHEN i %% 10 = 0 THEN 'pending' ELSE 'sent' END,
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


# -- CPU accounting ---------------------------------------------------------------------------

def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process on this machine (0 when it cannot be read)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rabbitmq_pid() -> int | None:
    """The local broker's Erlang VM, if it runs here (its CPU includes everyone's traffic)."""
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"beam.smp" in (entry / "cmdline").read_bytes():
                return int(entry.name)
        except OSError:
            continue
    return None


def backend_cpu_seconds(dsn: str, application_name: str) -> float:
    """CPU of the database's backends whose application name starts with `application_name`
    (consume has a few writers; dispatch a work, a lock, a listen and a price connection)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE starts_with(application_name, %s)"
            " AND datname = current_database()", (application_name,)).fetchall()
    return sum(cpu_seconds(pid) for (pid,) in rows)


@dataclass
class Measurement:
    messages: int
    seconds: float
    cpu: dict[str, float] = field(default_factory=dict)  # process -> CPU seconds
    peak_rss: int = 0

    @property
    def rate(self) -> float:
        return self.messages / self.seconds

    def cpu_micros_per_message(self, process: str) -> float:
        return self.cpu.get(process, 0.0) / self.messages * 1e6


# -- the three consumers ----------------------------------------------------------------------

def consume_in_process(settings: Settings, count: int, on_message) -> Measurement:
    """Run a pika consumer here until `on_message` has stopped it; time and CPU of it."""
    with consuming_channel(settings) as (_connection, channel):
        channel.basic_consume(settings.smsq_queue, on_message)
        return timed(count, channel.start_consuming)


@contextmanager
def consuming_channel(
        settings: Settings) -> Iterator[tuple[pika.BlockingConnection, BlockingChannel]]:
    """A connection and a channel with the consumer's prefetch, closed at the end."""
    connection = connect_amqp(settings)
    try:
        channel = connection.channel()
        channel.basic_qos(prefetch_count=settings.smsq_prefetch)
        yield connection, channel
    finally:
        connection.close()


def timed(count: int, consume) -> Measurement:
    """Time `consume()`, and the CPU this process and the broker spend on it."""
    broker = rabbitmq_pid()
    broker_cpu, own_cpu = cpu_seconds(broker), time.process_time()
    started = time.perf_counter()
    consume()
    elapsed = time.perf_counter() - started
    cpu = {"python": time.process_time() - own_cpu, "rabbitmq": cpu_seconds(broker) - broker_cpu}
    return Measurement(count, elapsed, cpu)


def measure_ceiling(settings: Settings, count: int) -> Measurement:
    """A bare pika consumer: take `count` messages and ack them in batches, nothing else."""
    batch = settings.smsq_ingest_batch_size
    seen = 0

    def on_message(channel, method, _properties, _body) -> None:
        nonlocal seen
        seen += 1
        if seen % batch == 0 or seen == count:
            channel.basic_ack(method.delivery_tag, multiple=True)
        if seen == count:
            channel.stop_consuming()

    return consume_in_process(settings, count, on_message)


def measure_reader_ceiling(settings: Settings, count: int) -> Measurement:
    """The bare consumer again, its deliveries read by smsq's delivery reader."""
    batch = settings.smsq_ingest_batch_size
    with consuming_channel(settings) as (connection, channel):
        tag = f"bench-{uuid.uuid4().hex}"
        reader = DeliveryReader.attach(connection, channel, tag)
        channel.basic_consume(settings.smsq_queue, lambda *_: None, consumer_tag=tag)

        def consume() -> None:
            seen = 0
            while seen < count:
                connection.process_data_events(time_limit=1)
                for delivery_tag, *_ in reader.take():
                    seen += 1
                    if seen % batch == 0 or seen == count:
                        channel.basic_ack(delivery_tag, multiple=True)

        return timed(count, consume)


def measure_naive(settings: Settings, count: int) -> Measurement:
    """Validate, insert, commit and ack, one message at a time."""
    db = psycopg.connect(settings.database_dsn, application_name="smsq bench naive")
    seen = 0

    def on_message(channel, method, _properties, body) -> None:
        nonlocal seen
        n = parse_notification(body)
        db.execute(
            "INSERT INTO notification (id, user_id, body, priority) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO NOTHING", (n.id, n.user_id, n.body, n.priority))
        db.execute("INSERT INTO sms_notification (notification_id, to_phone_number)"
                   " VALUES (%s, %s) ON CONFLICT DO NOTHING", (n.id, n.sms.to_phone_number))
        db.commit()
        channel.basic_ack(method.delivery_tag)
        seen += 1
        if seen == count:
            channel.stop_consuming()

    try:
        measurement = consume_in_process(settings, count, on_message)
        measurement.cpu["postgres"] = backend_cpu_seconds(settings.database_dsn,
                                                          "smsq bench naive")
    finally:
        db.close()
    return measurement


def measure_smsq(settings: Settings, count: int, last_id: uuid.UUID) -> Measurement:
    """`smsq consume` in its own process: from consuming to the commit of the last message."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env.update(DATABASE_URL=settings.database_dsn, AMQP_URL=settings.amqp_url,
               SMSQ_EXCHANGE=settings.smsq_exchange, SMSQ_QUEUE=settings.smsq_queue,
               SMSQ_QUORUM_QUEUES=str(settings.smsq_quorum_queues).lower(),
               SMSQ_LOG_LEVEL="WARNING",
               SMSQ_INGEST_BATCH_SIZE=str(settings.smsq_ingest_batch_size),
               SMSQ_INGEST_BATCH_MS=str(settings.smsq_ingest_batch_ms),
               SMSQ_INGEST_WRITERS=str(settings.smsq_ingest_writers),
               SMSQ_PREFETCH=str(settings.smsq_prefetch))
    process = subprocess.Popen([sys.executable, "-m", "consumer.cli", "consume"], env=env,
                               cwd=ROOT)
    broker = rabbitmq_pid()
    try:
        started = wait_for_consumer(settings, process)
        consumer_cpu, broker_cpu = cpu_seconds(process.pid), cpu_seconds(broker)
        committed = wait_for_commit(settings.database_dsn, last_id, process)
        # The backends were born with the consumer's first batches: all their CPU is the run's.
        cpu = {"python": cpu_seconds(process.pid) - consumer_cpu,
               "postgres": backend_cpu_seconds(settings.database_dsn, "smsq consume"),
               "rabbitmq": cpu_seconds(broker) - broker_cpu}
        peak_rss = peak_rss_of(process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        code = process.wait(timeout=30)
    if code != 0:
        raise RuntimeError(f"smsq consume exited with {code}")
    return Measurement(count, committed - started, cpu, peak_rss)


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

def run(args: argparse.Namespace, settings: Settings, backlog_settings: Settings | None) -> None:
    print(f"database: {durability(settings.database_dsn)}; {os.cpu_count()} CPUs; "
          f"{args.messages:,} messages to {args.recipients:,} recipients; batch "
          f"{settings.smsq_ingest_batch_size}, prefetch {settings.smsq_prefetch}; "
          f"{'quorum' if settings.smsq_quorum_queues else 'classic'} queues; "
          f"{args.rounds} rounds, taking turns (the machine may be shared)", flush=True)
    bodies, ids = message_bodies(args.messages, args.recipients)
    if backlog_settings is not None:
        started = time.perf_counter()
        store_backlog(backlog_settings.database_dsn, args.backlog)
        print(f"backlog of {args.backlog:,} rows stored in "
              f"{time.perf_counter() - started:.0f} s, in a database of its own", flush=True)

    ceilings, reader_ceilings, smsqs, backlogs = [], [], [], []
    for round_number in range(1, args.rounds + 1):
        fill_queue(settings, bodies)
        ceilings.append(measure_ceiling(settings, args.messages))
        fill_queue(settings, bodies)
        reader_ceilings.append(measure_reader_ceiling(settings, args.messages))
        smsqs.append(smsq_run(settings, bodies, ids))
        line = (f"  round {round_number}: ceiling {ceilings[-1].rate:,.0f} msg/s, "
                f"reader ceiling {reader_ceilings[-1].rate:,.0f} msg/s, "
                f"smsq consume {smsqs[-1].rate:,.0f} msg/s "
                f"({smsqs[-1].rate / ceilings[-1].rate:.2f}x the ceiling; CPU per message "
                f"{total_cpu(smsqs[-1]) / total_cpu(ceilings[-1]):.2f}x)")
        if backlog_settings is not None:
            backlogs.append(smsq_run(backlog_settings, bodies, ids, clear=False))
            delete_messages(backlog_settings.database_dsn, ids)
            line += f", with the backlog {backlogs[-1].rate:,.0f} msg/s"
        print(line, flush=True)
    ceiling, reader_ceiling, smsq = median(ceilings), median(reader_ceilings), median(smsqs)

    clear_tables(settings.database_dsn)
    fill_queue(settings, bodies[: args.naive_messages])
    naive = measure_naive(settings, args.naive_messages)

    print(f"medians of {args.rounds} rounds (the rounds take turns, so a busy moment of the "
          "machine slows one round of each):")
    print(f"raw pika ceiling      {ceiling.rate:10,.0f} msg/s")
    print(f"reader ceiling        {reader_ceiling.rate:10,.0f} msg/s  (the same, read as smsq reads)")
    print(f"naive loop            {naive.rate:10,.0f} msg/s  ({args.naive_messages:,} messages)")
    print(f"smsq consume          {smsq.rate:10,.0f} msg/s  (published to committed)")
    print_ratios("smsq / ceiling", [s.rate / c.rate for s, c in zip(smsqs, ceilings)],
                 "(target >= 0.75 in every round)")
    print_ratios("CPU / ceiling's", [total_cpu(s) / total_cpu(c) for s, c in zip(smsqs, ceilings)],
                 "(CPU per stored message, all processes; target <= 1.3)", higher_is_better=False)
    print(f"smsq / reader ceiling {smsq.rate / reader_ceiling.rate:10.2f} x")
    print(f"smsq / naive          {smsq.rate / naive.rate:10.1f} x   (target >= 15)")
    reachable = cpu_bound(smsq, os.cpu_count() or 1) / ceiling.rate
    print(f"reachable / ceiling   {reachable:10.2f} x   (smsq's CPU per message, every CPU busy)")
    peak_rss = max(m.peak_rss for m in smsqs + backlogs)
    print(f"peak RSS              {peak_rss / 2**20:10.1f} MB  (target < 100)")
    if backlogs:
        print_ratios("backlog / empty", [b.rate / s.rate for b, s in zip(backlogs, smsqs)],
                     f"({args.backlog:,} rows stored; target >= 0.80)")
    print_cpu({"raw pika ceiling": ceiling, "reader ceiling": reader_ceiling,
               "naive loop": naive, "smsq consume": smsq},
              os.cpu_count() or 1)


def median(measurements: list[Measurement]) -> Measurement:
    """The round of median rate: other load on the machine only ever slows a round down,
    so the best flatters and the worst is the machine's; both are printed as ratios."""
    return sorted(measurements, key=lambda m: m.rate)[len(measurements) // 2]


def print_ratios(name: str, ratios: list[float], target: str,
                 higher_is_better: bool = True) -> None:
    """A ratio of each round against its own baseline: its median, worst and best."""
    ordered = sorted(ratios, reverse=not higher_is_better)  # worst first
    print(f"{name:<21} {ordered[len(ordered) // 2]:10.2f} x   median; worst {ordered[0]:.2f}, "
          f"best {ordered[-1]:.2f} {target}")


def total_cpu(m: Measurement) -> float:
    """CPU per message of every process, microseconds."""
    return sum(m.cpu_micros_per_message(p) for p in ("python", "postgres", "rabbitmq"))


def cpu_bound(m: Measurement, cpus: int) -> float:
    """The rate at which `m`'s CPU per message (all processes) would keep every CPU busy."""
    return cpus * 1e6 / total_cpu(m)


def print_cpu(measurements: dict[str, Measurement], cpus: int) -> None:
    """Where the CPU goes, per message: what bounds each rate on a machine this size."""
    print(f"CPU per message, us   {'python':>8}{'postgres':>10}{'rabbitmq':>10}{'total':>8}"
          f"   bound on {cpus} CPUs")
    for name, m in measurements.items():
        parts = [m.cpu_micros_per_message(p) for p in ("python", "postgres", "rabbitmq")]
        print(f"  {name:<19}" + "".join(f"{v:>{w}.1f}" for v, w in zip(parts, (8, 10, 10)))
              + f"{sum(parts):>8.1f}   {cpu_bound(m, cpus):,.0f} msg/s")
    print("  (rabbitmq: the whole broker, shared with anything else running on it)")


def delete_messages(dsn: str, ids: list[uuid.UUID]) -> None:
    """Take the measured messages out again, leaving the backlog as it was.

    No CHECKPOINT here: right after one, the first write to each page of the big indexes
    logs the whole page, a cost a running system spreads over minutes, not seconds.
    """
    with psycopg.connect(dsn) as conn:
        conn.execute("DELETE FROM notification WHERE id = ANY(%s)", (ids,))
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM notification")
        conn.execute("VACUUM sms_notification")


def smsq_run(settings: Settings, bodies: list[bytes], ids: list[uuid.UUID],
             clear: bool = True) -> Measurement:
    if clear:
        clear_tables(settings.database_dsn)
    fill_queue(settings, bodies)
    measurement = measure_smsq(settings, len(ids), ids[-1])
    found = stored(settings.database_dsn, ids)
    if found != len(ids):
        raise RuntimeError(f"smsq consume stored {found} of {len(ids)} messages")
    return measurement


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    amqp_url = os.environ.get("AMQP_URL", DEFAULT_AMQP_URL)
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    with ExitStack() as cleanup:
        database_url = cleanup.enter_context(scratch_database(f"smsq_bench_{suffix}"))
        settings = Settings(_env_file=None, database_url=database_url, amqp_url=amqp_url,
                            smsq_exchange=f"bench.{suffix}", smsq_queue=f"bench.{suffix}.sms",
                            smsq_quorum_queues=not args.classic_queues)
        backlog_settings = None
        if args.backlog:
            backlog_url = cleanup.enter_context(
                scratch_database(f"smsq_bench_{suffix}_backlog"))
            backlog_settings = settings.model_copy(
                update={"database_url": PostgresDsn(backlog_url)})
        cleanup.enter_context(bench_queues(settings))
        run(args, settings, backlog_settings)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
