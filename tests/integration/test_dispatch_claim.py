"""The claim statement itself (claims.claim_many) against real Postgres: what it returns and
the plan Postgres makes of it."""

from __future__ import annotations

from datetime import datetime, timezone

import psycopg
import pytest

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


def test_a_row_without_its_sms_part_fails_instead_of_holding_up_its_sender(database_url):
    """A notification written around smsq without its sms_notification row has nothing to
    send. First in its sender's line, it took a place in every claim and was never sent:
    a claim of one row got nothing, for ever."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        [orphan] = conn.execute(
            "INSERT INTO notification (id, body, priority, publish_datetime) VALUES "
            "(gen_random_uuid(), 'no sms part', 'high', now() - interval '1 hour') "
            "RETURNING id").fetchone()
        add_pending(conn, 2)
        first = claims.claim_many(conn, [("", 1, 2)], "me", 60.0)[""]
        second = claims.claim_many(conn, [("", 1, 2)], "me", 60.0)[""]
        status = conn.execute("SELECT status, status_message, claimed_by FROM notification "
                              "WHERE id = %s", (orphan,)).fetchone()
        [event] = conn.execute("SELECT old_value, new_value FROM notification_event "
                               "WHERE notification_id = %s", (orphan,)).fetchall()
    assert first.rows == [] and first.suppressed == []
    assert [row.id for row in first.without_sms_part] == [orphan]  # for the log line
    assert not first.drained  # a row was taken: its sender is not out of due rows
    assert [row.without_sms_part for row in second.rows] == [False]
    assert status == ("failed", claims.NO_SMS_PART, None)
    assert event == ("pending", "failed")
    assert len(second.rows) == 1 and second.rows[0].id != orphan


def test_the_claim_finds_its_rows_by_key_whatever_the_planner_guesses(database_url):
    """Postgres guesses a tenth of the due rows for `LIMIT req.lim`: with a million of them,
    joining the claimed rows by that guess hashed whole tables (seconds, not milliseconds).
    No plan of the claim, with its parameters or without (a prepared statement's generic
    plan), reads notification or sms_notification whole."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        add_pending(conn, 5000)
        conn.execute("ANALYZE notification")
        conn.execute("ANALYZE sms_notification")
        conn.execute("PREPARE claim(text[], int[], int[], text, float8) AS "
                     + positional(claims.CLAIM_DUE, "senders", "limits", "max_ranks", "holder",
                                  "lease"))
        plans = {}
        for mode in ("force_custom_plan", "force_generic_plan"):
            with conn.transaction(force_rollback=True):
                conn.execute(f"SET LOCAL plan_cache_mode = {mode}")
                [[plans[mode]]] = conn.execute(
                    f"EXPLAIN (FORMAT JSON) EXECUTE claim(ARRAY['', '{POOL}'], ARRAY[100, 50], "
                    "ARRAY[2, 2], 'me', 60)").fetchall()
    for mode, plan in plans.items():
        read_whole = {node.get("Relation Name") for node in nodes(plan[0]["Plan"])
                      if node["Node Type"] == "Seq Scan"}
        assert not read_whole & {"notification", "sms_notification"}, mode


def positional(statement: str, *names: str) -> str:
    """`statement` with its named parameters as $1, $2, ... in the order of `names`."""
    for number, name in enumerate(names, 1):
        statement = statement.replace(f"%({name})s", f"${number}")
    return statement


def nodes(plan: dict) -> list[dict]:
    return [plan] + [node for child in plan.get("Plans", []) for node in nodes(child)]


def test_rows_whose_columns_are_not_the_fields_in_order_are_refused(database_url):
    with psycopg.connect(database_url) as conn, conn.cursor(
            row_factory=claims.claimed_rows) as cur:
        with pytest.raises(ValueError, match="first fields of ClaimedRow"):
            cur.execute("SELECT gen_random_uuid() AS id, 0 AS priority_rank")


def test_outcomes_land_field_by_field_and_one_that_cannot_be_written_fails_alone(database_url):
    """record_outcomes writes a batch in one statement; when the batch fails (here a NUL,
    which Postgres text cannot hold, in one status message), record_each writes the others
    and marks that one failed with the reason."""
    sent_at = datetime(2026, 12, 3, 19, 0, 0, 123456, tzinfo=timezone.utc)
    with psycopg.connect(database_url, autocommit=True) as conn:
        add_pending(conn, 4)
        sent, unknown, retried, bad = sorted(
            claims.claim_many(conn, [("", 4, 2)], "me", 60.0)[""].rows,
            key=lambda row: row.publish_datetime)
        batch = [
            claims.Outcome(sent.id, "sent", sid="SM" + "a" * 32, segments=3,
                           sent_datetime=sent_at),
            claims.Outcome(unknown.id, "processing", "timed out", lease_seconds=30.0,
                           reconcile_checks=0),
            claims.Outcome(retried.id, "pending", "Twilio 500", error_code=20500,
                           retry_in=90.5),
            claims.Outcome(bad.id, "errored", "bad \x00 message", error_code=21211),
        ]
        with pytest.raises(psycopg.DataError):
            claims.record_outcomes(conn, batch)
        assert claims.record_each(conn, batch) == [bad.id]
        rows = {r[0]: r[1:] for r in conn.execute("""
            SELECT n.id, n.status, n.status_message, n.sent_datetime,
                   round(extract(epoch FROM n.retry_datetime - now())),
                   round(extract(epoch FROM n.lease_expire_datetime - now())),
                   n.claimed_by, s.twilio_sid, s.segments, s.error_code, s.attempts,
                   s.reconcile_checks
            FROM notification n JOIN sms_notification s ON s.notification_id = n.id""")}
    assert rows[sent.id] == ("sent", "", sent_at, None, None, None, "SM" + "a" * 32, 3, None,
                             3, 0)
    assert rows[unknown.id] == ("processing", "timed out", None, None, 30, "me", None, None,
                                None, 3, 0)
    assert rows[retried.id] == ("pending", "Twilio 500", None, 90, None, None, None, None,
                                20500, 3, 0)
    assert rows[bad.id][0] == "failed" and "could not be written" in rows[bad.id][1]


def test_a_hand_back_after_a_reconnect_leaves_the_rows_of_a_sender_held_elsewhere(
        database_url):
    """Back from losing Postgres, a dispatcher hands back the rows it had in hand, but not
    those of a sender another dispatcher took meanwhile: that one may be reconciling them,
    and a row put back to pending under it could be sent twice. Its normal hand-back (its
    own lock held by its lock connection) is not held back so."""
    with psycopg.connect(database_url, autocommit=True) as conn, \
            psycopg.connect(database_url, autocommit=True) as other:
        add_pending(conn, 2)
        add_pending(conn, 1, sender=POOL)
        taken = claims.claim_many(conn, [("", 2, 2), (POOL, 1, 2)], "me", 60.0)
        mine, held_elsewhere = [r.id for r in taken[""].rows], taken[POOL].rows[0].id
        assert claims.try_lock_senders(other, [POOL]) == [POOL]  # another dispatcher took it
        returned = claims.release_unsent(conn, [*mine, held_elsewhere], "me",
                                         unheld_only=True)
        status = dict(conn.execute("SELECT id, status FROM notification").fetchall())
        assert returned == 2 and status[held_elsewhere] == "processing"
        assert [status[i] for i in mine] == ["pending", "pending"]
        assert claims.release_unsent(conn, [held_elsewhere], "me") == 1
