"""Dashboard sessions: a cookie signed with a random key kept in Postgres, and a row per login.

The key is random (one derived from the password let anyone holding a signed cookie, which
the login page hands to every visitor, guess the password offline), shared by every `serve`
copy through Postgres, and replaced when the password changes and by `smsq logout-all`.
The cookie carries the CSRF token, flash messages and, once logged in, a session id; that
id is a row in Postgres, so a logout ends the session on every copy at once, and a session
ends 12 hours after its login however often its cookie is signed again.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import time
from base64 import b64decode, b64encode
from collections.abc import Callable

import itsdangerous
import psycopg
from itsdangerous.exc import BadSignature
from starlette.datastructures import MutableHeaders
from starlette.middleware.sessions import Session
from starlette.requests import HTTPConnection
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from consumer.serve import db, queries

log = logging.getLogger(__name__)

SESSION_COOKIE = "smsq_session"
SESSION_MAX_AGE = 12 * 3600
KEY_BYTES = 32
# A cookie signed with an unknown key may be one another copy signed after a new key: the
# key is read again, at most this often.
RELOAD_SECONDS = 1.0
# Paths of machines (Twilio, Prometheus, load balancers): no cookie, no session, and so no
# database read before they are answered.
WITHOUT_SESSION_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
WITHOUT_SESSION_PREFIXES = ("/twilio/", "/media/", "/static/")


def password_check(password: str, salt: bytes) -> bytes:
    """What the key remembers of the password it was made under: scrypt, slow to guess."""
    return hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)


def log_out_everyone(conn: psycopg.Connection) -> int:
    """A new key, no session rows: every cookie handed out is worthless; how many ended."""
    return queries.replace_session_key(conn, secrets.token_bytes(KEY_BYTES))


class SessionKeys:
    """This process's copy of the shared key; compared with its own password once."""

    def __init__(self, password: str, clock: Callable[[], float] = time.monotonic) -> None:
        self.password = password
        self.clock = clock
        self.secret: bytes | None = None
        self.loaded_at = float("-inf")
        self.password_checked = False

    def load(self, conn: psycopg.Connection) -> bytes:
        found = queries.session_key(conn)
        if found is None:
            queries.create_session_key(conn, *self._new_key())
            found = queries.session_key(conn)
            assert found is not None  # created just now, or by another copy meanwhile
        secret, salt, check = found
        if not self.password_checked:
            if not hmac.compare_digest(password_check(self.password, salt), check):
                secret, salt, check = self._new_key()
                queries.replace_session_key(conn, secret, salt, check)
                log.info("dashboard password changed: new session key, every session ended",
                         extra={"action": "session_key_replaced"})
            self.password_checked = True
        self.secret, self.loaded_at = secret, self.clock()
        return secret

    def _new_key(self) -> tuple[bytes, bytes, bytes]:
        salt = secrets.token_bytes(16)
        return secrets.token_bytes(KEY_BYTES), salt, password_check(self.password, salt)

    async def current(self, conn: HTTPConnection) -> bytes:
        return self.secret if self.secret is not None else await db.run(conn, self.load)

    async def reloaded(self, conn: HTTPConnection, always: bool = False) -> bytes | None:
        """The key as Postgres has it now, if it was not read just now (or `always`)."""
        if not always and self.clock() - self.loaded_at < RELOAD_SECONDS:
            return None
        return await db.run(conn, self.load)


def uses_session(path: str) -> bool:
    return path not in WITHOUT_SESSION_PATHS and not path.startswith(WITHOUT_SESSION_PREFIXES)


def _unsigned(secret: bytes, raw: str) -> dict | None:
    try:
        data = itsdangerous.TimestampSigner(secret).unsign(raw.encode(), max_age=SESSION_MAX_AGE)
        session = json.loads(b64decode(data))
    except (BadSignature, ValueError):
        return None
    return session if isinstance(session, dict) else None


def _signed(secret: bytes, session: dict) -> str:
    data = b64encode(json.dumps(session).encode())
    return itsdangerous.TimestampSigner(secret).sign(data).decode()


class SessionCookie:
    """ASGI middleware: `scope["session"]` from the signed cookie, and the cookie back."""

    def __init__(self, app: ASGIApp, keys: SessionKeys | None, secure: bool) -> None:
        self.app = app
        self.keys = keys  # None: the dashboard is disabled, nothing is signed
        self.flags = "; httponly; samesite=lax" + ("; secure" if secure else "")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not uses_session(scope["path"]):
            await self.app(scope, receive, send)
            return
        conn = HTTPConnection(scope)
        raw = conn.cookies.get(SESSION_COOKIE)
        try:
            if self.keys is not None:
                await self.keys.current(conn)  # read once per process, then kept
            found = await self._open(conn, raw) if raw and self.keys else None
        except db.UNREACHABLE as exc:
            await db.unreachable(conn, exc)(scope, receive, send)
            return
        scope["session"] = Session(found or {})

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                cookie = self._cookie(scope["session"], had_one=found is not None)
                if cookie:
                    MutableHeaders(scope=message).append("Set-Cookie", cookie)
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    async def _open(self, conn: HTTPConnection, raw: str) -> dict | None:
        assert self.keys is not None  # opened only when the dashboard is enabled
        found = _unsigned(await self.keys.current(conn), raw)
        if found is None and (newer := await self.keys.reloaded(conn)) is not None:
            found = _unsigned(newer, raw)
        return found

    def _cookie(self, session: Session, had_one: bool) -> str | None:
        if not session.modified or self.keys is None or self.keys.secret is None:
            return None
        if session:
            value = _signed(self.keys.secret, session)
            return f"{SESSION_COOKIE}={value}; path=/; Max-Age={SESSION_MAX_AGE}{self.flags}"
        if had_one:  # cleared: the browser forgets it
            return (f"{SESSION_COOKIE}=null; path=/; "
                    f"expires=Thu, 01 Jan 1970 00:00:00 GMT{self.flags}")
        return None


async def begin(request: HTTPConnection, user: str) -> None:
    """A fresh session at login: a CSRF token planted before it is worth nothing."""
    keys: SessionKeys = request.app.state.session_keys
    await keys.reloaded(request, always=True)  # the newest key, whatever another copy did
    session_id = secrets.token_urlsafe(32)
    await db.run(request, queries.start_session, session_id, user, SESSION_MAX_AGE)
    request.session.clear()
    request.session.update(user=user, sid=session_id)


async def end(request: HTTPConnection) -> None:
    if isinstance(session_id := request.session.get("sid"), str):
        await db.run(request, queries.end_session, session_id)
    request.session.clear()


async def is_live(request: HTTPConnection, user: str) -> bool:
    """This request's session was opened by a login of `user` and has not ended."""
    given_user, session_id = request.session.get("user"), request.session.get("sid")
    if not (isinstance(given_user, str) and isinstance(session_id, str)
            and hmac.compare_digest(given_user.encode(), user.encode())):
        return False
    return await db.run(request, queries.session_is_live, session_id, user)
