"""One log line per request of `smsq serve` (SMSQ_ACCESS_LOG=true; off by default).

What a line holds is chosen, not copied: the method, the path (a media token is a
password for its file, so /media/ paths are logged without it and without a query),
the status, the time taken and the client. Never a header, so never a cookie or a
signature.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumer.serve import media

log = logging.getLogger("smsq.access")


def logged_path(scope: Scope) -> str:
    path = scope["path"]
    if path.startswith(media.PREFIX):
        return media.PREFIX + "…"
    query = scope.get("query_string", b"").decode("latin-1")
    return f"{path}?{query}" if query else path


class AccessLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 0

        async def send_seen(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_seen)
        finally:
            client = scope.get("client")
            log.info("request", extra={
                "action": "http_request", "method": scope["method"], "path": logged_path(scope),
                "status": status or 500, "ms": round((time.perf_counter() - started) * 1000, 1),
                "client": client[0] if client else ""})
