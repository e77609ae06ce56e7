"""`smsq queues migrate`: smsq's queues turned into the kind SMSQ_QUORUM_QUEUES configures.

Stop every `smsq consume` first; producers may go on publishing. Safe to run again after a
crash: it resumes where it stopped (see consumer/ops/queues.py for how).
"""

from __future__ import annotations

import argparse

from consumer.ops import queues
from consumer.settings import Settings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser(
        "migrate", help="move the messages of queues of the other kind into new queues "
                        "declared as configured (stop smsq consume first)")


def main(settings: Settings, args: argparse.Namespace) -> int:
    kind = "quorum" if settings.smsq_quorum_queues else "classic"
    for migration in queues.migrate_queues(settings):
        if not migration.migrated:
            print(f"queue {migration.queue}: already a {kind} queue as configured")
            continue
        print(f"queue {migration.queue}: now a {kind} queue; {migration.moved_out} message(s) "
              f"moved out and {migration.moved_back} moved back")
    return 0
