"""Migrations: a fresh database gets the schema the code expects, twice is harmless."""

from __future__ import annotations

import threading

import psycopg
import pytest

from consumer.migrate import available_migrations, migrate, require_current_schema
from consumer.settings import ConfigError
from tests.support import run_smsq

EXPECTED_COLUMNS = {
    "notification": {
        "id", "type", "user_id", "title", "body", "url", "priority", "status", "status_message",
        "publish_datetime", "expire_datetime", "sent_datetime", "content_type", "object_id",
        "created_datetime"},
    "sms_notification": {
        "notification_id", "to_phone_number", "media_url", "temporary_media_id", "twilio_sid",
        "segments", "attempts", "error_code", "delivery_status"},
    "sms_temporary_media": {"id", "access_token", "content_type", "content", "expire_datetime"},
}


def _empty_database(database_url: str) -> str:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    return database_url


def test_fresh_migration_has_the_contract_tables(database_url):
    migrate(_empty_database(database_url))
    with psycopg.connect(database_url) as conn:
        for table, columns in EXPECTED_COLUMNS.items():
            found = {r[0] for r in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = %s",
                (table,))}
            assert columns <= found, f"{table} lacks {columns - found}"
        indexes = {r[0] for r in conn.execute("SELECT indexname FROM pg_indexes")}
        assert "notification_due_idx" in indexes


def test_running_twice_applies_nothing_the_second_time(database_url):
    assert len(migrate(_empty_database(database_url))) == len(available_migrations())
    assert migrate(database_url) == []


def test_two_concurrent_runs_apply_each_migration_once(database_url):
    _empty_database(database_url)
    results, errors = [], []

    def run() -> None:
        try:
            results.append(migrate(database_url))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(len(r) for r in results) == [0, len(available_migrations())]
    with psycopg.connect(database_url) as conn:
        assert conn.execute("SELECT count(*) FROM smsq_migration").fetchone()[0] == len(
            available_migrations())


@pytest.mark.parametrize("program", ["consume", "dispatch", "serve"])
def test_a_program_refuses_a_database_behind_its_migrations(program, settings):
    latest = available_migrations()[-1]
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("DELETE FROM smsq_migration WHERE version = %s", (latest.version,))
    done = run_smsq(settings, program, TWILIO_API_URL="http://127.0.0.1:9",
                    TWILIO_PHONE_NUMBER="+15005550006")
    assert done.returncode == 2
    assert done.stderr == (f"smsq {program}: DATABASE_URL: the database lacks migrations "
                           f"{latest.version:04d}_{latest.name}: run `smsq migrate` first\n")


def test_a_never_migrated_database_is_named_as_such(database_url):
    _empty_database(database_url)
    with pytest.raises(ConfigError, match="no smsq tables yet"):
        require_current_schema(database_url)
    migrate(database_url)
    require_current_schema(database_url)
