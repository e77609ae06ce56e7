"""`smsq dead`: the dead-letter queue, with each message's reason; send them back after a fix.

    smsq dead list [--limit 50]
    smsq dead requeue --all          # or: smsq dead requeue KEY [KEY ...]

KEY is the message's AMQP message_id (or, without one, the id smsq derives from its body),
as `smsq dead list` shows it.
"""

from __future__ import annotations

import argparse
import json

from consumer.commands import UsageError
from consumer.commands.table import render_table
from consumer.ops import dead_queue
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="show dead letters and why (left in the queue)")
    listing.add_argument("--limit", type=int, default=100, help="at most this many (100)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    requeue = actions.add_parser("requeue", help="send dead letters back to the main queue")
    requeue.add_argument("keys", nargs="*", metavar="KEY", help="which ones (see `dead list`)")
    requeue.add_argument("--all", action="store_true", help="every dead letter")
    requeue.add_argument("--json", action="store_true", help="machine-readable output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.action == "list":
        return _list(settings, args)
    return _requeue(settings, args)


def _list(settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    found = dead_queue.list_dead(settings, limit=args.limit)
    if args.json:
        print(json.dumps([{"key": d.key, "reason": d.reason, "dead_lettered_at": d.dead_lettered_at,
                           "body": d.body.decode("utf-8", "replace")} for d in found], indent=2))
        return 0
    if not found:
        print(f"no dead letters in {settings.dead_queue}")
        return 0
    print(render_table(["key", "dead-lettered at", "reason", "body"],
                       [(d.key, d.dead_lettered_at, d.reason, _one_line(d.preview, 60))
                        for d in found]))
    return 0


def _requeue(settings: Settings, args: argparse.Namespace) -> int:
    if bool(args.keys) == args.all:
        raise UsageError("give the keys to send back (see `smsq dead list`), or --all")
    sent_back = dead_queue.requeue(settings, keys=None if args.all else set(args.keys))
    missing = sorted(set(args.keys) - set(sent_back))
    if args.json:
        print(json.dumps({"requeued": sent_back, "not_found": missing}))
    else:
        print(f"{len(sent_back)} dead letter(s) sent back to {settings.smsq_queue}")
        if missing:
            print(f"not found in {settings.dead_queue}: {', '.join(missing)}")
    return 1 if missing else 0


def _one_line(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"
