"""`smsq publish`: a producer for people and scripts.

    smsq publish --to +14155550123 --body "Your code is 482910" --priority high
    smsq publish --file messages.jsonl      # one JSON message per line; '-' reads stdin

Every message is validated before anything is published: bad lines stop the command, each
named with its line number and the field at fault, and nothing half-published is left behind.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
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


# The message's fields as the flags that give them, for errors about flags.
FLAGS = {"sms.to_phone_number": "--to", "body": "--body", "priority": "--priority",
         "publish_datetime": "--at", "expire_datetime": "--expire", "title": "--title",
         "sms.media_url": "--media-url", "id": "--id"}


def main(settings: Settings, args: argparse.Namespace) -> int:
    if args.file:
        notifications = _validate_lines(_from_file(args.file), settings)
    else:
        notifications = [_validate_flags(_from_flags(args), settings)]
    with amqp.connect(settings, "publish") as connection:
        amqp.declare_topology(connection.channel(), settings)
    ids = publish_many(notifications, amqp_url=settings.amqp_url,
                       exchange=settings.smsq_exchange, routing_key=settings.smsq_routing_key)
    for notification_id in ids:
        print(notification_id)
    print(f"published {len(ids)} message(s) to exchange {settings.smsq_exchange!r}",
          file=sys.stderr)
    return 0


def _from_flags(args: argparse.Namespace) -> dict[str, Any]:
    if args.to is None or args.body is None:
        raise UsageError("--to and --body are required (or --file)")
    message: dict[str, Any] = {"body": args.body, "sms": {"to_phone_number": args.to}}
    for name in ("id", "title", "priority", "publish_datetime", "expire_datetime"):
        if getattr(args, name) is not None:
            message[name] = getattr(args, name)
    if args.media_url:
        message["sms"]["media_url"] = args.media_url
    return message


def _validate_flags(message: dict[str, Any], settings: Settings) -> Notification:
    try:
        notification = _validate(message, settings)
    except ValidationError as exc:
        raise UsageError(describe(exc, names=FLAGS)) from None
    if problem := _already_expired(notification):
        raise UsageError(f"--expire: {problem}")
    return notification


def _from_file(path: str) -> list[tuple[int, str]]:
    """(line number, line) of every line that is not blank."""
    try:
        with sys.stdin if path == "-" else open(path, encoding="utf-8") as stream:
            return [(number, line) for number, line in enumerate(stream, start=1)
                    if line.strip()]
    except OSError as exc:
        raise UsageError(f"--file: {exc.strerror or exc}: {path}") from None
    except UnicodeDecodeError:
        raise UsageError(f"--file: not UTF-8 text: {path}") from None


def _validate_lines(lines: list[tuple[int, str]], settings: Settings) -> list[Notification]:
    """Every line's message, or a UsageError listing every bad line."""
    notifications, problems = [], []
    for number, line in lines:
        try:
            notification = _validate(json.loads(line), settings)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
        except ValidationError as exc:
            problems.append(f"line {number}: {describe(exc)}")
        else:
            if problem := _already_expired(notification):
                problems.append(f"line {number}: expire_datetime: {problem}")
            notifications.append(notification)
    if problems:
        raise UsageError(f"{len(problems)} bad line(s) of {len(lines)}, nothing published:\n  "
                         + "\n  ".join(problems))
    return notifications


def _already_expired(notification: Notification) -> str | None:
    """A person publishing by hand means to send: a message expired already never would be.

    (Producers are not refused this way: with clock skew between machines, the expiry is
    for the dispatcher to judge.)
    """
    expiry = notification.expire_datetime
    if expiry is not None and expiry <= datetime.now(timezone.utc):
        return f"already passed ({expiry.isoformat()}): it would never be sent"
    return None


def _validate(message: Any, settings: Settings) -> Notification:
    return Notification.model_validate(
        message, context={"default_region": settings.smsq_default_region})
