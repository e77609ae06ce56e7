"""The Starlette application of `smsq serve`: routes, middleware, and what runs beside them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.sessions import SessionMiddleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from consumer import metrics
from consumer.settings import Settings
from consumer.web import auth, dashboard, health, housekeeping, login, media, receipts
from consumer.web.render import HERE

log = logging.getLogger(__name__)

POOL_SIZE = 8
# A request waits this long for a database connection before it is answered 503.
POOL_TIMEOUT = 3.0


def routes() -> list[Route | Mount]:
    return [
        Route(receipts.CALLBACK_PATH, receipts.status_callback, methods=["POST"]),
        Route("/media/{token}", media.hosted_media, methods=["GET"]),
        Route("/healthz", health.healthz, methods=["GET"]),
        Route("/readyz", health.readyz, methods=["GET"]),
        Route("/metrics", health.metrics, methods=["GET"]),
        Route("/login", login.login_page, methods=["GET"]),
        Route("/login", login.login, methods=["POST"]),
        Route("/logout", login.logout, methods=["POST"]),
        Route("/", dashboard.overview, methods=["GET"]),
        Route("/notifications", dashboard.search, methods=["GET"]),
        Route("/notifications/{notification_id}", dashboard.notification_page, methods=["GET"]),
        Route("/errors", dashboard.errors_page, methods=["GET"]),
        Route("/dead-letters", dashboard.dead_letters_page, methods=["GET"]),
        Route("/actions/retry", dashboard.retry_action, methods=["POST"]),
        Route("/actions/cancel", dashboard.cancel_action, methods=["POST"]),
        Route("/actions/requeue", dashboard.requeue_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


async def postgres_unreachable(request: Request, exc: Exception) -> Response:
    """Postgres away: say so (Twilio retries nothing, but a person can wait and reload)."""
    log.warning("request failed: Postgres unreachable", extra={
        "action": "postgres_unreachable", "path": request.url.path, "error": str(exc)})
    return PlainTextResponse("Postgres is unreachable; try again in a moment.\n",
                             status_code=503, headers={"Retry-After": "5"})


def create_app(settings: Settings) -> Starlette:
    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        # open(wait=False): serve starts (and /readyz says why) even while Postgres is away.
        # check: a connection to a primary that has since failed over is replaced when it is
        # taken, not handed to a request (DATABASE_URL may name a primary and its standby).
        pool = ConnectionPool(settings.database_dsn, min_size=1, max_size=POOL_SIZE, open=False,
                              timeout=POOL_TIMEOUT, kwargs={"application_name": "smsq serve"},
                              check=ConnectionPool.check_connection)
        pool.open(wait=False)
        app.state.pool = pool
        jobs = housekeeping.start(pool, settings)
        try:
            yield
        finally:
            for job in jobs:
                job.cancel()
            await asyncio.gather(*jobs, return_exceptions=True)
            await run_in_threadpool(pool.close, 5)

    app = Starlette(
        routes=routes(),
        middleware=[
            Middleware(SessionMiddleware, secret_key=auth.session_secret(settings),
                       session_cookie=auth.SESSION_COOKIE, max_age=auth.SESSION_MAX_AGE,
                       same_site="lax"),
            Middleware(auth.RequireLogin),
        ],
        lifespan=lifespan,
        exception_handlers={psycopg.OperationalError: postgres_unreachable,
                            PoolTimeout: postgres_unreachable},
    )
    app.state.settings = settings
    app.state.login_throttle = auth.LoginThrottle()
    app.state.metrics_registry = metrics.program_registry(metrics.SERVE_METRICS,
                                                          settings.database_dsn)
    return app
