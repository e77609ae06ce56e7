"""GET /healthz (the process answers), /readyz (RabbitMQ and Postgres reachable), /metrics.

These answer anyone, so they cost little whoever floods them: Postgres is asked on one of
the pool's connections (never a new one per request), and the readiness answer is kept a
second, however many ask in that second. Why a dependency is down goes to the log, not to
the anonymous caller.
"""

from __future__ import annotations

import asyncio
import logging
import time

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from psycopg_pool import ConnectionPool
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from consumer import amqp
from consumer.logs import error_text
from consumer.settings import Settings

log = logging.getLogger(__name__)

CHECK_TIMEOUT = 3.0
READY_CACHE_SECONDS = 1.0


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def _postgres(pool: ConnectionPool) -> None:
    with pool.connection(timeout=CHECK_TIMEOUT) as conn:
        conn.execute("SELECT 1")


def _rabbitmq(settings: Settings) -> None:
    amqp.queue_depths(settings)


async def _check(name: str, fn, arg, seconds: float = CHECK_TIMEOUT + 1) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(fn, arg), seconds)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready"
        log.warning("readiness check failed", extra={
            "action": "readyz_unready", "dependency": name, "error": error_text(exc)})
        return "unreachable"
    return "ok"


def _brokers_seconds(settings: Settings) -> float:
    """AMQP_URL's brokers are tried in turn, each for up to its connect timeout: a node of
    the list that is down must not make serve unready while the next one answers."""
    return amqp.CONNECT_TIMEOUT * len(settings.amqp_urls) + 1


class Readiness:
    """The last readiness answer, shared by the requests of the next second."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.checked_at = float("-inf")
        self.checks: dict[str, str] = {}
        self.lock = asyncio.Lock()

    async def checks_of(self, request: Request) -> dict[str, str]:
        async with self.lock:  # those arriving during a check wait for it, not start their own
            if self.clock() - self.checked_at >= READY_CACHE_SECONDS:
                postgres, rabbitmq = await asyncio.gather(
                    _check("postgres", _postgres, request.app.state.pool),
                    _check("rabbitmq", _rabbitmq, request.app.state.settings,
                           _brokers_seconds(request.app.state.settings)))
                self.checks = {"postgres": postgres, "rabbitmq": rabbitmq}
                self.checked_at = self.clock()
            return self.checks


async def readyz(request: Request) -> Response:
    checks = await request.app.state.readiness.checks_of(request)
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    # In a thread: the backlog is read from Postgres at each scrape, and the event loop must
    # not wait for it (status callbacks, media and the dashboard share it).
    exported = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(exported, headers={"Content-Type": CONTENT_TYPE_LATEST})
