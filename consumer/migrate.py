"""`smsq migrate`: apply the numbered SQL files of sql/migrations in order, once each.

Safe to run twice (applied versions are recorded in `smsq_migration`) and from two
processes at once (a transaction-level advisory lock serialises them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import psycopg

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
        done = {row[0] for row in conn.execute("SELECT version FROM smsq_migration")}
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
