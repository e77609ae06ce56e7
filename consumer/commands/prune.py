"""`smsq prune`: delete finished notifications older than a retention period.

    smsq prune --older-than 90d
    smsq prune --older-than 2026-01-01T00:00:00Z --dry-run

Finished: sent, errored, failed or canceled; pending and processing ones are never touched.
Their SMS details and history go with them. Run it from cron or a systemd timer.
"""

from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import psycopg

from consumer.commands import UsageError, arguments
from consumer.ops import actions
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Delete finished notifications (sent, errored, failed, canceled) "
                          "created before a point in time, with their SMS details and history, "
                          "in batches. Pending and processing ones are never touched.")
    parser.add_argument("--older-than", required=True, metavar="WHEN",
                        help="created before this: 90d, 12h, or an ISO time with its time zone")
    parser.add_argument("--dry-run", action="store_true", help="only count them")
    parser.add_argument("--batch-size", type=int, default=5_000, metavar="N",
                        help="rows deleted per transaction (default 5000)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    before = arguments.since(args.older_than, datetime.now(timezone.utc), flag="--older-than")
    if args.batch_size < 1:
        raise UsageError("--batch-size: at least 1")
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        count = actions.prune(conn, before, batch=args.batch_size, dry_run=args.dry_run)
    if args.json:
        print(json.dumps({"before": before.isoformat(), "dry_run": args.dry_run,
                          "notifications": count}))
    else:
        verb = "would delete" if args.dry_run else "deleted"
        print(f"{verb} {count} finished notification(s) created before {before.isoformat()}")
    return 0
