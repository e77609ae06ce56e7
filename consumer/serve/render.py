"""Jinja2 templates of the dashboard, with the filters that make numbers and times readable."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from starlette.requests import Request
from starlette.responses import Response
from starlette.templating import Jinja2Templates

from consumer.serve import auth, twilio_codes

HERE = Path(__file__).parent
templates = Jinja2Templates(directory=HERE / "templates")


def duration(seconds: float | None) -> str:
    """12 s, 4 min 5 s, 3 h 20 min, 2 d 4 h: short enough for a card, exact enough to act on."""
    if seconds is None:
        return "—"
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds} s"
    minutes, secs = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {secs} s" if secs and minutes < 10 else f"{minutes} min"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    days, hours = divmod(hours, 24)
    return f"{days} d {hours} h" if hours else f"{days} d"


def ago(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return duration((datetime.now(timezone.utc) - moment).total_seconds()) + " ago"


def when(moment: datetime | None) -> str:
    if moment is None:
        return "—"
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def number(value: float | int | None) -> str:
    if value is None:
        return "—"
    if isinstance(value, float) and not value.is_integer():
        return f"{value:,.1f}"
    return f"{int(value):,}"


templates.env.filters.update(duration=duration, ago=ago, when=when, number=number,
                             describe_code=twilio_codes.describe)


# Pages load nothing from elsewhere and may not be framed (a framed "Retry" button could be
# clicked by a visitor of another site); inline style attributes only (the bucket meters).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; style-src 'self' 'unsafe-inline'; "
                               "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def page(request: Request, name: str, status_code: int = 200, **context: object) -> Response:
    """Render a dashboard page; every page gets the CSRF token and pending flash messages."""
    context.update(csrf_token=auth.csrf_token(request),
                   flashes=request.session.pop("flash", []),
                   logged_in=auth.is_logged_in(request))
    return templates.TemplateResponse(request, name, context, status_code=status_code,
                                      headers=SECURITY_HEADERS)
