"""What `smsq serve` does besides answering: delete expired media, fold the status counts,
apply status callbacks that arrived before their SID was recorded, check delivery health.

Each job runs in a worker thread at its own interval; a failed run (Postgres away) is
logged and tried again next time. Several `serve` copies may run them at once: both jobs
are safe to run concurrently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool

from consumer import pipeline
from consumer.metrics import MEDIA_DELETED
from consumer.serve import delivery_health, queries, receipts
from consumer.settings import Settings

log = logging.getLogger(__name__)

EARLY_RECEIPT_SECONDS = 1.0


def delete_expired_media(pool: ConnectionPool, grace_seconds: float) -> int:
    """Delete expired unused media in small batches (short locks); how many were deleted."""
    total = 0
    while True:
        with pool.connection() as conn:
            deleted = queries.delete_expired_media(conn, grace_seconds)
        total += deleted
        if deleted == 0:
            break
    if total:
        MEDIA_DELETED.inc(total)
        log.info("expired media deleted", extra={"action": "media_deleted", "count": total})
    return total


def fold_counts(pool: ConnectionPool) -> int:
    with pool.connection() as conn:
        return pipeline.fold_counts(conn)


def apply_early_receipts(pool: ConnectionPool, resend: receipts.ResendPolicy) -> int:
    with pool.connection() as conn:
        return receipts.apply_early_receipts(conn, resend)


def check_delivery_health(pool: ConnectionPool, settings: Settings) -> None:
    with pool.connection() as conn:
        delivery_health.check(conn, settings)


async def every(seconds: float, job: Callable[..., object], *args: object) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            await run_in_threadpool(job, *args)
        except Exception:  # noqa: BLE001 - keep serving; the next run tries again
            log.warning("housekeeping job failed", exc_info=True,
                        extra={"action": "housekeeping_failed", "job": job.__name__})


def start(pool: ConnectionPool, settings: Settings) -> list[asyncio.Task]:
    return [
        asyncio.create_task(every(settings.smsq_media_cleanup_seconds, delete_expired_media,
                                  pool, settings.smsq_media_grace_seconds)),
        asyncio.create_task(every(pipeline.FOLD_COUNTS_EVERY_SECONDS, fold_counts, pool)),
        asyncio.create_task(every(EARLY_RECEIPT_SECONDS, apply_early_receipts, pool,
                                  receipts.resend_policy(settings))),
        asyncio.create_task(every(settings.smsq_delivery_check_seconds, check_delivery_health,
                                  pool, settings)),
    ]
