"""How the dashboard's pages and queries scale: a million notifications against a thousand.

    .venv/bin/python bench/web_dashboard.py [--rows 1000000] [--baseline 1000] [--repeat 5]

Builds two databases with the same mix of statuses, senders, numbers and history (once;
kept for later runs), then prints for each page the median time on both and their ratio,
and for each SQL statement the page runs, its plan's execution time on the big one. A
query that reads every row would show a ratio near rows/baseline (1000x); an indexed one
stays near 1x.
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
from starlette.testclient import TestClient

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SERVER_URL, with_dbname  # noqa: E402
from consumer.migrate import migrate  # noqa: E402
from consumer.serve import dashboard, queries  # noqa: E402
from consumer.serve.app import create_app  # noqa: E402
from consumer.settings import Settings  # noqa: E402
from tests.web_support import RecordingCursor, log_in, web_settings  # noqa: E402

# One statement per table; row i is published 2.5 s before row i-1 (a month for a million),
# so the last hour holds ~1,440 of them whatever the size, like a real steady flow.
_FILL = """
INSERT INTO notification (id, body, priority, status, status_message, publish_datetime,
                          sent_datetime, created_datetime, sender)
SELECT uuid_generate_v5('6ba7b810-9dad-11d1-80b4-00c04fd430c8', i::text),
       'Your one-time code is ' || (100000 + i %% 900000) || '. It expires in 10 minutes.',
       (ARRAY['low', 'low', 'medium', 'high'])[1 + i %% 4],
       s.status,
       CASE s.status WHEN 'errored' THEN 'Twilio refused the message' ELSE '' END,
       now() - i * interval '2.5 seconds',
       CASE WHEN s.status = 'sent' THEN now() - i * interval '2.5 seconds' + interval '1 second' END,
       now() - i * interval '2.5 seconds',
       (ARRAY['', '+14155550100', '+14155550101'])[1 + i %% 3]
FROM generate_series(1, %(rows)s) AS i,
     LATERAL (SELECT CASE WHEN i %% 1000 < 900 THEN 'sent' WHEN i %% 1000 < 950 THEN 'pending'
                          WHEN i %% 1000 < 975 THEN 'errored' WHEN i %% 1000 < 985 THEN 'failed'
                          WHEN i %% 1000 < 995 THEN 'canceled' ELSE 'processing' END AS status) s;

INSERT INTO sms_notification (notification_id, to_phone_number, twilio_sid, segments, attempts,
                              error_code, delivery_status)
SELECT n.id, '+1415555' || lpad((abs(hashtext(n.id::text)) %% 10000)::text, 4, '0'),
       CASE WHEN n.status = 'sent' THEN 'SM' || md5(n.id::text) END, 1, 1,
       CASE WHEN n.status = 'errored' THEN (ARRAY[21211, 21610, 21614])[1 + abs(hashtext(n.id::text)) %% 3]
            WHEN n.status = 'sent' AND abs(hashtext(n.id::text)) %% 100 = 0 THEN 30003 END,
       CASE WHEN n.status = 'sent' THEN
            CASE WHEN abs(hashtext(n.id::text)) %% 100 = 0 THEN 'undelivered' ELSE 'delivered' END END
FROM notification n;

-- the history the triggers would have written: claim, outcome, delivery receipt
INSERT INTO notification_event (notification_id, created_datetime, field, old_value, new_value,
                                message, error_code)
SELECT n.id, n.publish_datetime, 'status', 'pending', 'processing', '', NULL::integer
FROM notification n WHERE n.status <> 'pending' AND n.status <> 'canceled'
UNION ALL
SELECT n.id, n.publish_datetime + interval '1 second', 'status', 'processing', n.status,
       n.status_message, NULL
FROM notification n WHERE n.status IN ('sent', 'errored', 'failed')
UNION ALL
SELECT s.notification_id, n.publish_datetime + interval '5 seconds', 'delivery_status', 'sent',
       s.delivery_status, '', s.error_code
FROM sms_notification s JOIN notification n ON n.id = s.notification_id
WHERE s.delivery_status IS NOT NULL;

INSERT INTO dispatch_sender (sender, address, holder, tokens, rate, capacity)
VALUES ('', '+14155550199', 'bench:1', 0.4, 1, 1),
       ('+14155550100', '+14155550100', 'bench:1', 1, 1, 1),
       ('+14155550101', '+14155550101', 'bench:2', 0.7, 1, 1);
"""


def database(rows: int) -> str:
    """The URL of a filled database of `rows` notifications (built on first use)."""
    name = f"smsq_bench_web_{rows}"
    url = with_dbname(SERVER_URL, name)
    with psycopg.connect(with_dbname(SERVER_URL, "postgres"), autocommit=True) as admin:
        exists = admin.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if not exists:
            admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    if exists:
        with psycopg.connect(url) as conn:
            if conn.execute("SELECT count(*) FROM notification").fetchone()[0] == rows:
                return url
    print(f"building {name} ...", file=sys.stderr, flush=True)
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute('CREATE EXTENSION IF NOT EXISTS "uuid-ossp"')
        conn.execute("TRUNCATE notification, dispatch_sender CASCADE")
        for statement in _FILL.split(";\n\n"):
            conn.execute(statement, {"rows": rows})
        conn.execute("VACUUM ANALYZE")
    return url


def pages(url: str) -> dict[str, str]:
    """The URLs to time: every dashboard page, with a search by number, id and SID."""
    with psycopg.connect(url) as conn:
        errored_id, phone = conn.execute(
            """SELECT n.id, s.to_phone_number FROM notification n JOIN sms_notification s
               ON s.notification_id = n.id WHERE n.status = 'errored' LIMIT 1""").fetchone()
        sid = conn.execute("SELECT twilio_sid FROM sms_notification WHERE twilio_sid IS NOT NULL "
                           "LIMIT 1").fetchone()[0]
    return {"overview": "/", "errors": "/errors", "errors of one code": "/errors?code=30003",
            "search by number": f"/notifications?q={phone.replace('+', '%2B')}",
            "search by SID": f"/notifications?q={sid}",
            "notification": f"/notifications/{errored_id}"}


def time_pages(url: str, repeat: int) -> dict[str, float]:
    settings = web_settings(Settings(_env_file=None, database_url=url,
                                     smsq_queue=f"bench.{uuid.uuid4().hex[:8]}"))
    timings = {}
    with TestClient(create_app(settings)) as client:
        log_in(client)
        for name, path in pages(url).items():
            samples = []
            for _ in range(repeat + 1):
                started = time.perf_counter()
                response = client.get(path, follow_redirects=True)
                samples.append(time.perf_counter() - started)
                assert response.status_code == 200, (path, response.status_code)
            timings[name] = statistics.median(samples[1:])  # the first warms the caches
    return timings


def explain_queries(url: str) -> list[tuple[str, float, str]]:
    """(first line of the statement, execution ms, plan's top node) of each dashboard query."""
    RecordingCursor.statements = []
    with psycopg.connect(url, cursor_factory=RecordingCursor) as conn:
        dashboard._overview_data(conn)
        queries.recent_errors(conn, 24, None, False)
        queries.recent_errors(conn, 24, 30003, False)
        phone = conn.execute("SELECT to_phone_number FROM sms_notification LIMIT 1").fetchone()[0]
        queries.notifications_to(conn, phone)
        recorded = list(RecordingCursor.statements)
    results = []
    with psycopg.connect(url) as conn:
        for query, params in recorded:
            if "SELECT to_phone_number FROM sms_notification LIMIT 1" in str(query):
                continue
            plan = conn.execute(f"EXPLAIN (ANALYZE, FORMAT JSON) {query}", params).fetchone()[0][0]
            results.append((_label(str(query)), plan["Execution Time"], _nodes(plan["Plan"])))
    return results


def _label(query: str) -> str:
    return " ".join(query.split())[:70]


def _nodes(plan: dict) -> str:
    """Index names and scan types of a plan, to see at a glance nothing reads every row."""
    found = []

    def walk(node: dict) -> None:
        kind = node["Node Type"]
        if "Scan" in kind:
            found.append(f"{kind}" + (f" {node['Index Name']}" if "Index Name" in node
                                      else f" {node.get('Relation Name', '')}"))
        for child in node.get("Plans", []):
            walk(child)

    walk(plan)
    return ", ".join(dict.fromkeys(found))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--baseline", type=int, default=1_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    big, small = database(args.rows), database(args.baseline)
    big_times, small_times = time_pages(big, args.repeat), time_pages(small, args.repeat)
    print(f"\npage timings (median of {args.repeat}, through the app, logged in)")
    print(f"{'page':<22}{args.baseline:>12,} rows{args.rows:>14,} rows{'ratio':>9}")
    for name, seconds in big_times.items():
        base = small_times[name]
        print(f"{name:<22}{base * 1000:>14.1f} ms{seconds * 1000:>15.1f} ms{seconds / base:>8.1f}x")
    print(f"\nSQL on {args.rows:,} rows (EXPLAIN ANALYZE execution time, scans used)")
    for label, ms, nodes in explain_queries(big):
        print(f"{ms:>9.2f} ms  {label}\n             {nodes}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
