"""Benchmark of `smsq dispatch` (issue 3, item 10), against a fake Twilio this script starts.

    .venv/bin/python bench/dispatch.py                       # every section, about 4 minutes
    .venv/bin/python bench/dispatch.py --only pacing --pacing-seconds 20

Everything runs on this machine: its own database (created and dropped here), its own
exchange and queue, `smsq fake-twilio`, `smsq dispatch` and `smsq consume` as their own
processes on free ports. Times at the fake are its arrival times (CLOCK_MONOTONIC, which
every process on the host shares), so they are what Twilio would see.

Sections (targets from the issue):
  pacing    1 segment/s for 60 s: sent within +-1 of expected, no 1 s window above capacity
  senders   100 senders x 1/s, 200 ms fake latency: at least 98 sends/s
  overhead  no rate limit, zero-latency fake: at least 1,000 sends/s; baseline: the same
            twilio client, same threads, calling the fake directly (no database, no loop)
  idle      confirmed publish -> fake received, 200 single messages: p50 <= 20 ms, p99 <= 100 ms
  claim     the claim query with 1,000,000 pending rows: <= 5 ms and <= 20x the baseline, a
            primary-key read taking turns with it (median and worst of 5 rounds)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pika
import psycopg
from pydantic import AnyHttpUrl, SecretStr

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import calls_per_second, scratch_database  # noqa: E402
from bench.ingest import backend_cpu_seconds, cpu_seconds  # noqa: E402
from consumer.dispatch import claims  # noqa: E402
from consumer.dispatch.twilio_client import Outgoing, TwilioSender  # noqa: E402
from consumer.sandbox import FakeTwilioControl, spawn  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from tests.dispatch_support import most_in_any_window  # noqa: E402 - the tests' own measure

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
DEFAULT_SENDER = "+15005550006"
TO = "+14155550123"
SECTIONS = ("pacing", "senders", "overhead", "idle", "claim")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections of {', '.join(SECTIONS)}")
    parser.add_argument("--pacing-seconds", type=float, default=60.0)
    parser.add_argument("--claim-rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=3,
                        help="overhead: rounds of the bare client and smsq taking turns")
    args = parser.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    with scratch_database(f"smsq_bench_dispatch_{os.getpid()}") as dsn:
        for section in chosen:
            reset(dsn)
            print(f"\n== {section}", flush=True)
            if section == "pacing":
                bench_pacing(dsn, args.pacing_seconds)
            elif section == "senders":
                bench_senders(dsn)
            elif section == "overhead":
                bench_overhead(dsn, args.rounds)
            elif section == "idle":
                bench_idle_latency(dsn)
            elif section == "claim":
                bench_claim(dsn, args.claim_rows)
            else:
                parser.error(f"unknown section {section!r}")
    return 0


# -- the sections --------------------------------------------------------------------------------


def bench_pacing(dsn: str, seconds: float) -> None:
    insert_pending(dsn, int(seconds) + 20, senders=[""])
    with fake_twilio() as fake, dispatcher(dsn, fake, TWILIO_SMS_RATE="1", SMSQ_BURST="1"):
        first = wait_for(lambda: fake.messages(accepted_only=True), 30)[0]["received_monotonic"]
        time.sleep(max(0.0, first + seconds + 0.5 - time.monotonic()))
        received = fake.messages(accepted_only=True)
    times = [m["received_monotonic"] for m in received]
    sent = sum(1 for t in times if 0 < t - times[0] <= seconds)
    gaps = [b - a for a, b in zip(times, times[1:])]
    segments = [m["num_segments"] for m in received]
    print(f"rate 1 segment/s, capacity 1, over {seconds:.0f} s after the first send")
    print(f"  sent {sent}, expected {seconds:.0f} (target: within +-1)")
    print(f"  smallest gap between sends {min(gaps):.4f} s, largest {max(gaps):.4f} s")
    print(f"  most segments in any 1 s window: {most_in_any_window(times, weights=segments):g} "
          f"(target: <= capacity 1)")


def bench_senders(dsn: str, count: int = 100, seconds: float = 10.0) -> None:
    numbers = [f"+1202555{1000 + i}" for i in range(count)]
    insert_pending(dsn, count * int(seconds + 8), senders=numbers)
    with fake_twilio(latency_ms=200) as fake, dispatcher(
            dsn, fake, SMSQ_SENDERS=",".join(numbers), TWILIO_SMS_RATE="1", SMSQ_BURST="1"):
        first = wait_for(lambda: fake.messages(accepted_only=True), 30)[0]["received_monotonic"]
        time.sleep(max(0.0, first + 2 + seconds + 0.5 - time.monotonic()))
        times = [m["received_monotonic"] for m in fake.messages(accepted_only=True)]
    steady = [t for t in times if first + 2 <= t < first + 2 + seconds]
    print(f"{count} senders at 1/s each, fake latency 200 ms, "
          f"SMSQ_DISPATCH_CONCURRENCY={Settings(_env_file=None).smsq_dispatch_concurrency}")
    print(f"  aggregate {len(steady) / seconds:.1f} sends/s over {seconds:.0f} s "
          f"after the first 2 s (target: >= 98)")


def bench_overhead(dsn: str, rounds: int, seconds: float = 10.0) -> None:
    """Rounds taking turns: the bare client for `seconds / 2`, then smsq dispatch for
    `seconds` (a new process each round), with the CPU per send of each process."""
    concurrency = Settings(_env_file=None).smsq_dispatch_concurrency
    ratios, baselines, rates = [], [], []
    with fake_twilio_process() as (fake_process, fake):
        print(f"no rate limit, zero-latency fake, {concurrency} threads, {rounds} rounds "
              f"taking turns; CPU per send, us: client (the bench's process or smsq "
              f"dispatch), Postgres (dispatch's backends), the fake")
        for number in range(1, rounds + 1):
            client_cpu, fake_cpu = cpu_seconds(os.getpid()), cpu_seconds(fake_process.pid)
            baseline = raw_client_rate(fake, concurrency, seconds=seconds / 2)
            sent = baseline * seconds / 2
            print(f"  round {number}: baseline, raw twilio client -> fake: {baseline:.0f} "
                  f"calls/s; CPU {per_send(cpu_seconds(os.getpid()) - client_cpu, sent)} + "
                  f"{per_send(cpu_seconds(fake_process.pid) - fake_cpu, sent)}")
            fake.clear()
            # More than a round can send: a backlog that runs dry would end the round early.
            insert_pending(dsn, int(baseline * seconds * 1.5), senders=[""])
            rate, cpu = smsq_rate(dsn, fake, fake_process.pid, seconds)
            ratios.append(rate / baseline)
            baselines.append(baseline)
            rates.append(rate)
            done = rate * seconds
            print(f"  round {number}: smsq dispatch (claim, send, record): {rate:.0f} sends/s, "
                  f"{rate / baseline:.2f} of the baseline; CPU "
                  f"{per_send(cpu['dispatch'], done)} + {per_send(cpu['postgres'], done)} + "
                  f"{per_send(cpu['fake'], done)}")
            fake.clear()
    print(f"  smsq / baseline: median {statistics.median(ratios):.2f}, worst {min(ratios):.2f} "
          f"(target: >= 0.9); smsq median {statistics.median(rates):.0f} sends/s (target: "
          f">= 1000), baseline median {statistics.median(baselines):.0f} calls/s")


def smsq_rate(dsn: str, fake: FakeTwilioControl, fake_pid: int,
              seconds: float) -> tuple[float, dict]:
    """Sends per second of one smsq dispatch, from its first send, and the CPU seconds its
    process, its database backends and the fake spent meanwhile."""
    with dispatcher(dsn, fake, TWILIO_SMS_RATE="1000000", SMSQ_BURST="1000000") as process:
        wait_for(lambda: fake.stats().get("create"), 30)
        first, before = time.monotonic(), fake.stats().get("create", 0)
        cpu = {"dispatch": -cpu_seconds(process.pid),
               "postgres": -backend_cpu_seconds(dsn, "smsq dispatch"),
               "fake": -cpu_seconds(fake_pid)}
        time.sleep(seconds)
        done = fake.stats().get("create", 0) - before
        elapsed = time.monotonic() - first
        cpu["dispatch"] += cpu_seconds(process.pid)
        cpu["postgres"] += backend_cpu_seconds(dsn, "smsq dispatch")
        cpu["fake"] += cpu_seconds(fake_pid)
    return done / elapsed, cpu


def per_send(cpu: float, sends: float) -> str:
    return f"{cpu / sends * 1e6:.0f}" if sends else "-"


def bench_idle_latency(dsn: str, count: int = 200, gap: float = 0.05) -> None:
    names = {"SMSQ_EXCHANGE": f"bench.{os.getpid()}", "SMSQ_QUEUE": f"bench.{os.getpid()}.sms"}
    with fake_twilio() as fake, dispatcher(dsn, fake, TWILIO_SMS_RATE="100", SMSQ_BURST="1"), \
            smsq_process("consume", dsn, fake, **names), DueNotifications(dsn) as notified:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        try:
            channel = connection.channel()
            wait_for(lambda: queue_exists(names["SMSQ_QUEUE"]), 30)
            wait_for(lambda: senders_held(dsn), 30)  # idle, not starting: it holds its sender
            channel.confirm_delivery()
            published, confirms, ids, wall = {}, [], {}, {}
            start = time.time()
            for index in range(count):
                body = f"idle latency {index}"
                ids[body] = uuid.uuid4()
                message = {"id": str(ids[body]), "body": body, "priority": "high",
                           "sms": {"to_phone_number": TO}}
                published[body], wall[body] = time.monotonic(), time.time()
                channel.basic_publish(names["SMSQ_EXCHANGE"], "sms", json.dumps(message),
                                      pika.BasicProperties(delivery_mode=2), mandatory=True)
                confirms.append((time.monotonic() - published[body]) * 1000)
                time.sleep(gap)  # idle between messages: the bucket is full again
            wait_for(lambda: len(fake.messages(accepted_only=True)) >= count, 30)
            received = {m["body"]: m["received_monotonic"] for m in fake.messages()}
        finally:
            delete_amqp(channel, names)
            connection.close()
    latency = {body: (received[body] - at) * 1000 for body, at in published.items()}
    latencies = sorted(latency.values())
    print(f"{count} single high-priority messages, {gap * 1000:.0f} ms apart, through RabbitMQ, "
          f"smsq consume, Postgres, smsq dispatch")
    print(f"  publish (from the call, confirmed) -> fake received: "
          f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms, "
          f"max {latencies[-1]:.1f} ms (targets: p50 <= 20, p99 <= 100)")
    print(f"  baseline, the confirmed publish alone: p50 {statistics.median(confirms):.1f} ms")
    slowest = sorted(latency, key=latency.get, reverse=True)[:max(5, count // 40)]
    print("  where the slowest spent their time, ms: publish -> ingest's transaction began "
          "-> committed (its smsq_due seen by a listener) -> claimed -> at the fake")
    for body in slowest:
        at = wall[body] - start
        began, claimed = stage_times(dsn, ids[body])
        committed = next((t for t in notified.times if t >= began), float("nan"))
        print(f"    #{int(body.split()[-1]):<3} at {at:5.1f} s: {latency[body]:6.1f} = "
              f"{(began - wall[body]) * 1000:5.1f} + {(committed - began) * 1000:5.1f} + "
              f"{(claimed - committed) * 1000:5.1f} + "
              f"{latency[body] - (claimed - wall[body]) * 1000:5.1f}")


def stage_times(dsn: str, notification_id: uuid.UUID) -> tuple[float, float]:
    """When ingest's transaction storing it began (created_datetime is its now()), and when
    it was claimed (its pending -> processing event), wall clock."""
    with psycopg.connect(dsn) as conn:
        began, claimed = conn.execute(
            """SELECT extract(epoch FROM n.created_datetime),
                      extract(epoch FROM min(e.created_datetime))
               FROM notification n LEFT JOIN notification_event e
                    ON e.notification_id = n.id AND e.new_value = 'processing'
               WHERE n.id = %s GROUP BY n.id""", (notification_id,)).fetchone()
    return float(began), float(claimed)


class DueNotifications:
    """The wall-clock times at which the `smsq_due` notifications arrive (each commit of
    ingest sends one), heard as a dispatcher hears them."""

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg.connect(dsn, autocommit=True)
        self.conn.execute("LISTEN smsq_due")
        self.times: list[float] = []
        self.listening = True
        self.thread = threading.Thread(target=self._listen, daemon=True)

    def __enter__(self) -> DueNotifications:
        self.thread.start()
        return self

    def __exit__(self, *_exc) -> None:
        self.listening = False
        self.thread.join()
        self.conn.close()

    def _listen(self) -> None:
        while self.listening:
            for _ in self.conn.notifies(timeout=0.2):
                self.times.append(time.time())


def bench_claim(dsn: str, rows: int, rounds: int = 5, runs: int = 30) -> None:
    started = time.monotonic()
    insert_pending(dsn, rows, senders=[""], spread=True)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE notification")
        conn.execute("VACUUM ANALYZE sms_notification")
    print(f"{rows:,} pending rows of one sender, mixed priorities, 10% scheduled later "
          f"(loaded in {time.monotonic() - started:.0f} s)")
    with psycopg.connect(dsn, autocommit=True) as conn:  # autocommit, as the dispatcher's
        plan, executions = explain_claim(conn, runs)
        some_id = conn.execute("SELECT id FROM notification LIMIT 1").fetchone()[0]

        def claim() -> None:
            claims.claim_due(conn, "", "bench", 100, 60.0)

        def lookup() -> None:
            conn.execute("SELECT * FROM notification WHERE id = %s", (some_id,)).fetchall()

        interleaved(conn, runs, claim, lookup)  # warms the caches and prepared statements
        measured = [interleaved(conn, runs, claim, lookup) for _ in range(rounds)]
    print("  plan of the claim (LIMIT 100):")
    for line in plan:
        print("    " + line)
    uses_index = any("notification_due_idx" in line for line in plan)
    print(f"  uses notification_due_idx: {uses_index}")
    print(f"  server execution time: p50 {percentile(sorted(executions), 50):.2f} ms, "
          f"p95 {percentile(sorted(executions), 95):.2f} ms")
    print(f"  {rounds} rounds of {runs} claims of 100 rows as the dispatcher runs them (client "
          f"round trip), each followed by a primary-key read of one row (the baseline):")
    for claim_ms, lookup_ms in measured:
        print(f"    claim p50 {claim_ms:.2f} ms, read p50 {lookup_ms:.3f} ms: "
              f"{claim_ms / lookup_ms:.1f}x")
    ratios = sorted(claim_ms / lookup_ms for claim_ms, lookup_ms in measured)
    claim_p50 = statistics.median(claim_ms for claim_ms, _ in measured)
    print(f"  claim p50 {claim_p50:.2f} ms (target: <= 5); claim / baseline: "
          f"median {statistics.median(ratios):.1f}x, worst {ratios[-1]:.1f}x (target: <= 20x)")


def explain_claim(conn: psycopg.Connection, runs: int) -> tuple[list[str], list[float]]:
    """The last plan of the claim, with each run's server execution time in ms."""
    params = {"senders": [""], "limits": [100], "max_ranks": [2],
              "holder": "bench", "lease": 60.0}
    executions, plan = [], []
    for _ in range(runs):
        with conn.transaction(force_rollback=True):
            plan = [r[0] for r in conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) " + claims.CLAIM_DUE, params)]
        executions.append(float(plan[-1].split(":")[1].split()[0]))
    return plan, executions


# -- the pieces ------------------------------------------------------------------------------


def reset(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("TRUNCATE notification, dispatch_sender CASCADE")


def insert_pending(dsn: str, count: int, senders: list[str], spread: bool = False) -> None:
    """Pending rows, round-robin over `senders`; `spread` mixes priorities and publish times
    (10% in the next hour) as a real backlog would."""
    with psycopg.connect(dsn) as conn:
        conn.execute("""
            WITH n AS (
                INSERT INTO notification (id, body, priority, publish_datetime, sender)
                SELECT gen_random_uuid(), 'bench message ' || i,
                       CASE WHEN %(spread)s THEN (ARRAY['low', 'medium', 'high'])[1 + i %% 3]
                            ELSE 'low' END,
                       CASE WHEN %(spread)s AND i %% 10 = 0 THEN now() + interval '1 hour'
                            WHEN %(spread)s THEN now() - (i %% 86400) * interval '1 second'
                            ELSE now() - interval '1 second' END,
                       (%(senders)s::text[])[1 + i %% cardinality(%(senders)s::text[])]
                FROM generate_series(1, %(count)s) i
                RETURNING id)
            INSERT INTO sms_notification (notification_id, to_phone_number)
            SELECT id, %(to)s FROM n""",
                     {"count": count, "senders": senders, "spread": spread, "to": TO})
        # As autovacuum would soon: claims planned on the statistics of an emptier table
        # cost Postgres twice as much and more each round.
        conn.execute("ANALYZE notification, sms_notification")


def environment(dsn: str, fake: FakeTwilioControl, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env.update(DATABASE_URL=dsn, AMQP_URL=AMQP_URL, TWILIO_API_URL=fake.url,
               TWILIO_ACCOUNT_SID=fake.account_sid, TWILIO_AUTH_TOKEN=fake.auth_token,
               TWILIO_PHONE_NUMBER=DEFAULT_SENDER, SMSQ_LOG_LEVEL="WARNING")
    env.update(values)
    return env


@contextmanager
def fake_twilio(**config: float) -> Iterator[FakeTwilioControl]:
    with fake_twilio_process(**config) as (_process, fake):
        yield fake


@contextmanager
def fake_twilio_process(
        **config: float) -> Iterator[tuple[subprocess.Popen, FakeTwilioControl]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env["SMSQ_LOG_LEVEL"] = "WARNING"
    process, fake = spawn(env=env)
    try:
        if config:
            fake.configure(**config)
        yield process, fake
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)


@contextmanager
def smsq_process(verb: str, dsn: str, fake: FakeTwilioControl,
                 **values: str) -> Iterator[subprocess.Popen]:
    log = tempfile.NamedTemporaryFile(prefix=f"bench-{verb}-", suffix=".log", delete=False)
    process = subprocess.Popen([sys.executable, "-m", "consumer.cli", verb],
                               env=environment(dsn, fake, **values), cwd=tempfile.gettempdir(),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=20)
        if status != 0:
            print(f"  smsq {verb} exited with {status}; log: {log.name}", file=sys.stderr)


def dispatcher(dsn: str, fake: FakeTwilioControl, **values: str):
    return smsq_process("dispatch", dsn, fake, **values)


def raw_client_rate(fake: FakeTwilioControl, threads: int, seconds: float) -> float:
    """Messages created per second by the bare adapter from `threads` threads."""
    settings = Settings(_env_file=None, twilio_api_url=AnyHttpUrl(fake.url),
                        twilio_account_sid=fake.account_sid,
                        twilio_auth_token=SecretStr(fake.auth_token))
    sender = TwilioSender(settings, pool_size=threads)
    return calls_per_second(lambda: sender.send(Outgoing(TO, DEFAULT_SENDER, "baseline")),
                            threads, seconds)


def senders_held(dsn: str) -> int:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SELECT coalesce(sum(senders_held), 0) FROM dispatcher").fetchone()[0]


def queue_exists(queue: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    try:
        connection.channel().queue_declare(queue, passive=True)
        return True
    except pika.exceptions.ChannelClosedByBroker:
        return False
    finally:
        if connection.is_open:
            connection.close()


def delete_amqp(channel, names: dict[str, str]) -> None:
    for queue in (names["SMSQ_QUEUE"], names["SMSQ_QUEUE"] + ".dead"):
        channel.queue_delete(queue)
    channel.exchange_delete(names["SMSQ_EXCHANGE"])


def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {timeout} s waiting")
        time.sleep(0.01)
    return value


def interleaved(conn: psycopg.Connection, runs: int, call, baseline) -> tuple[float, float]:
    """p50 in ms of `call` and of `baseline`, taking turns `runs` times, so that both meet
    the same load of the machine; each in a transaction rolled back (the same rows every
    time)."""
    samples: tuple[list[float], list[float]] = ([], [])
    for _ in range(runs):
        for timed_call, times in ((call, samples[0]), (baseline, samples[1])):
            with conn.transaction(force_rollback=True):
                started = time.perf_counter()
                timed_call()
                times.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples[0]), statistics.median(samples[1])


def percentile(ordered: list[float], p: float) -> float:
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered)) - 1))
    return ordered[index]


if __name__ == "__main__":
    sys.exit(main())
