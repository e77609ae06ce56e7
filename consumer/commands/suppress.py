"""`smsq suppress`: the numbers that receive nothing.

    smsq suppress list [--number N] [--limit 1000] [--json]
    smsq suppress add NUMBER... [--note TEXT] [--json]
    smsq suppress remove NUMBER... [--json]

A notification to a listed number becomes `errored` (error code 21610) without a request to
Twilio. Numbers are read as ingest reads them (E.164, or national with SMSQ_DEFAULT_REGION).
Exit status 1 when some number could not be acted on: not a valid number, already listed
(add), or not listed (remove).
"""

from __future__ import annotations

import argparse
import json

import psycopg

from consumer.commands import UsageError
from consumer.commands.table import render_table
from consumer.ops import suppression
from consumer.pipeline import SuppressionReason
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="show the suppressed numbers, newest first")
    listing.add_argument("--number", help="only this number")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (1000)")
    listing.add_argument("--json", action="store_true", help="machine-readable output")
    add = actions.add_parser("add", help="numbers that must receive nothing from now on")
    add.add_argument("numbers", nargs="+", metavar="NUMBER")
    add.add_argument("--note", default="", help="why, kept with the entry")
    add.add_argument("--json", action="store_true", help="machine-readable output")
    remove = actions.add_parser("remove", help="numbers that may receive messages again")
    remove.add_argument("numbers", nargs="+", metavar="NUMBER")
    remove.add_argument("--json", action="store_true", help="machine-readable output")


def main(settings: Settings, args: argparse.Namespace) -> int:
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        if args.action == "list":
            return _list(conn, settings, args)
        return _change(conn, settings, args)


def _list(conn: psycopg.Connection, settings: Settings, args: argparse.Namespace) -> int:
    if args.limit < 1:
        raise UsageError("--limit must be at least 1")
    number = None
    if args.number is not None:
        number = suppression.as_e164(args.number, settings.smsq_default_region)
        if number is None:
            raise UsageError(f"--number: not a valid phone number: {args.number!r}")
    entries = suppression.listed(conn, number, args.limit)
    if args.json:
        print(json.dumps([{**e, "created_datetime": e["created_datetime"].isoformat()}
                          for e in entries], indent=2))
    elif not entries:
        print("no suppressed numbers")
    else:
        print(render_table(["number", "reason", "since", "detail"], [
            (e["phone_number"], e["reason"], e["created_datetime"].isoformat(timespec="seconds"),
             e["detail"]) for e in entries]))
    return 0


def _change(conn: psycopg.Connection, settings: Settings, args: argparse.Namespace) -> int:
    numbers = {raw: suppression.as_e164(raw, settings.smsq_default_region)
               for raw in args.numbers}
    valid = list(dict.fromkeys(n for n in numbers.values() if n is not None))
    if args.action == "add":
        done = suppression.add(conn, valid, SuppressionReason.OPERATOR, args.note)
        verb, why_not = "suppressed", "already suppressed"
    else:
        done = suppression.remove(conn, valid)
        verb, why_not = "no longer suppressed", "not suppressed"
    refused = {raw: "not a valid phone number" for raw, n in numbers.items() if n is None}
    refused |= {n: why_not for n in valid if n not in done}
    if args.json:
        print(json.dumps({"done": done, "not_done": refused}))
    else:
        print(f"{len(done)} number(s) {verb}")
        for number in done:
            print(f"  {number}")
        if refused:
            print(f"{len(refused)} left as they were")
            for number, reason in refused.items():
                print(f"  {number}  {reason}")
    return 1 if refused else 0
