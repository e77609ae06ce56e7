"""Who may see the dashboard: a login form, a signed session cookie, CSRF tokens on forms.

Deny by default: `RequireLogin` refuses every path that is not in PUBLIC_PATHS /
PUBLIC_PREFIXES, so a new page is protected without anyone remembering to. Without
SMSQ_DASHBOARD_USER and SMSQ_DASHBOARD_PASSWORD nothing behind it is served at all.
"""

from __future__ import annotations

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

from consumer.serve import db, sessions
from consumer.settings import Settings

log = logging.getLogger(__name__)

# Twilio, Prometheus and load balancers do not log in: these answer anyone.
PUBLIC_PATHS = frozenset({"/twilio/status", "/twilio/inbound", "/metrics", "/healthz",
                          "/readyz", "/login"})
PUBLIC_PREFIXES = ("/media/", "/static/")
DISABLED = ("The dashboard is disabled: set SMSQ_DASHBOARD_USER and SMSQ_DASHBOARD_PASSWORD "
            "to enable it.\n")


def is_public(path: str) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES)


def dashboard_login(settings: Settings) -> tuple[str, str] | None:
    """The dashboard's (user, password); None while it is disabled (either one unset)."""
    user, password = settings.smsq_dashboard_user, settings.smsq_dashboard_password
    if user and password and password.get_secret_value():
        return user, password.get_secret_value()
    return None


def dashboard_enabled(settings: Settings) -> bool:
    return dashboard_login(settings) is not None


def client_address(conn: HTTPConnection) -> str:
    """Who is asking: the peer's address, or the one a trusted proxy (SMSQ_TRUSTED_PROXIES)
    forwarded (uvicorn's ProxyHeadersMiddleware sets it)."""
    return conn.client.host if conn.client else ""


def credentials_match(settings: Settings, user: str, password: str) -> bool:
    login = dashboard_login(settings)
    if login is None:
        return False
    expected_user, expected_password = login[0].encode(), login[1].encode()
    # Both compared in full every time, so timing says nothing about which one was wrong.
    user_ok = hmac.compare_digest(user.encode(), expected_user)
    password_ok = hmac.compare_digest(password.encode(), expected_password)
    return user_ok and password_ok


_LOGGED_IN = "smsq.logged_in"  # set in the scope by RequireLogin, once the session is checked


def is_logged_in(conn: HTTPConnection) -> bool:
    return bool(conn.scope.get(_LOGGED_IN))


class RequireLogin:
    """ASGI middleware (inside SessionCookie): everything not public needs a live session,
    checked in Postgres on every request (a logout ends it everywhere at once)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_public(scope["path"]):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        settings: Settings = conn.app.state.settings
        try:
            login = dashboard_login(settings)
            live = login is not None and await sessions.is_live(conn, login[0])
        except db.UNREACHABLE as exc:
            await db.unreachable(conn, exc)(scope, receive, send)
            return
        if live:
            scope[_LOGGED_IN] = True
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
    """Failed logins by user name and client address together: after `limit` within
    `window_seconds`, that name may not be tried from that address until the oldest of them
    is that old. Behind a shared proxy address (one SMSQ_TRUSTED_PROXIES does not name),
    someone guessing another name locks nobody out; one address trying many names is held
    back after `address_limit`. Kept in memory, per process."""

    MAX_KEYS = 10_000  # beyond this many, the ones with no recent failure go
    MAX_NAME = 64  # characters of a typed user name kept as a key

    def __init__(self, limit: int = 5, window_seconds: float = 900.0, address_limit: int = 20,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.limit = limit
        self.address_limit = address_limit
        self.window = window_seconds
        self.clock = clock
        self.failures: dict[tuple[str | None, str], deque[float]] = {}

    def wait_seconds(self, user: str, client: str) -> float:
        """0 if `user` may be tried from `client` now, else how long until it may."""
        return max(self._wait(self._key(user, client), self.limit),
                   self._wait((None, client), self.address_limit))

    def failed(self, user: str, client: str) -> None:
        if len(self.failures) >= self.MAX_KEYS:
            self.failures = {k: q for k in list(self.failures) if (q := self._recent(k))}
        for key, limit in ((self._key(user, client), self.limit),
                           ((None, client), self.address_limit)):
            self.failures.setdefault(key, deque(maxlen=limit)).append(self.clock())

    def succeeded(self, user: str, client: str) -> None:
        self.failures.pop(self._key(user, client), None)

    def _key(self, user: str, client: str) -> tuple[str, str]:
        return user[:self.MAX_NAME], client

    def _wait(self, key: tuple[str | None, str], limit: int) -> float:
        recent = self._recent(key)
        if len(recent) < limit:
            return 0.0
        return recent[0] + self.window - self.clock()

    def _recent(self, key: tuple[str | None, str]) -> deque[float]:
        recent = self.failures.get(key, deque())
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
