"""`smsq logout-all`: end every dashboard session, on every `smsq serve` copy, at once.

For a cookie that may have been stolen, or a person who should no longer get in: the
session key is replaced and every session row deleted, so no cookie handed out before
opens anything (the password stays; change SMSQ_DASHBOARD_PASSWORD to change it).
"""

from __future__ import annotations

import argparse
import logging

import psycopg

from consumer.serve import sessions
from consumer.settings import Settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("End every dashboard session at once: a new session key, no "
                          "session left. Everyone logs in again.")


def main(settings: Settings, args: argparse.Namespace) -> int:
    with psycopg.connect(settings.database_dsn) as conn:
        ended = sessions.log_out_everyone(conn)
    log.info("every dashboard session ended", extra={"action": "logout_all", "count": ended})
    print(f"ended {ended} dashboard session(s); the session key is new")
    return 0
