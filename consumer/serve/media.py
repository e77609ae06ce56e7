"""GET /media/<token>: hosted MMS media for Twilio to fetch (cleanup: housekeeping.py)."""

from __future__ import annotations

import logging
import re

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from consumer.metrics import MEDIA_REQUESTS
from consumer.serve import db, queries
from consumer.settings import Settings

log = logging.getLogger(__name__)

PREFIX = "/media/"
# secrets.token_urlsafe output; anything else cannot be a token, so no query is needed.
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_NOT_FOUND = PlainTextResponse("no such media, or it expired\n", status_code=404)


async def hosted_media(request: Request) -> Response:
    token = request.path_params["token"]
    settings: Settings = request.app.state.settings
    media = None
    if _TOKEN.fullmatch(token):
        media = await db.run(request, queries.servable_media, token,
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
