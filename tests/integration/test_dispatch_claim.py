"""The claim statement itself (claims.claim_many) against real Postgres: what it returns and
the plan Postgres makes of it."""

from __future__ import annotations

import json

import psycopg

from consumer.dispatch import claims

POOL = "+15017122661"
SUPPRESSED = "+14155550199"


def add_pending(conn: psycopg.Connection, count: int, sender: str = "",
                to: str = "+14155550123", priority: str = "low", age_seconds: int = 60) -> None:
    """`count` due rows of `sender`, the first one the oldest."""
    conn.execute("""
        WITH n AS (
            INSERT INTO notification (id, body, priority, publish_datetime, sender)
            SELECT gen_random_uuid(), 'claim test ' || i, %(priority)s,
                   now() - (%(age)s - i) * interval '1 millisecond', %(sender)s
            FROM generate_series(1, %(count)s) i
            RETURNING id)
        INSERT INTO sms_notification (notification_id, to_phone_number, media_url, attempts)
        SELECT id, %(to)s, ARRAY['https://example.com/a.png'], 2 FROM n""",
                 {"count": count, "sender": sender, "to": to, "priority": priority,
                  "age": age_seconds * 1000})


def test_a_claim_takes_the_best_rows_of_each_sender_once_with_their_sms_part(database_url):
    with psycopg.connect(database_url, autocommit=True) as conn:
        add_pending(conn, 3, priority="low")
        add_pending(conn, 2, priority="high", age_seconds=1)
        add_pending(conn, 2, sender=POOL)
        add_pending(conn, 1, sender=POOL, to=SUPPRESSED, age_seconds=3600)
        conn.execute("INSERT INTO suppressed_number (phone_number, reason) "
                     "VALUES (%s, 'operator')", (SUPPRESSED,))
        first = claims.claim_many(conn, [("", 3, 2), (POOL, 2, 2)], "me", 60.0)
        second = claims.claim_many(conn, [("", 3, 2), (POOL, 2, 2)], "me", 60.0)
        errored = conn.execute("SELECT s.error_code, n.status FROM notification n JOIN "
                               "sms_notification s ON s.notification_id = n.id "
                               "WHERE s.to_phone_number = %s", (SUPPRESSED,)).fetchall()
    # In any order: the dispatcher keeps what it holds in a heap by priority and age.
    default = sorted(first[""].rows, key=lambda row: (row.priority_rank, row.publish_datetime))
    assert [row.priority_rank for row in default] == [0, 0, 2]
    assert default[2].publish_datetime == min(
        row.publish_datetime for row in default + second[""].rows if row.priority_rank == 2)
    assert all(row.to_phone_number == "+14155550123" and row.attempts == 2
               and row.media_url == ["https://example.com/a.png"] and row.media_token is None
               and row.claimed_datetime is not None for row in default)
    assert [row.to_phone_number for row in first[POOL].suppressed] == [SUPPRESSED]
    assert len(first[POOL].rows) == 1 and not first[POOL].drained
    assert errored == [(21610, "errored")]
    claimed_twice = {r.id for r in default + first[POOL].rows} & {
        r.id for r in second[""].rows + second[POOL].rows}
    assert not claimed_twice
    assert len(second[""].rows) == 2 and second[""].drained
    assert len(second[POOL].rows) == 1 and second[POOL].drained


def test_the_planner_expects_no_more_rows_than_the_claim_asks_for(database_url):
    """With `LIMIT req.lim` alone Postgres guesses a tenth of the due rows; with a million
    of them that guess made it hash both tables whole (seconds, not milliseconds)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        add_pending(conn, 5000)
        conn.execute("ANALYZE notification")
        conn.execute("ANALYZE sms_notification")
        params = {"senders": ["", POOL], "limits": [100, 50], "max_ranks": [2, 2],
                  "total": 150, "holder": "me", "lease": 60.0}
        with conn.transaction(force_rollback=True):
            [[plan]] = conn.execute("EXPLAIN (FORMAT JSON) " + claims.CLAIM_DUE,
                                    params).fetchall()
    if isinstance(plan, str):
        plan = json.loads(plan)
    top = plan[0]["Plan"]
    due = next(node for node in top["Plans"] if node.get("Subplan Name") == "CTE due")
    assert due["Plan Rows"] <= 150
    assert top["Plan Rows"] <= 150
