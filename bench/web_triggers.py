"""What the history and count triggers of migration 0004 cost the writers.

    .venv/bin/python bench/web_triggers.py [--rounds 12]

Alternates rounds with the triggers enabled and disabled (the baseline) in one database:
ingest's own statement storing 1,000 messages, then a dispatcher-like claim of 100 rows
followed by 100 single-row `sent` updates. Prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import scratch_database  # noqa: E402
from consumer.ingest import storage  # noqa: E402
from schemas.message import Notification  # noqa: E402


def batch(size: int) -> list[storage.IngestRow]:
    return [storage.IngestRow.of(Notification.model_validate(
        {"body": "Your code is 482910", "sms": {"to_phone_number": "+14155550123"}},
    ).with_defaults(uuid.uuid4())) for _ in range(size)]


def one_round(conn: psycopg.Connection) -> tuple[float, float]:
    rows = batch(1000)
    started = time.perf_counter()
    storage.insert_batch(conn, rows)
    conn.commit()
    ingest = time.perf_counter() - started
    ids = [row.notification.id for row in rows[:100]]
    started = time.perf_counter()
    conn.execute("UPDATE notification SET status = 'processing' WHERE id = ANY(%s)", (ids,))
    for notification_id in ids:
        conn.execute("UPDATE notification SET status = 'sent', sent_datetime = now() "
                     "WHERE id = %s", (notification_id,))
    conn.commit()
    return ingest, time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    timings: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    with scratch_database(f"smsq_bench_triggers_{uuid.uuid4().hex[:8]}") as url, \
            psycopg.connect(url) as conn:
        storage.prepare_ingest(conn)
        for i in range(args.rounds):
            enabled = i % 2 == 0
            for table in ("notification", "sms_notification"):
                conn.execute(sql.SQL("ALTER TABLE {} {} TRIGGER USER").format(
                    sql.Identifier(table), sql.SQL("ENABLE" if enabled else "DISABLE")))
            conn.commit()
            timings[enabled].append(one_round(conn))
    print(f"median of {args.rounds // 2} rounds each    without triggers   with triggers   ratio")
    for index, label in ((0, "ingest 1,000 messages"), (1, "claim 100, then 100 sends")):
        base = statistics.median(t[index] for t in timings[False])
        with_triggers = statistics.median(t[index] for t in timings[True])
        print(f"{label:<30}{base * 1000:>12.1f} ms{with_triggers * 1000:>13.1f} ms"
              f"{with_triggers / base:>8.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
