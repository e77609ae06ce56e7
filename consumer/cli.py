"""The `smsq` command: one verb per program or operator task.

Settings are built here, once, and passed down; no other module reads the environment.
A bad setting or bad input ends the command with exit status 2 and one line that names it;
so does a database that has not been migrated. RabbitMQ or Postgres out of reach ends a
one-shot command with exit status 1 and one line (the long-running programs retry).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

import pika.exceptions
import psycopg

from consumer.commands import UsageError
from consumer.logs import error_text, setup_logging
from consumer.settings import ConfigError, Settings, load_settings

log = logging.getLogger("smsq")

# verb -> module with `add_arguments(parser)` and `main(settings, args) -> int | None`
COMMANDS = {
    "migrate": ("consumer.commands.migrate", "apply the database migrations"),
    "consume": ("consumer.commands.consume", "store messages from RabbitMQ in Postgres"),
    "publish": ("consumer.commands.publish", "publish notifications (from flags or JSON lines)"),
    "status": ("consumer.commands.status", "counts by status and priority, queue depths"),
    "fake-twilio": ("consumer.commands.fake_twilio", "a local stand-in for Twilio's Messages API"),
    "dispatch": ("consumer.commands.dispatch", "send due messages to Twilio, paced per sender"),
    "serve": ("consumer.commands.serve", "status callbacks, MMS media, dashboard, health, metrics"),
    "retry": ("consumer.commands.retry", "errored or failed notifications back to pending"),
    "cancel": ("consumer.commands.cancel", "cancel pending notifications"),
    "dead": ("consumer.commands.dead", "list dead letters and why; send them back after a fix"),
    "queues": ("consumer.commands.queues", "turn the queues into the kind configured (migrate)"),
    "prune": ("consumer.commands.prune",
              "delete finished notifications older than a retention period"),
    "logout-all": ("consumer.commands.logout_all", "end every dashboard session at once"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="smsq", description="SMS notifications from RabbitMQ to Twilio, paced and never twice."
    )
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="COMMAND")
    for verb, (module_name, help_text) in COMMANDS.items():
        sub = verbs.add_parser(verb, help=help_text, description=help_text)
        importlib.import_module(module_name).add_arguments(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"smsq: configuration error: {exc}", file=sys.stderr)
        return 2
    setup_logging(settings.smsq_log_format, settings.smsq_log_level)
    module = importlib.import_module(COMMANDS[args.verb][0])
    try:
        status = module.main(settings, args) or 0
        sys.stdout.flush()  # here, not at exit: a reader that left is caught below
        return status
    except (ConfigError, UsageError) as exc:
        return _fail(args.verb, str(exc), 2)
    except (psycopg.errors.UndefinedTable, psycopg.errors.UndefinedColumn) as exc:
        return _fail(args.verb, f"DATABASE_URL: the database lacks smsq's tables or columns "
                                f"({_first_line(exc)}): run `smsq migrate` first", 2)
    except psycopg.OperationalError as exc:
        # With a SQLSTATE, Postgres answered (a timeout, a lock, a full disk): not unreachable.
        problem = "Postgres error" if exc.sqlstate else "DATABASE_URL: Postgres unreachable"
        return _fail(args.verb, f"{problem}: {_first_line(exc)}", 1)
    except pika.exceptions.AMQPConnectionError as exc:
        return _fail(args.verb, f"AMQP_URL: RabbitMQ unreachable: {error_text(exc)}", 1)
    except BrokenPipeError:
        # The reader left (`smsq status | head`): end quietly, as other Unix tools do. What
        # is still buffered goes nowhere, so the flush at exit cannot fail again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _fail(verb: str, reason: str, status: int) -> int:
    print(f"smsq {verb}: {reason}", file=sys.stderr)
    return status


def _first_line(exc: Exception) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run_with(settings: Settings, argv: list[str]) -> int:
    """Run a verb with explicit settings (for tests and embedding)."""
    args = build_parser().parse_args(argv)
    return importlib.import_module(COMMANDS[args.verb][0]).main(settings, args) or 0


if __name__ == "__main__":
    sys.exit(main())
