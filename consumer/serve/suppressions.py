"""The dashboard's suppression list: see it, search it, add and remove numbers (as
`smsq suppress` does), each action behind the session's CSRF token."""

from __future__ import annotations

import logging

from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from consumer.ops import suppression
from consumer.pipeline import SuppressionReason
from consumer.serve import auth, db, params, render
from consumer.settings import Settings

log = logging.getLogger(__name__)

PAGE = "/suppressions"
SHOWN = 500  # newest entries on the page; a search finds any other


async def suppressions_page(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    query = params.text(request.query_params, "q").strip()
    number = suppression.as_e164(query, settings.smsq_default_region) if query else None
    if query and number is None:
        entries, problem = [], f"not a valid phone number: {query}"
    else:
        entries, problem = await db.run(request, suppression.listed, number, SHOWN), None
    return render.page(request, "suppressions.html", entries=entries, q=query, problem=problem,
                       shown=SHOWN)


def _numbers(request: Request, form: FormData) -> tuple[list[str], list[str]]:
    """(valid numbers in E.164, what was not a number) of the form's `number` fields, each
    of which may hold several numbers separated by commas or lines (a number may hold
    spaces: `+1 415 555 0123`)."""
    region = request.app.state.settings.smsq_default_region
    raw = [part.strip() for text in params.texts(form, "number")
           for part in text.replace("\n", ",").split(",") if part.strip()]
    numbers = {text: suppression.as_e164(text, region) for text in raw}
    return (list(dict.fromkeys(n for n in numbers.values() if n)),
            [text for text, n in numbers.items() if n is None])


def _report(request: Request, action: str, done: list[str], invalid: list[str],
            outcome: str) -> None:
    log.info("operator action", extra={
        "action": f"dashboard_{action}", "count": len(done),
        "user": request.session.get("user"), "client": auth.client_address(request),
        "numbers": done[:20]})
    text = f"{len(done)} number{'' if len(done) == 1 else 's'} {outcome}."
    if invalid:
        text += f" Not valid phone numbers: {', '.join(invalid[:5])}."
    auth.flash(request, "success" if done and not invalid else "warning", text)


@auth.form_action
async def suppress_action(request: Request, form: FormData) -> Response:
    numbers, invalid = _numbers(request, form)
    note = params.text(form, "note").strip() or "added on the dashboard"
    done = await db.run(request, suppression.add, numbers, SuppressionReason.OPERATOR,
                        note) if numbers else []
    _report(request, "suppress", done, invalid, "suppressed (the others already were)"
            if len(done) < len(numbers) else "suppressed")
    return RedirectResponse(PAGE, status_code=303)


@auth.form_action
async def unsuppress_action(request: Request, form: FormData) -> Response:
    numbers, invalid = _numbers(request, form)
    done = await db.run(request, suppression.remove, numbers) if numbers else []
    _report(request, "unsuppress", done, invalid, "no longer suppressed")
    return RedirectResponse(PAGE, status_code=303)
