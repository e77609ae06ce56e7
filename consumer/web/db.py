"""Run a blocking database function from an async endpoint, on a pooled connection."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from starlette.concurrency import run_in_threadpool
from starlette.requests import HTTPConnection

T = TypeVar("T")


async def run(request: HTTPConnection, fn: Callable[..., T], *args: object, **kwargs: object) -> T:
    """`fn(conn, *args, **kwargs)` in a worker thread; committed when it returns normally."""
    pool = request.app.state.pool

    def work() -> T:
        with pool.connection() as conn:
            return fn(conn, *args, **kwargs)

    return await run_in_threadpool(work)
