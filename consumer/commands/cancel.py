"""`smsq cancel`: cancel pending notifications (waiting or scheduled) by id.

Only `pending` ones: a `processing` one may be at Twilio already, and a finished one is
history. Exit status 1 when some of the ids given were not canceled.
"""

from __future__ import annotations

import argparse

import psycopg

from consumer.commands import arguments, report
from consumer.ops import actions
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Cancel pending notifications, so they are never sent. Notifications "
                          "being sent or finished cannot be canceled (exit status 1).")
    parser.add_argument("ids", nargs="+", metavar="ID", help="notification ids")
    parser.add_argument("--reason", default="canceled by an operator",
                        help="stored in status_message")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    wanted = list(dict.fromkeys(arguments.notification_id(i) for i in args.ids))
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        canceled = actions.cancel(conn, wanted, reason=args.reason)
        refused = actions.statuses_of(conn, report.left_over(wanted, canceled))
    return report.print_outcome(canceled, refused, as_json=args.json,
                                json_keys=("canceled", "not_canceled"), done_text="canceled",
                                refused_text="not canceled (only pending ones can be)")
