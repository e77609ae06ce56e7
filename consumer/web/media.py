"""GET /media/<token>: hosted MMS media for Twilio to fetch, and its periodic cleanup."""

from __future__ import annotations

import asyncio
import logging
import re

from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from consumer.metrics import MEDIA_DELETED, MEDIA_REQUESTS
from consumer.settings import Settings
from consumer.web import db, store

log = logging.getLogger(__name__)

# secrets.token_urlsafe output; anything else cannot be a token, so no query is needed.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_NOT_FOUND = PlainTextResponse("no such media, or it expired\n", status_code=404)


async def hosted_media(request: Request) -> Response:
    token = request.path_params["token"]
    settings: Settings = request.app.state.settings
    media = None
    if _TOKEN.fullmatch(token):
        media = await db.run(request, store.servable_media, token,
                             settings.smsq_media_grace_seconds)
    if media is None:
        MEDIA_REQUESTS.labels("not_found").inc()
        return _NOT_FOUND
    MEDIA_REQUESTS.labels("served").inc()
    # The stored content type as it is (no charset added), and no sniffing by browsers.
    return Response(media.content, headers={
        "Content-Type": media.content_type,
        "Cache-Control": "private, no-store",
        "X-Content-Type-Options": "nosniff",
    })


def delete_expired(pool: ConnectionPool, grace_seconds: float) -> int:
    """Delete expired unused media in small batches (short locks); how many were deleted."""
    total = 0
    while True:
        with pool.connection() as conn:
            deleted = store.delete_expired_media(conn, grace_seconds)
        total += deleted
        if deleted == 0:
            return total


async def cleanup_forever(pool: ConnectionPool, settings: Settings) -> None:
    """Run the cleanup every SMSQ_MEDIA_CLEANUP_SECONDS; a failed run is retried next time."""
    while True:
        await asyncio.sleep(settings.smsq_media_cleanup_seconds)
        try:
            deleted = await run_in_threadpool(delete_expired, pool,
                                              settings.smsq_media_grace_seconds)
        except Exception:  # noqa: BLE001 - Postgres away: log, keep serving, try again later
            log.warning("media cleanup failed", exc_info=True,
                        extra={"action": "media_cleanup_failed"})
        else:
            if deleted:
                MEDIA_DELETED.inc(deleted)
                log.info("expired media deleted", extra={"action": "media_deleted",
                                                         "count": deleted})
