"""GET/POST /login and POST /logout."""

from __future__ import annotations

import logging
import math

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, RedirectResponse, Response

from consumer.serve import auth, params, render, sessions
from consumer.settings import Settings

log = logging.getLogger(__name__)


async def login_page(request: Request) -> Response:
    if not auth.dashboard_enabled(request.app.state.settings):
        return PlainTextResponse(auth.DISABLED, status_code=403)
    wanted = params.text(request.query_params, "next")
    return render.page(request, "login.html", next=auth.safe_next(wanted))


@auth.form_action
async def login(request: Request, form: FormData) -> Response:
    settings: Settings = request.app.state.settings
    throttle: auth.LoginThrottle = request.app.state.login_throttle
    target = auth.safe_next(params.text(form, "next"))
    client = auth.client_address(request)
    user = params.text(form, "user")
    # Checked before the password, so a guess made while refused tells nothing.
    if (wait := throttle.wait_seconds(user, client)) > 0:
        log.warning("dashboard login refused: too many failures",
                    extra={"action": "login_throttled", "client": client})
        minutes = math.ceil(wait / 60)
        response = render.page(request, "login.html", status_code=429, next=target,
                               error=f"Too many wrong passwords; try again "
                                     f"in {minutes} minute{'s' if minutes > 1 else ''}.")
        response.headers["Retry-After"] = str(math.ceil(wait))
        return response
    if not auth.credentials_match(settings, user, params.text(form, "password")):
        throttle.failed(user, client)
        log.warning("dashboard login refused", extra={"action": "login_refused", "client": client})
        return render.page(request, "login.html", status_code=401, next=target,
                           error="Wrong user name or password.")
    throttle.succeeded(user, client)
    assert settings.smsq_dashboard_user is not None  # the credentials matched it
    await sessions.begin(request, settings.smsq_dashboard_user)
    log.info("dashboard login", extra={"action": "login", "user": settings.smsq_dashboard_user,
                                       "client": client})
    return RedirectResponse(target, status_code=303)


@auth.form_action
async def logout(request: Request, form: FormData) -> Response:
    await sessions.end(request)
    return RedirectResponse("/login", status_code=303)
