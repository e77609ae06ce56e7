"""`smsq retry`: errored or failed notifications back to pending, by id or by filter.

    smsq retry 0b9a3c1e-6f0d-4a51-9d57-2f0c6d3e9a11
    smsq retry --status errored --error-code 21611 --since 2h
    smsq retry --all
    smsq retry --undelivered --error-code 30003 --since 1d
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone

import psycopg

from consumer.commands import UsageError, arguments, report
from consumer.ops import actions
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Return errored or failed notifications to pending, with a fresh set "
                          "of attempts. A notification being sent or already sent is never "
                          "touched; ids that could not be retried are listed (exit status 1).")
    parser.add_argument("ids", nargs="*", metavar="ID", help="notification ids")
    parser.add_argument("--status", choices=actions.RETRYABLE,
                        help="only this status (default: both)")
    parser.add_argument("--error-code", type=int, metavar="CODE",
                        help="only this Twilio error code, e.g. 21611")
    parser.add_argument("--since", metavar="WHEN",
                        help="only those created since: 30m, 2h, 1d or an ISO time")
    parser.add_argument("--all", action="store_true",
                        help="every errored and failed notification")
    parser.add_argument("--undelivered", action="store_true",
                        help="instead: sent notifications whose delivery failed (undelivered "
                             "or failed), sent again as new messages")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    selected = bool(args.ids or args.status or args.error_code is not None or args.since)
    if not (selected or args.all):
        raise UsageError("say which: notification ids, a filter (--status, --error-code, "
                         "--since), or --all")
    wanted = list(dict.fromkeys(arguments.notification_id(i) for i in args.ids))
    if args.undelivered:
        return _undelivered(settings, args, wanted)
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        retried = actions.retry(
            conn,
            ids=wanted or None,
            statuses=[args.status] if args.status else actions.RETRYABLE,
            error_code=args.error_code,
            since=arguments.since(args.since, datetime.now(timezone.utc)) if args.since else None,
        )
        refused = actions.statuses_of(conn, report.left_over(wanted, retried))
    return report.print_outcome(
        retried, refused, as_json=args.json, json_keys=("retried", "not_retried"),
        done_text="back to pending",
        refused_text="not retried (only errored or failed ones matching the filter can be)")


def _undelivered(settings: Settings, args: argparse.Namespace, wanted: list) -> int:
    if args.status:
        raise UsageError("--undelivered takes sent notifications; --status does not apply")
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        again = actions.retry_undelivered(
            conn, ids=wanted or None, error_code=args.error_code,
            since=arguments.since(args.since, datetime.now(timezone.utc)) if args.since else None)
        refused = actions.statuses_of(conn, report.left_over(wanted, again))
    return report.print_outcome(
        again, refused, as_json=args.json, json_keys=("retried", "not_retried"),
        done_text="back to pending, to be sent again",
        refused_text="not sent again (only sent ones whose delivery failed can be)")
