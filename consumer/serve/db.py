"""Run a blocking database function from an async endpoint, on a pooled connection."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import psycopg
from psycopg_pool import PoolTimeout
from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection
from starlette.responses import PlainTextResponse, Response

log = logging.getLogger(__name__)

T = TypeVar("T")
# What Postgres being away looks like from a request: a refused or lost connection, or no
# pooled connection free in time.
UNREACHABLE = (psycopg.OperationalError, PoolTimeout)


async def run(request: HTTPConnection, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`fn(conn, *args, **kwargs)` in a worker thread; committed when it returns normally."""
    pool = request.app.state.pool

    def work() -> T:
        with pool.connection() as conn:
            return fn(conn, *args, **kwargs)

    return await run_in_threadpool(work)


def unreachable(request: HTTPConnection, exc: Exception) -> Response:
    """Postgres away: say so (Twilio retries nothing, but a person can wait and reload)."""
    log.warning("request failed: Postgres unreachable", extra={
        "action": "postgres_unreachable", "path": request.url.path, "error": str(exc)})
    return PlainTextResponse("Postgres is unreachable; try again in a moment.\n",
                             status_code=503, headers={"Retry-After": "5"})
