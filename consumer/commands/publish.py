"""`smsq publish`: a producer for people and scripts.

    smsq publish --to +14155550123 --body "Your code is 482910" --priority high
    smsq publish --file messages.jsonl      # one JSON message per line; '-' reads stdin

Every message is validated before anything is published, so a bad line stops the command
with its line number and the field at fault, and nothing half-published is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pydantic import ValidationError

from consumer import amqp
from consumer.commands import UsageError
from consumer.settings import Settings
from schemas.errors import describe
from schemas.message import Notification
from schemas.publish import publish_many


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", help="recipient, e.g. +14155550123")
    parser.add_argument("--body", help="the SMS text (1 to 1600 characters)")
    parser.add_argument("--priority", choices=("low", "medium", "high"), default=None)
    parser.add_argument("--at", dest="publish_datetime", metavar="ISO",
                        help="not sent before, e.g. 2026-11-24T12:00:00Z")
    parser.add_argument("--expire", dest="expire_datetime", metavar="ISO",
                        help="not sent after, e.g. 2026-11-24T12:10:00Z")
    parser.add_argument("--title", help="a title (not part of the SMS text)")
    parser.add_argument("--media-url", action="append", dest="media_url", metavar="URL",
                        help="an image for MMS; repeat for several (at most 10)")
    parser.add_argument("--id", help="idempotency key (UUID); random when absent")
    parser.add_argument("--file", metavar="PATH", help="JSON lines, one message each; - for stdin")


def main(settings: Settings, args: argparse.Namespace) -> int:
    messages = _from_file(args.file) if args.file else [_from_flags(args)]
    notifications = [_validate(m, where, settings) for where, m in messages]
    with amqp.connect(settings, "publish") as connection:
        amqp.declare_topology(connection.channel(), settings)
    ids = publish_many(notifications, amqp_url=settings.amqp_url,
                       exchange=settings.smsq_exchange, routing_key=settings.smsq_routing_key)
    for notification_id in ids:
        print(notification_id)
    print(f"published {len(ids)} message(s) to exchange {settings.smsq_exchange!r}",
          file=sys.stderr)
    return 0


def _from_flags(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    if not args.to or not args.body:
        raise UsageError("--to and --body are required (or --file)")
    message: dict[str, Any] = {"body": args.body, "sms": {"to_phone_number": args.to}}
    for name in ("id", "title", "priority", "publish_datetime", "expire_datetime"):
        if getattr(args, name) is not None:
            message[name] = getattr(args, name)
    if args.media_url:
        message["sms"]["media_url"] = args.media_url
    return "flags", message


def _from_file(path: str) -> list[tuple[str, Any]]:
    stream = sys.stdin if path == "-" else open(path, encoding="utf-8")
    messages = []
    with stream:
        for number, line in enumerate(stream, start=1):
            if not line.strip():
                continue
            try:
                messages.append((f"line {number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise UsageError(f"line {number}: not valid JSON ({exc.msg})") from None
    return messages


def _validate(message: Any, where: str, settings: Settings) -> Notification:
    try:
        return Notification.model_validate(
            message, context={"default_region": settings.smsq_default_region})
    except ValidationError as exc:
        prefix = "" if where == "flags" else f"{where}: "
        raise UsageError(prefix + describe(exc)) from None
