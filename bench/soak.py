"""Soak: smsq consume and smsq dispatch for half an hour under a steady load and Twilio's faults.

    .venv/bin/python bench/soak.py --minutes 30      # not in CI: a manual check

Everything runs on this machine, in a database and on queues of its own (removed at the end):
50 senders at 1 message/s each, a publisher sending a steady 80% of that, and the sandbox
(`smsq fake-twilio`) with 1% of creations answered 500 after the message was created, 1%
answered later than the dispatcher's read timeout, and a minute of 20003 (the account's token
refused) in the middle. `smsq consume` is restarted once (at 30% of the time), `smsq dispatch`
once (at 60%), each with SIGTERM, as a deploy does. No `smsq serve` runs: the count deltas
must stay few without it.

Every minute it prints each program's RSS and open file descriptors, the tables' and their
indexes' sizes, dead tuples, the backlog and the send rate. At the end, once the backlog has
drained: messages lost (published, confirmed, never created at the sandbox), sent twice
(created more than once), and the growth of RSS and descriptors from each program's fifth
minute (after a restart: of its new life) to its last, descriptors also as the medians of the
first and last five samples (target: nothing lost or doubled, RSS and descriptors flat within
10%).
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pika
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import scratch_database  # noqa: E402
from bench.ingest import phone_numbers  # noqa: E402
from consumer.sandbox import FakeTwilioControl, spawn  # noqa: E402

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2F")
TABLES = ("notification", "sms_notification", "notification_event", "notification_count_delta")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--senders", type=int, default=50)
    parser.add_argument("--load", type=float, default=0.8,
                        help="published messages per second, as a share of the senders' rate")
    parser.add_argument("--read-timeout", type=float, default=2.0,
                        help="the dispatcher's Twilio read timeout, seconds (the slow fault "
                             "answers after twice this)")
    parser.add_argument("--drain-minutes", type=float, default=10.0,
                        help="at most this long to wait for the backlog to drain at the end")
    return parser.parse_args(argv)


# -- the programs ----------------------------------------------------------------------------


@dataclass
class Program:
    """One smsq process, restartable; its lives' samples of (minute, RSS bytes, descriptors)."""

    name: str
    command: list[str]
    env: dict[str, str]
    process: subprocess.Popen | None = None
    lives: list[list[tuple[float, int, int]]] = field(default_factory=list)

    def start(self) -> None:
        log = tempfile.NamedTemporaryFile(prefix=f"soak-{self.name}-", suffix=".log",
                                          delete=False)
        self.process = subprocess.Popen(self.command, env=self.env, stdout=log,
                                        stderr=subprocess.STDOUT, cwd=tempfile.gettempdir())
        self.log = log.name
        self.lives.append([])

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            status = self.process.wait(timeout=60)
            if status != 0:
                print(f"  {self.name} exited with {status}; log {self.log}", flush=True)

    def restart(self) -> None:
        self.stop()
        self.start()

    def sample(self, minute: float) -> tuple[int, int]:
        pid = self.process.pid
        rss = resident_bytes(pid)
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        self.lives[-1].append((minute, rss, fds))
        return rss, fds


def resident_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def program_env(dsn: str, fake: FakeTwilioControl, names: dict[str, str], senders: list[str],
                read_timeout: float) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env.update(names, DATABASE_URL=dsn, AMQP_URL=AMQP_URL, TWILIO_API_URL=fake.url,
               TWILIO_ACCOUNT_SID=fake.account_sid, TWILIO_AUTH_TOKEN=fake.auth_token,
               TWILIO_PHONE_NUMBER=senders[0], SMSQ_SENDERS=",".join(senders),
               TWILIO_SMS_RATE="1", SMSQ_BURST="1", SMSQ_LOG_LEVEL="WARNING",
               SMSQ_TWILIO_READ_TIMEOUT=str(read_timeout), SMSQ_METRICS_PORT="0")
    return env


# -- the publisher ---------------------------------------------------------------------------


class Publisher(threading.Thread):
    """Publishes at a steady rate with confirms; remembers every confirmed id."""

    def __init__(self, names: dict[str, str], rate: float) -> None:
        super().__init__(daemon=True)
        self.names, self.rate = names, rate
        self.confirmed: list[str] = []
        self.stopping = threading.Event()
        self.numbers = phone_numbers(5_000)

    def run(self) -> None:
        connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
        channel = connection.channel()
        channel.confirm_delivery()
        started, sent = time.monotonic(), 0
        while not self.stopping.is_set():
            notification_id = str(uuid.uuid4())
            message = {"id": notification_id, "body": f"soak {notification_id}",
                       "sms": {"to_phone_number": self.numbers[sent % len(self.numbers)]}}
            try:
                channel.basic_publish(self.names["SMSQ_EXCHANGE"], "sms", json.dumps(message),
                                      pika.BasicProperties(delivery_mode=2), mandatory=True)
                self.confirmed.append(notification_id)
            except pika.exceptions.UnroutableError:  # before consume declared the queue
                pass
            sent += 1
            connection.sleep(max(0.0, started + sent / self.rate - time.monotonic()))
        connection.close()


# -- what the sandbox received ---------------------------------------------------------------


class Creations:
    """Message creations the sandbox accepted, by notification id, read incrementally."""

    def __init__(self, fake: FakeTwilioControl) -> None:
        self.fake = fake
        self.seq = 0
        self.times: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()

    def poll(self) -> int:
        new = self.fake.messages(after=self.seq)
        for message in new:
            self.seq = max(self.seq, message["seq"])
            self.faults[message.get("fault") or "none"] += 1
            if message["sid"] is not None:
                self.times[message["body"].removeprefix("soak ")] += 1
        return sum(1 for m in new if m["sid"] is not None)


# -- the database ----------------------------------------------------------------------------


def autovacuum_is_off(dsn: str) -> bool:
    with psycopg.connect(dsn) as conn:
        return conn.execute("SHOW autovacuum").fetchone()[0] == "off"


def vacuum(dsn: str) -> None:
    """What autovacuum would do, where the server has it off (a test server, say)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for table in TABLES:
            conn.execute(f"VACUUM (ANALYZE) {table}")


def database_state(dsn: str) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        sizes = {table: conn.execute(
            "SELECT pg_relation_size(%s::regclass), pg_indexes_size(%s::regclass)",
            (table, table)).fetchone() for table in TABLES}
        dead = dict(conn.execute(
            "SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE relname = ANY(%s)",
            (list(TABLES),)).fetchall())
        backlog = conn.execute("SELECT count(*) FROM notification "
                               "WHERE status IN ('pending', 'processing')").fetchone()[0]
        statuses = dict(conn.execute(
            "SELECT status, count(*) FROM notification GROUP BY 1").fetchall())
        deltas = conn.execute("SELECT count(*) FROM notification_count_delta").fetchone()[0]
    return {"sizes": sizes, "dead": dead, "backlog": backlog, "statuses": statuses,
            "deltas": deltas}


def megabytes(value: int) -> str:
    return f"{value / 2**20:.1f}"


def print_minute(minute: float, programs: list[Program], state: dict, sent: int) -> None:
    parts = []
    for program in programs:
        rss, fds = program.sample(minute)
        parts.append(f"{program.name} {megabytes(rss)} MB/{fds} fd")
    tables = ", ".join(f"{t} {megabytes(h)}+{megabytes(i)} MB ({state['dead'].get(t, 0)} dead)"
                       for t, (h, i) in state["sizes"].items())
    print(f"[{minute:5.1f} min] {'; '.join(parts)}; backlog {state['backlog']}, "
          f"{sent / 60:.1f} sends/s; {tables}", flush=True)


def growth(program: Program) -> list[str]:
    """RSS and descriptors from the fifth minute of each life to its last sample, and the
    medians of the first and of the last five samples from then on. A descriptor count read
    at one instant includes the requests on the wire then (a slow answer holds one for the
    read timeout), so single samples swing by a few; a leak moves the medians."""
    lines = []
    for number, life in enumerate(program.lives, 1):
        start = life[0][0] if life else 0
        settled = [s for s in life if s[0] >= start + 5]
        if len(settled) < 2:
            continue
        (m0, rss0, fds0), (m1, rss1, fds1) = settled[0], settled[-1]
        window = min(5, len(settled) // 2)
        fds_first = statistics.median(s[2] for s in settled[:window])
        fds_last = statistics.median(s[2] for s in settled[-window:])
        lines.append(f"  {program.name} life {number}: RSS {megabytes(rss0)} -> {megabytes(rss1)}"
                     f" MB ({(rss1 / rss0 - 1) * 100:+.1f}%), descriptors {fds0} -> {fds1}, "
                     f"median of the first and last {window} samples {fds_first:g} -> "
                     f"{fds_last:g} ({(fds_last / fds_first - 1) * 100:+.1f}%), most "
                     f"{max(s[2] for s in settled)}, minutes {m0:.0f} to {m1:.0f}")
    return lines


# -- the run ---------------------------------------------------------------------------------


def soak(args: argparse.Namespace, dsn: str) -> None:
    suffix = f"{os.getpid()}_{uuid.uuid4().hex[:6]}"
    names = {"SMSQ_EXCHANGE": f"soak.{suffix}", "SMSQ_QUEUE": f"soak.{suffix}.sms"}
    senders = [f"+1202555{1000 + i}" for i in range(args.senders)]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    env["SMSQ_LOG_LEVEL"] = "WARNING"
    fake_process, fake = spawn(env=env)
    fake_program = Program("fake-twilio", [], env, fake_process, [[]])
    faults = [{"mode": "created-500", "probability": 0.01},
              {"mode": "slow", "probability": 0.01, "slow_ms": args.read_timeout * 2000}]
    fake.set_faults(faults)
    smsq_env = program_env(dsn, fake, names, senders, args.read_timeout)
    consume = Program("consume", [sys.executable, "-m", "consumer.cli", "consume"], smsq_env)
    dispatch = Program("dispatch", [sys.executable, "-m", "consumer.cli", "dispatch"], smsq_env)
    programs = [consume, dispatch, fake_program]
    publisher = Publisher(names, args.senders * args.load)
    creations = Creations(fake)
    vacuum_here = autovacuum_is_off(dsn)
    print(f"soak: {args.minutes:g} min, {args.senders} senders at 1/s, publishing "
          f"{publisher.rate:g}/s; faults created-500 1%, slow 1% (read timeout "
          f"{args.read_timeout:g} s), 20003 for a minute at half time; {os.cpu_count()} CPUs "
          f"shared with whatever else runs"
          + ("; the server's autovacuum is off: the soak vacuums each minute instead"
             if vacuum_here else ""), flush=True)
    try:
        consume.start()
        dispatch.start()
        time.sleep(3)  # consume declares the queue
        publisher.start()
        events = [(args.minutes * 0.3, "restart consume", consume.restart),
                  (args.minutes * 0.5, "20003 for 60 s",
                   lambda: fake.set_faults([*faults, {"mode": "20003", "seconds": 60}])),
                  (args.minutes * 0.6, "restart dispatch", dispatch.restart)]
        started = time.monotonic()
        next_minute = 1.0
        while (minute := (time.monotonic() - started) / 60) < args.minutes:
            while events and minute >= events[0][0]:
                at, what, do = events.pop(0)
                print(f"[{minute:5.1f} min] {what}", flush=True)
                do()
            if minute >= next_minute:
                print_minute(minute, programs, database_state(dsn), creations.poll())
                if vacuum_here:
                    vacuum(dsn)
                next_minute += 1
            time.sleep(1)
        publisher.stopping.set()
        publisher.join()
        drain(args, dsn, creations, started, programs)
        report(publisher, creations, database_state(dsn), programs)
    finally:
        publisher.stopping.set()
        for program in (consume, dispatch):
            program.stop()
        fake_process.send_signal(signal.SIGTERM)
        fake_process.wait(timeout=15)
        delete_queues(names)


def drain(args: argparse.Namespace, dsn: str, creations: Creations, started: float,
          programs: list[Program]) -> None:
    deadline = time.monotonic() + args.drain_minutes * 60
    print("publisher stopped; waiting for the backlog to drain", flush=True)
    while time.monotonic() < deadline:
        state = database_state(dsn)
        if state["backlog"] == 0:
            break
        time.sleep(5)
    creations.poll()


def report(publisher: Publisher, creations: Creations, state: dict,
           programs: list[Program]) -> None:
    confirmed = set(publisher.confirmed)
    lost = [i for i in confirmed if creations.times[i] == 0]
    twice = [i for i, times in creations.times.items() if times > 1]
    print(f"published and confirmed {len(confirmed):,}; created at the sandbox "
          f"{len(creations.times):,}; statuses {state['statuses']}")
    print(f"faults applied: {dict(creations.faults)}")
    print(f"lost: {len(lost)} {lost[:5]}")
    print(f"sent twice: {len(twice)} {twice[:5]}")
    print(f"count delta rows at the end: {state['deltas']} (no serve ran)")
    print("growth after the fifth minute (target: within 10%):")
    for program in programs:
        for line in growth(program):
            print(line)


def delete_queues(names: dict[str, str]) -> None:
    connection = pika.BlockingConnection(pika.URLParameters(AMQP_URL))
    channel = connection.channel()
    for queue in (names["SMSQ_QUEUE"], names["SMSQ_QUEUE"] + ".dead"):
        channel.queue_delete(queue)
    channel.exchange_delete(names["SMSQ_EXCHANGE"])
    connection.close()


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    # Run in the background, a shell ignores SIGINT for it: SIGTERM cleans up as Ctrl-C does.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    with scratch_database(f"smsq_soak_{os.getpid()}") as dsn:
        soak(args, dsn)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
