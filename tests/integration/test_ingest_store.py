"""Ingest's statements: new rows by COPY, batches with ids already stored by the staged path."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from consumer.ingest import storage
from tests.support import ingest_row as row


@pytest.fixture
def conn(settings):
    with psycopg.connect(settings.database_dsn) as conn:
        storage.prepare_ingest(conn)
        yield conn


def stored(conn: psycopg.Connection) -> dict[uuid.UUID, tuple]:
    return {r[0]: r[1:] for r in conn.execute(
        """SELECT n.id, n.publish_datetime = n.created_datetime, n.publish_datetime, s.to_phone_number
           FROM notification n JOIN sms_notification s ON s.notification_id = n.id""")}


def test_a_new_batch_is_stored_with_the_database_clock_for_unscheduled_rows(conn):
    later = datetime(2030, 1, 1, tzinfo=timezone.utc)
    rows = [row(), row(publish=later), row()]
    assert storage.insert_batch(conn, rows) == [r.id for r in rows]
    found = stored(conn)
    assert set(found) == {r.id for r in rows}
    assert found[rows[0].id][0] and found[rows[2].id][0]  # now(), as the row's creation
    assert found[rows[1].id][1] == later


@pytest.mark.parametrize("case", ["stored before", "twice in the batch"])
def test_a_batch_with_an_id_already_there_stores_the_rest_once(conn, case):
    first = row()
    if case == "stored before":
        assert storage.insert_batch(conn, [first]) == [first.id]
        batch = [row(), first, row()]
    else:
        batch = [row(), first, row(notification_id=first.id)]
    new = len({r.id for r in batch}) - (case == "stored before")
    assert len(storage.insert_batch(conn, batch)) == new
    assert set(stored(conn)) == {r.id for r in batch}
    assert conn.execute("SELECT count(*) FROM sms_notification").fetchone()[0] == len(
        {r.id for r in batch})


def test_dispatchers_are_told_each_sender_and_its_best_priority(conn, settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as listener:
        listener.execute("LISTEN smsq_due")
        soon = datetime.now(timezone.utc) + timedelta(minutes=5)
        batch = [row("low", "a"), row("medium", "a"), row("low", "b"),
                 row("high", "b", publish=soon)]
        storage.insert_batch(conn, batch)
        payloads = {n.payload for n in listener.notifies(timeout=2, stop_after=2)}
        assert payloads == {"a 1", "b 0"}
        # a batch with nothing new wakes nobody (insert_batch commits: it would be heard)
        storage.insert_batch(conn, [row(notification_id=batch[0].id)])
        assert list(listener.notifies(timeout=0.5)) == []
        # and a batch with something new wakes only the senders of the new rows
        storage.insert_batch(conn, [row("high", "a", notification_id=batch[0].id), row("low", "c")])
        assert [n.payload for n in listener.notifies(timeout=2, stop_after=1)] == ["c 2"]
        assert list(listener.notifies(timeout=0.5)) == []
