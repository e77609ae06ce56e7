from __future__ import annotations

import argparse

from consumer.migrate import available_migrations, migrate
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--list", action="store_true", help="list the migrations and exit")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.list:
        for m in available_migrations():
            print(f"{m.version:04d} {m.name}")
        return 0
    applied = migrate(settings.database_dsn)
    print(f"applied {len(applied)} migration(s)" + "".join(
        f"\n  {m.version:04d} {m.name}" for m in applied) if applied else "database is up to date")
    return 0
