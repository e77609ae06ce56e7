"""GET /healthz (the process answers), /readyz (RabbitMQ and Postgres reachable), /metrics."""

from __future__ import annotations

import asyncio

import psycopg
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from consumer import amqp
from consumer.logs import error_text
from consumer.settings import Settings

CHECK_TIMEOUT = 3.0


async def healthz(request: Request) -> Response:
    return PlainTextResponse("ok\n")


def _postgres(settings: Settings) -> None:
    # A new connection, not the pool's: it fails at once when Postgres refuses, where the
    # pool would wait for one of its own, and it proves that new connections work.
    with psycopg.connect(settings.database_dsn, connect_timeout=int(CHECK_TIMEOUT),
                         application_name="smsq serve readyz") as conn:
        conn.execute("SELECT 1")


def _rabbitmq(settings: Settings) -> None:
    amqp.queue_depths(settings)


async def _check(fn, settings: Settings, seconds: float = CHECK_TIMEOUT + 1) -> str:
    try:
        await asyncio.wait_for(run_in_threadpool(fn, settings), seconds)
    except Exception as exc:  # noqa: BLE001 - any failure means "not ready", said in words
        return f"unreachable: {error_text(exc)}"
    return "ok"


def _brokers_seconds(settings: Settings) -> float:
    """AMQP_URL's brokers are tried in turn, each for up to its connect timeout: a node of
    the list that is down must not make serve unready while the next one answers."""
    return amqp.CONNECT_TIMEOUT * len(settings.amqp_urls) + 1


async def readyz(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    postgres, rabbitmq = await asyncio.gather(_check(_postgres, settings),
                                              _check(_rabbitmq, settings, _brokers_seconds(settings)))
    checks = {"postgres": postgres, "rabbitmq": rabbitmq}
    ready = all(result == "ok" for result in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)


async def metrics(request: Request) -> Response:
    # In a thread: the backlog is read from Postgres at each scrape, and the event loop must
    # not wait for it (status callbacks, media and the dashboard share it).
    exported = await run_in_threadpool(generate_latest, request.app.state.metrics_registry)
    return Response(exported, headers={"Content-Type": CONTENT_TYPE_LATEST})
