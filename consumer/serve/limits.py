"""Request bodies judged before they are read: a size limit per route, and forms only from
Twilio.

Without this a 30 MB form to /twilio/status was buffered before its signature was checked,
and a 40 MB multipart part to /login was written to disk before its CSRF token was. A body
over its route's limit is answered 413 as soon as that is known: from Content-Length before
a byte is read, or when the bytes streamed in pass it (a chunked body declares no length).
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger(__name__)

KB = 1024
TWILIO_PREFIX = "/twilio/"  # status callbacks and incoming-message webhooks
TWILIO_LIMIT = 64 * KB  # a callback is a few hundred bytes; an inbound message's form a few KB
LOGIN_LIMIT = 8 * KB
DEFAULT_LIMIT = 1024 * KB  # the dashboard's actions: a list of selected ids at most
# Twilio posts its webhooks as this, never multipart (which python-multipart spools to disk).
TWILIO_CONTENT_TYPE = "application/x-www-form-urlencoded"


def body_limit(path: str) -> int:
    if path.startswith(TWILIO_PREFIX):
        return TWILIO_LIMIT
    return LOGIN_LIMIT if path == "/login" else DEFAULT_LIMIT


class BodyTooLarge(Exception):
    pass


def refused(status: int, text: str) -> PlainTextResponse:
    # Connection: close: what is left of the body is not read, so the connection cannot carry
    # another request (and a slow sender does not keep it).
    return PlainTextResponse(text, status_code=status, headers={"Connection": "close"})


def _problem(scope: Scope, limit: int) -> PlainTextResponse | None:
    """The answer to a request refused on its headers alone, or None."""
    headers = Headers(scope=scope)
    declared = headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return refused(413, f"request body too large: at most {limit} bytes here\n")
    content_type = headers.get("content-type", "").split(";")[0].strip().lower()
    if scope["path"].startswith(TWILIO_PREFIX) and content_type not in ("", TWILIO_CONTENT_TYPE):
        return refused(415, f"Content-Type must be {TWILIO_CONTENT_TYPE}\n")
    return None


class BodyLimits:
    """ASGI middleware, outermost: refuses oversized bodies (413) and, on Twilio's paths,
    bodies that are not a plain form (415)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = body_limit(scope["path"])
        if (problem := _problem(scope, limit)) is not None:
            self._log(scope, problem.status_code)
            await problem(scope, receive, send)
            return
        received = 0
        started = False

        async def counted_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:
                raise BodyTooLarge()
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, watched_send)
        except BodyTooLarge:
            self._log(scope, 413)
            if not started:
                await refused(413, f"request body too large: at most {limit} bytes here\n")(
                    scope, receive, send)
        except ClientDisconnect:
            pass  # the client left (or was too slow, see slow_clients.py): nobody to answer

    @staticmethod
    def _log(scope: Scope, status: int) -> None:
        log.warning("request body refused", extra={
            "action": "request_body_refused", "path": scope["path"], "status": status})
