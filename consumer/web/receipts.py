"""POST /twilio/status: Twilio's delivery receipts, signature checked, applied forward only."""

from __future__ import annotations

import logging

import psycopg
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from twilio.request_validator import RequestValidator

from consumer.metrics import STATUS_CALLBACKS
from consumer.settings import Settings
from consumer.web import db, delivery, store

log = logging.getLogger(__name__)

CALLBACK_PATH = "/twilio/status"


def signed_url(settings: Settings, request: Request) -> str:
    """The URL Twilio signed: ours as Twilio sees it, under SMSQ_PUBLIC_URL (behind any proxy)."""
    url = str(settings.smsq_public_url).rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


def signature_is_valid(settings: Settings, request: Request, form: object) -> bool:
    signature = request.headers.get("X-Twilio-Signature")
    if not signature:
        return False
    if settings.twilio_auth_token is None or settings.smsq_public_url is None:
        log.error("cannot check Twilio signatures: TWILIO_AUTH_TOKEN or SMSQ_PUBLIC_URL unset",
                  extra={"action": "status_callback_unverifiable"})
        return False
    validator = RequestValidator(settings.twilio_auth_token.get_secret_value())
    return validator.validate(signed_url(settings, request), form, signature)


def record(conn: psycopg.Connection, twilio_sid: str, status: str,
           error_code: int | None) -> tuple[str, object]:
    """Apply one callback; (outcome, notification id). Locks the row: repeats serialise."""
    with conn.transaction():
        found = store.lock_delivery_status(conn, twilio_sid)
        if found is None:
            return "unknown_sid", None
        notification_id, current = found
        if not delivery.moves_forward(current, status):
            return "stale", notification_id
        store.set_delivery_status(conn, notification_id, status, error_code)
        return "applied", notification_id


async def status_callback(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    form = await request.form()
    if not signature_is_valid(settings, request, form):
        STATUS_CALLBACKS.labels("forbidden").inc()
        log.warning("status callback with a missing or wrong signature, refused",
                    extra={"action": "status_callback_forbidden",
                           "client": request.client.host if request.client else None})
        return PlainTextResponse("invalid or missing X-Twilio-Signature\n", status_code=403)
    twilio_sid = form.get("MessageSid") or form.get("SmsSid")
    twilio_status = form.get("MessageStatus") or form.get("SmsStatus")
    if not twilio_sid or not twilio_status:
        return PlainTextResponse("MessageSid and MessageStatus are required\n", status_code=400)
    status = delivery.delivery_status_of(twilio_status)
    if status is None:
        outcome, notification_id = "ignored", None
    else:
        code = delivery.error_code_of(form.get("ErrorCode"))
        outcome, notification_id = await db.run(request, record, twilio_sid, status, code)
    STATUS_CALLBACKS.labels(outcome).inc()
    level = logging.WARNING if outcome == "unknown_sid" else logging.INFO
    log.log(level, "status callback %s", outcome.replace("_", " "),
            extra={"action": "status_callback", "outcome": outcome, "twilio_sid": twilio_sid,
                   "twilio_status": twilio_status, "notification_id": notification_id,
                   "error_code": form.get("ErrorCode") or None})
    # Twilio only needs a 2xx; the body is ignored.
    return Response(status_code=200)
