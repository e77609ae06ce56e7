"""`smsq serve`: status callbacks, hosted media, the dashboard, /metrics, /healthz, /readyz."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import socket
from collections.abc import Iterator

import uvicorn

from consumer.migrate import require_current_schema
from consumer.serve.app import create_app
from consumer.serve.slow_clients import guarded_protocol
from consumer.settings import ConfigError, Settings
from consumer.signals import log_in_handler

log = logging.getLogger(__name__)

# After SIGTERM, requests in flight get this long before connections are closed; with the
# lifespan shutdown this keeps a clean stop well under 10 seconds.
GRACEFUL_SECONDS = 5
# Request line and headers together at most (h11's default); more is answered 400.
HEADER_BYTES = 16 * 1024


class Server(uvicorn.Server):
    """uvicorn with smsq's stop rules: the first SIGTERM/SIGINT stops gracefully and the
    process exits 0 (uvicorn would re-raise the signal and die of it); a second one closes
    the connections still open at once."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        handled = (signal.SIGTERM, signal.SIGINT)
        original = {sig: signal.signal(sig, self.handle_exit) for sig in handled}
        try:
            yield
        finally:
            for sig, handler in original.items():
                signal.signal(sig, handler)

    def handle_exit(self, sig: int, frame: object) -> None:
        name = signal.Signals(sig).name
        if self.should_exit:
            self.force_exit = True
            log_in_handler(logging.WARNING, "second signal, closing connections at once",
                           action="stop_forced", signal=name)
            return
        self.should_exit = True
        log_in_handler(logging.INFO, "stopping", action="stop_requested", signal=name)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = ("Listens on SMSQ_HTTP_HOST:SMSQ_HTTP_PORT. Twilio must reach it at "
                     "SMSQ_PUBLIC_URL. The dashboard needs SMSQ_DASHBOARD_USER and "
                     "SMSQ_DASHBOARD_PASSWORD. Stops cleanly on SIGTERM/SIGINT.")


def _listen(host: str, port: int) -> socket.socket:
    """Bound here rather than by uvicorn, so a taken port is one clear line and exit 2."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"SMSQ_HTTP_PORT: cannot listen on {host}:{port}: {reason}") from None


def main(settings: Settings, args: argparse.Namespace) -> int:
    config = uvicorn.Config(
        create_app(settings), host=settings.smsq_http_host, port=settings.smsq_http_port,
        log_config=None,  # our logging (consumer.logs), not uvicorn's
        timeout_graceful_shutdown=GRACEFUL_SECONDS, server_header=False,
        proxy_headers=False,  # ProxyHeadersMiddleware in the app, with SMSQ_TRUSTED_PROXIES
        http=guarded_protocol(settings.smsq_http_header_timeout, settings.smsq_http_body_timeout),
        limit_concurrency=settings.smsq_http_max_connections,
        h11_max_incomplete_event_size=HEADER_BYTES,
    )
    require_current_schema(settings.database_dsn)
    listening = _listen(settings.smsq_http_host, settings.smsq_http_port)
    log.info("serving", extra={"action": "serve_start", "host": settings.smsq_http_host,
                               "port": settings.smsq_http_port})
    Server(config).run(sockets=[listening])
    log.info("stopped", extra={"action": "serve_stopped"})
    return 0
