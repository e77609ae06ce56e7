from __future__ import annotations

import argparse

from consumer.commands import UsageError
from consumer.ingest import consume
from consumer.migrate import require_current_schema
from consumer.settings import Settings
from consumer.signals import StopSignal


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Stops cleanly on SIGTERM/SIGINT: the current batch is stored and "
                     "acknowledged first. Tune with SMSQ_INGEST_BATCH_SIZE, "
                     "SMSQ_INGEST_BATCH_MS and SMSQ_PREFETCH.")


def main(settings: Settings, args: argparse.Namespace) -> int:
    require_current_schema(settings.database_dsn)
    try:
        consume.run(settings, StopSignal().install())
    except consume.FatalBrokerError as exc:
        raise UsageError(str(exc)) from None
    return 0
