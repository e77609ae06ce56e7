"""Who may see the dashboard: a login form, a signed session cookie, CSRF tokens on forms.

Deny by default: `RequireLogin` refuses every path that is not in PUBLIC_PATHS /
PUBLIC_PREFIXES, so a new page is protected without anyone remembering to. Without
SMSQ_DASHBOARD_USER and SMSQ_DASHBOARD_PASSWORD nothing behind it is served at all.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import quote

from starlette.datastructures import FormData
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from consumer.settings import Settings

log = logging.getLogger(__name__)

# Twilio, Prometheus and load balancers do not log in: these answer anyone.
PUBLIC_PATHS = frozenset({"/twilio/status", "/metrics", "/healthz", "/readyz", "/login"})
PUBLIC_PREFIXES = ("/media/", "/static/")
SESSION_COOKIE = "smsq_session"
SESSION_MAX_AGE = 12 * 3600
DISABLED = ("The dashboard is disabled: set SMSQ_DASHBOARD_USER and SMSQ_DASHBOARD_PASSWORD "
            "to enable it.\n")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def dashboard_enabled(settings: Settings) -> bool:
    return bool(settings.smsq_dashboard_user and settings.smsq_dashboard_password
                and settings.smsq_dashboard_password.get_secret_value())


def client_address(conn: HTTPConnection) -> str:
    """Who is asking: the peer's address (behind a proxy on this host, the forwarded one)."""
    return conn.client.host if conn.client else ""


def session_secret(settings: Settings) -> str:
    """Derived from the credentials: every `serve` copy agrees, a new password ends all sessions."""
    if not dashboard_enabled(settings):
        return secrets.token_hex(32)  # nothing is accepted anyway
    key = settings.smsq_dashboard_password.get_secret_value().encode()
    return hmac.new(key, b"smsq session " + settings.smsq_dashboard_user.encode(),
                    hashlib.sha256).hexdigest()


def credentials_match(settings: Settings, user: str, password: str) -> bool:
    expected_user = settings.smsq_dashboard_user.encode()
    expected_password = settings.smsq_dashboard_password.get_secret_value().encode()
    # Both compared in full every time, so timing says nothing about which one was wrong.
    user_ok = hmac.compare_digest(user.encode(), expected_user)
    password_ok = hmac.compare_digest(password.encode(), expected_password)
    return user_ok and password_ok


def is_logged_in(conn: HTTPConnection) -> bool:
    settings: Settings = conn.app.state.settings
    user = conn.session.get("user")
    return dashboard_enabled(settings) and user is not None and hmac.compare_digest(
        user.encode(), settings.smsq_dashboard_user.encode())


class RequireLogin:
    """ASGI middleware (inside SessionMiddleware): everything not public needs a session."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        if is_logged_in(conn):
            await self.app(scope, receive, send)
            return
        await refusal(conn)(scope, receive, send)


def refusal(conn: HTTPConnection) -> Response:
    if not dashboard_enabled(conn.app.state.settings):
        return PlainTextResponse(DISABLED, status_code=403)
    if conn.scope["method"] in ("GET", "HEAD"):
        target = conn.url.path + (f"?{conn.url.query}" if conn.url.query else "")
        return RedirectResponse(f"/login?next={quote(target)}", status_code=303)
    return PlainTextResponse("log in first\n", status_code=403)


# ---------------------------------------------------------------- password guessing


class LoginThrottle:
    """Failed logins by client address: after `limit` within `window_seconds`, that address
    may not try again until the oldest of them is that old. Kept in memory, per process."""

    MAX_CLIENTS = 10_000  # beyond this many addresses, the ones with no recent failure go

    def __init__(self, limit: int = 5, window_seconds: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.window = window_seconds
        self.clock = clock
        self.failures: dict[str, deque[float]] = {}

    def wait_seconds(self, client: str) -> float:
        """0 if `client` may try a password now, else how long until it may."""
        recent = self._recent(client)
        if len(recent) < self.limit:
            return 0.0
        return recent[0] + self.window - self.clock()

    def failed(self, client: str) -> None:
        if len(self.failures) >= self.MAX_CLIENTS:
            self.failures = {c: q for c in list(self.failures) if (q := self._recent(c))}
        self.failures.setdefault(client, deque(maxlen=self.limit)).append(self.clock())

    def succeeded(self, client: str) -> None:
        self.failures.pop(client, None)

    def _recent(self, client: str) -> deque[float]:
        recent = self.failures.get(client, deque())
        while recent and recent[0] <= self.clock() - self.window:
            recent.popleft()
        return recent


# ---------------------------------------------------------------- CSRF


def csrf_token(conn: HTTPConnection) -> str:
    """This session's token for forms (created on first use)."""
    token = conn.session.get("csrf")
    if token is None:
        token = conn.session["csrf"] = secrets.token_urlsafe(32)
    return token


def csrf_is_valid(conn: HTTPConnection, form: FormData) -> bool:
    expected = conn.session.get("csrf")
    given = form.get("csrf_token")
    return bool(expected and isinstance(given, str)
                and hmac.compare_digest(given.encode(), expected.encode()))


FormEndpoint = Callable[[Request, FormData], Awaitable[Response]]


def form_action(endpoint: FormEndpoint) -> Callable[[Request], Awaitable[Response]]:
    """A POST endpoint that only runs with this session's CSRF token in its form."""

    async def checked(request: Request) -> Response:
        if not dashboard_enabled(request.app.state.settings):
            return PlainTextResponse(DISABLED, status_code=403)
        form = await request.form()
        if not csrf_is_valid(request, form):
            log.warning("form without a valid CSRF token refused",
                        extra={"action": "csrf_refused", "path": request.url.path})
            return PlainTextResponse("This form has expired or did not come from this "
                                     "dashboard; reload the page and try again.\n",
                                     status_code=403)
        return await endpoint(request, form)

    checked.__name__ = endpoint.__name__
    checked.__doc__ = endpoint.__doc__
    return checked


def safe_next(target: str | None) -> str:
    """Only paths of this site: `next=//evil.example` or `https://...` must not redirect away."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


def flash(conn: HTTPConnection, kind: str, text: str) -> None:
    conn.session.setdefault("flash", []).append([kind, text])
