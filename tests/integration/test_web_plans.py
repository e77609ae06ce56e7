"""Every query of the dashboard can be answered from an index, never by reading a whole table.

Test databases are tiny, so the planner would rightly read them whole; with sequential scans
made prohibitively expensive it still does so only where no index fits the query. (The
figures on a million rows are printed by bench/web_dashboard.py.)
"""

from __future__ import annotations

import json

import psycopg

from consumer.serve import dashboard, queries
from tests.web_support import RecordingCursor, insert_notification

BIG_TABLES = {"notification", "sms_notification", "notification_event", "sms_temporary_media"}


def dashboard_statements(dsn: str) -> list[tuple[str, object]]:
    RecordingCursor.statements = []
    with psycopg.connect(dsn, cursor_factory=RecordingCursor) as conn:
        notification_id = insert_notification(conn, status="errored", error_code=30003)
        RecordingCursor.statements = []
        dashboard._overview_data(conn)
        queries.recent_errors(conn, 24, None, False)
        queries.recent_errors(conn, 24, 30003, False)
        queries.notifications_to(conn, "+14155550123")
        queries.notifications_by_sid(conn, "SM" + "0" * 32)
        queries.notification(conn, notification_id)
        queries.history(conn, notification_id)
        queries.servable_media(conn, "A" * 32, 3600)
        queries.delete_expired_media(conn, 3600)
        conn.rollback()
        return list(RecordingCursor.statements)


def tables_read_whole(plan: dict) -> set[str]:
    found = set()
    if plan["Node Type"] == "Seq Scan" and plan["Relation Name"] in BIG_TABLES:
        found.add(plan["Relation Name"])
    for child in plan.get("Plans", []):
        found |= tables_read_whole(child)
    return found


def test_no_dashboard_query_reads_a_big_table_whole(settings):
    statements = dashboard_statements(settings.database_dsn)
    assert len(statements) >= 12
    with psycopg.connect(settings.database_dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        for query, params in statements:
            plan = conn.execute(f"EXPLAIN (FORMAT JSON) {query}", params).fetchone()[0]
            whole = tables_read_whole(plan[0]["Plan"])
            assert not whole, f"reads {whole} whole:\n{query}\n{json.dumps(plan, indent=1)}"
