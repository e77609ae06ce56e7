"""`smsq migrate`: apply the numbered SQL files of sql/migrations in order, once each.

Safe to run twice (applied versions are recorded in `smsq_migration`) and from two
processes at once (a transaction-level advisory lock serialises them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

from consumer.pipeline import scalar
from consumer.settings import ConfigError

log = logging.getLogger(__name__)

# Any constant shared by every smsq process; ensures one migrator at a time.
MIGRATION_LOCK_KEY = 0x736D_7371_6D69_6772 & 0x7FFF_FFFF_FFFF_FFFF


MIGRATIONS_DIR = Path(__file__).parent / "sql" / "migrations"


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


def available_migrations() -> list[Migration]:
    found = []
    for entry in MIGRATIONS_DIR.glob("*.sql"):
        number, _, rest = entry.name.partition("_")
        found.append(Migration(int(number), rest.removesuffix(".sql"), entry.read_text()))
    return sorted(found, key=lambda m: m.version)


def migrate(dsn: str) -> list[Migration]:
    """Apply what is missing; return the migrations applied by this call."""
    with psycopg.connect(dsn, autocommit=False) as conn:
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK_KEY,))
        conn.execute(
            """CREATE TABLE IF NOT EXISTS smsq_migration (
                   version integer PRIMARY KEY,
                   name text NOT NULL,
                   applied_datetime timestamptz NOT NULL DEFAULT now())"""
        )
        done = _applied_versions(conn)
        applied = []
        for migration in available_migrations():
            if migration.version in done:
                continue
            conn.execute(migration.sql)
            conn.execute(
                "INSERT INTO smsq_migration (version, name) VALUES (%s, %s)",
                (migration.version, migration.name),
            )
            log.info("migration applied", extra={"action": "migration_applied",
                                                  "version": migration.version,
                                                  "migration": migration.name})
            applied.append(migration)
        conn.commit()
        return applied


def _applied_versions(conn: psycopg.Connection) -> set[int]:
    """The versions recorded in smsq_migration (none while that table does not exist)."""
    if scalar(conn.execute("SELECT to_regclass('smsq_migration')")) is None:
        return set()
    return {row[0] for row in conn.execute("SELECT version FROM smsq_migration")}


def require_current_schema(dsn: str) -> None:
    """Refuse to start on a database behind this code (one line, exit 2), not fail later on
    a missing table. A database that does not answer yet is left to the program's retries."""
    try:
        with psycopg.connect(dsn, connect_timeout=5) as conn:
            applied = _applied_versions(conn)
    except psycopg.OperationalError:
        return
    if not applied:
        raise ConfigError("DATABASE_URL: the database has no smsq tables yet: "
                          "run `smsq migrate` first")
    missing = [m for m in available_migrations() if m.version not in applied]
    if missing:
        names = ", ".join(f"{m.version:04d}_{m.name}" for m in missing)
        raise ConfigError(f"DATABASE_URL: the database lacks migrations {names}: "
                          "run `smsq migrate` first")
