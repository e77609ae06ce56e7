"""The Starlette application of `smsq serve`: routes, middleware, and what runs beside them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from psycopg_pool import ConnectionPool
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from consumer import metrics
from consumer.serve import (
    access_log,
    auth,
    dashboard,
    db,
    health,
    housekeeping,
    inbound,
    limits,
    login,
    media,
    params,
    receipts,
    sessions,
    suppressions,
)
from consumer.serve.render import HERE
from consumer.settings import Settings

log = logging.getLogger(__name__)

POOL_SIZE = 8
# A request waits this long for a database connection before it is answered 503.
POOL_TIMEOUT = 3.0


def routes() -> list[Route | Mount]:
    return [
        Route(receipts.CALLBACK_PATH, receipts.status_callback, methods=["POST"]),
        Route(inbound.INBOUND_PATH, inbound.inbound_message, methods=["POST"]),
        Route(media.PREFIX + "{token}", media.hosted_media, methods=["GET"]),
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
        Route(suppressions.PAGE, suppressions.suppressions_page, methods=["GET"]),
        Route("/actions/suppress", suppressions.suppress_action, methods=["POST"]),
        Route("/actions/unsuppress", suppressions.unsuppress_action, methods=["POST"]),
        Mount("/static", StaticFiles(directory=HERE / "static"), name="static"),
    ]


async def postgres_unreachable(request: Request, exc: Exception) -> Response:
    return db.unreachable(request, exc)


def middleware(settings: Settings, keys: sessions.SessionKeys | None) -> list[Middleware]:
    """Outermost first: the client's address, the access log, body limits, the session."""
    stack = [Middleware(ProxyHeadersMiddleware, trusted_hosts=settings.smsq_trusted_proxies)]
    if settings.smsq_access_log:
        stack.append(Middleware(access_log.AccessLog))
    return [*stack, Middleware(limits.BodyLimits),
            Middleware(sessions.SessionCookie, keys=keys, secure=settings.secure_cookies),
            Middleware(auth.RequireLogin)]


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

    login = auth.dashboard_login(settings)
    keys = sessions.SessionKeys(login[1]) if login is not None else None
    app = Starlette(
        routes=routes(),
        middleware=middleware(settings, keys),
        lifespan=lifespan,
        exception_handlers={**{kind: postgres_unreachable for kind in db.UNREACHABLE},
                            params.BadParameter: params.bad_parameter},
    )
    app.state.settings = settings
    app.state.session_keys = keys
    app.state.login_throttle = auth.LoginThrottle()
    app.state.readiness = health.Readiness()
    # The backlog is read on one of the pool's connections: a flood of scrapes cannot open
    # a connection each.
    app.state.metrics_registry = metrics.program_registry(
        metrics.SERVE_METRICS, settings.database_dsn,
        connect=lambda: app.state.pool.connection(timeout=POOL_TIMEOUT))
    return app
