"""The operator's pages: overview, search, a notification's history, errors, dead letters,
and the actions (retry, cancel, requeue)."""

from __future__ import annotations

import asyncio
import logging
import re
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import psycopg
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from consumer import amqp, money, pipeline
from consumer.logs import error_text, some_ids
from consumer.ops import actions, dead_queue
from consumer.serve import auth, charts, db, delivery_health, params, queries, render
from consumer.settings import Settings
from schemas.message import normalise_phone_number

log = logging.getLogger(__name__)

ERROR_WINDOW_HOURS = 24
SPEND_DAYS = 30
OVERVIEW_DEAD_LETTERS = 10
AUDITED_IDS = 20  # ids an operator action names in its log line, at most
ID_PREFIX = re.compile(r"[0-9a-f]{6,31}")  # shorter would match too many


# ---------------------------------------------------------------- overview


def _overview_data(conn: psycopg.Connection) -> dict:
    table = pipeline.counts_table(conn)
    this_minute, sent_rows = queries.sends_per_minute(conn)
    return {
        "counts": table,
        "totals": {status: sum(row.values()) for status, row in table.items()},
        "chart": charts.bar_chart(charts.per_minute(sent_rows, this_minute)),
        "buckets": pipeline.sender_buckets(conn),
        "dispatchers": pipeline.dispatchers(conn),
        "oldest_due_age": pipeline.oldest_due_age_seconds(conn),
        "past_lease": queries.processing_past_lease(conn),
        "errors": queries.errors_by_code(conn, ERROR_WINDOW_HOURS),
        "guards": pipeline.guard_summary(conn),
        "alerts": delivery_health.alerts_in_force(conn),
        **_spend_data(conn),
    }


def _spend_data(conn: psycopg.Connection) -> dict:
    """Spend per day over SPEND_DAYS (a chart, in the currency most spent) and per country."""
    rows = money.spend_per_day(conn, SPEND_DAYS)
    totals: dict[str, float] = {}
    for _, currency, amount in rows:
        totals[currency] = totals.get(currency, 0.0) + amount
    currency = max(totals, key=totals.__getitem__, default="USD")
    today = datetime.now(timezone.utc).date()
    series = charts.per_day([(day, amount) for day, c, amount in rows if c == currency], today,
                            SPEND_DAYS)
    return {"spend_chart": charts.spend_chart(series), "spend_currency": currency,
            "spend_days": SPEND_DAYS, "spend_by_country": money.spend_by_country(conn, SPEND_DAYS)}


@dataclass(frozen=True)
class QueueView:
    depths: dict[str, int | None]
    dead: list[dead_queue.DeadLetter]
    error: str | None = None


def _queue_view(settings: Settings, limit: int, with_depths: bool = True) -> QueueView:
    """Queue depths and the first dead letters; RabbitMQ being away is shown, not fatal."""
    try:
        depths = amqp.queue_depths(settings) if with_depths else {}
        return QueueView(depths, dead_queue.list_dead(settings, limit))
    except Exception as exc:  # noqa: BLE001 - the page still shows what Postgres knows
        log.warning("dashboard could not read RabbitMQ", extra={"action": "dashboard_amqp_error",
                                                                  "error": error_text(exc)})
        return QueueView({}, [], f"RabbitMQ unreachable ({type(exc).__name__})")


async def overview(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    data, queues = await asyncio.gather(
        db.run(request, _overview_data),
        run_in_threadpool(_queue_view, settings, OVERVIEW_DEAD_LETTERS))
    return render.page(request, "overview.html", **data, queues=queues,
                       queue_name=settings.smsq_queue, dead_queue=settings.dead_queue,
                       error_hours=ERROR_WINDOW_HOURS, statuses=pipeline.STATUSES,
                       priorities=pipeline.PRIORITIES, limits=settings.guard_limits)


# ---------------------------------------------------------------- search and history


def _search(conn: psycopg.Connection, query: str, region: str | None) -> tuple[str, list[dict]]:
    """(what the query was taken for, matching notifications): an id, a Twilio SID or a number."""
    notification_id = _as_uuid(query)
    if notification_id is not None:
        one = queries.notification(conn, notification_id)
        return "id", [one] if one else []
    if query[:2].upper() in ("SM", "MM") and len(query) == 34:
        return "Twilio SID", queries.notifications_by_sid(conn, query)
    number = _as_e164(query, region)
    found = queries.notifications_to(conn, number) if number is not None else []
    prefix = _as_id_prefix(query)
    if not found and prefix is not None:  # 8 decimal digits may be a number too
        if by_prefix := queries.notifications_with_id_prefix(conn, prefix):
            return "id prefix", by_prefix
    return (f"phone number {number}", found) if number is not None else ("nothing", [])


def _as_uuid(text: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(text)
    except ValueError:
        return None


def _as_id_prefix(text: str) -> str | None:
    """The hex digits of the start of an id, as the lists show it (`d4329bc1…`), or None."""
    digits = text.rstrip("….").replace("-", "").lower()
    return digits if ID_PREFIX.fullmatch(digits) else None


def _as_e164(text: str, region: str | None) -> str | None:
    """As ingest stores numbers (so a search finds them), or None for no valid number."""
    try:
        return normalise_phone_number(text, region)
    except ValueError:
        return None


async def search(request: Request) -> Response:
    query = params.text(request.query_params, "q").strip()
    settings: Settings = request.app.state.settings
    taken_as: str = "nothing"
    results: list[dict] = []
    if query:
        taken_as, results = await db.run(request, _search, query, settings.smsq_default_region)
    if taken_as in ("id", "id prefix") and len(results) == 1:
        return RedirectResponse(f"/notifications/{results[0]['id']}", status_code=303)
    return render.page(request, "search.html", q=query, taken_as=taken_as, results=results)


def _detail(conn: psycopg.Connection, notification_id: uuid.UUID) -> dict | None:
    found = queries.notification(conn, notification_id)
    if found is None:
        return None
    media_id = found["temporary_media_id"]
    media = queries.media_of(conn, media_id) if media_id else None
    return {"n": found, "events": queries.history(conn, notification_id), "media": media}


async def notification_page(request: Request) -> Response:
    notification_id = params.notification_id(request.path_params["notification_id"],
                                              "notification_id")
    detail = await db.run(request, _detail, notification_id)
    if detail is None:
        return render.page(request, "missing.html", status_code=404, what="notification")
    return render.page(request, "notification.html", **detail,
                       retryable=actions.RETRYABLE, cancelable=actions.CANCELABLE)


# ---------------------------------------------------------------- errors and dead letters


async def errors_page(request: Request) -> Response:
    code, without_code = params.error_code_filter(request.query_params)
    rows = await db.run(request, queries.recent_errors, ERROR_WINDOW_HOURS, code, without_code)
    return render.page(request, "errors.html", rows=rows, code=code, without_code=without_code,
                       hours=ERROR_WINDOW_HOURS, retryable=actions.RETRYABLE)


async def dead_letters_page(request: Request) -> Response:
    queues = await run_in_threadpool(_queue_view, request.app.state.settings, 500, False)
    return render.page(request, "dead_letters.html", queues=queues,
                       dead_queue=request.app.state.settings.dead_queue)


# ---------------------------------------------------------------- actions


def _ids(form: FormData) -> list[uuid.UUID]:
    return [params.notification_id(raw) for raw in params.texts(form, "id")]


def _back(form: FormData) -> RedirectResponse:
    return RedirectResponse(auth.safe_next(params.text(form, "next")), status_code=303)


def _report(request: Request, action: str, done: list, noun: str, outcome: str,
            hint_when_none: str) -> None:
    """Log an operator action and tell the operator what it did, in one flash message."""
    log.info("operator action", extra={
        "action": f"dashboard_{action}", "count": len(done),
        "user": request.session.get("user"),
        "client": auth.client_address(request),
        "ids": some_ids(done, AUDITED_IDS)})
    text = f"{len(done)} {noun}{'' if len(done) == 1 else 's'} {outcome}."
    auth.flash(request, "success" if done else "warning",
               text if done else f"{text} {hint_when_none}")


@auth.form_action
async def retry_action(request: Request, form: FormData) -> Response:
    ids = _ids(form)
    code, _ = params.error_code_filter(form)
    if not ids and code is None:
        auth.flash(request, "warning", "Nothing selected to retry.")
        return _back(form)
    retried = await db.run(request, actions.retry, ids=ids or None, error_code=code)
    _report(request, "retry", retried, "notification", "back to pending",
            "Only errored or failed ones can be retried.")
    return _back(form)


@auth.form_action
async def cancel_action(request: Request, form: FormData) -> Response:
    ids = _ids(form)
    canceled = await db.run(request, actions.cancel, ids) if ids else []
    _report(request, "cancel", canceled, "notification", "canceled",
            "Only pending ones can be canceled.")
    return _back(form)


@auth.form_action
async def requeue_action(request: Request, form: FormData) -> Response:
    everything = params.text(form, "all") == "1"
    keys = None if everything else params.texts(form, "key")
    if not everything and not keys:
        auth.flash(request, "warning", "Nothing selected to requeue.")
        return _back(form)
    settings: Settings = request.app.state.settings
    sent_back = await run_in_threadpool(dead_queue.requeue, settings, keys)
    _report(request, "requeue", sent_back, "dead letter", f"sent back to {settings.smsq_queue}",
            "They were no longer in the queue.")
    return _back(form)
