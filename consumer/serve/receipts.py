"""POST /twilio/status: Twilio's delivery receipts, signature checked, applied forward only."""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass

import psycopg
from starlette.datastructures import FormData
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from consumer import pipeline
from consumer.metrics import STATUS_CALLBACKS
from consumer.pipeline import CALLBACK_OVERRIDES, RESEND_AFTER_FAILURE
from consumer.serve import auth, carrier_outcomes, db, delivery, queries, twilio_signature
from consumer.settings import Settings

log = logging.getLogger(__name__)

CALLBACK_PATH = "/twilio/status"
# A parked receipt whose SID has not shown up after this long never will.
EARLY_RECEIPT_TTL = 86_400.0
_CALLBACK_MESSAGES = {
    "applied": "status callback applied",
    "stale": "status callback older than what is recorded, ignored",
    "ignored": "status callback with a status smsq does not track, ignored",
    "unknown_sid": "status callback for an unknown SID, kept a day in case it is being recorded",
    "adopted": "status callback named a notification whose create answer was lost: its SID "
               "is recorded, the message is sent",
    "superseded": "status callback for a message that was sent again since, ignored",
    "resend": "Twilio failed the message after accepting it and asks for it again: back to "
              "pending",
    "resend_later": "the carrier could not deliver it for now (30003 / 30008): sent again once, "
                    "in 10 minutes",
}


@dataclass(frozen=True)
class ResendPolicy:
    """What a failed 30001 / 30022 callback may do: send again after `delay` seconds, while
    the notification has used fewer than `max_attempts`."""

    max_attempts: int
    delay: float


def signed_url(settings: Settings, request: Request) -> str:
    """The URL Twilio signed: ours as Twilio sees it, under SMSQ_PUBLIC_URL (behind any proxy)."""
    url = str(settings.smsq_public_url).rstrip("/") + request.url.path
    return f"{url}?{request.url.query}" if request.url.query else url


def signature_is_valid(settings: Settings, request: Request, form: object) -> bool:
    if settings.smsq_public_url is None:
        log.error("cannot check Twilio signatures: SMSQ_PUBLIC_URL unset",
                  extra={"action": "status_callback_unverifiable"})
        return False
    # Twilio calls the URL without its fragment (our connection overrides), but may have
    # signed it with them: either is ours.
    url = signed_url(settings, request)
    return any(twilio_signature.is_signed(settings, candidate, form, request.headers)
               for candidate in (url, f"{url}#{CALLBACK_OVERRIDES}"))


def record(conn: psycopg.Connection, twilio_sid: str, status: str, error_code: int | None,
           park_unknown: bool = True, notification_hint: uuid.UUID | None = None,
           resend: ResendPolicy | None = None) -> tuple[str, object]:
    """Apply one callback; (outcome, notification id). Locks the row: repeats serialise.

    A SID not recorded yet may be one the dispatcher is about to commit: the receipt is
    parked, and `apply_early_receipts` applies it once the SID shows up. When the callback
    URL named our notification (`notification_hint`) and that one has no SID yet, the create
    answer was lost: the SID is recorded there and then, and nothing is sent twice.
    """
    with conn.transaction():
        found, adopted = queries.lock_delivery_status(conn, twilio_sid), False
        if found is None:
            superseded = queries.superseded_by(conn, twilio_sid)
            if superseded is not None:
                return "superseded", superseded
            if notification_hint is not None:
                found = queries.adopt_sid(conn, notification_hint, twilio_sid)
                adopted = found is not None
        if found is None:
            if park_unknown:
                queries.park_early_receipt(conn, twilio_sid, status, error_code)
            return "unknown_sid", None
        notification_id, current, attempts = found
        if not delivery.moves_forward(current, status):
            return "stale", notification_id
        if (status == "failed" and error_code in RESEND_AFTER_FAILURE and resend is not None
                and attempts < resend.max_attempts):
            pipeline.send_again(
                conn, [notification_id], f"Twilio failed it after accepting it (error "
                f"{error_code}) and asks for it again: sending again", delay=resend.delay,
                error_code=error_code, delivery_status="failed")
            return "resend", notification_id
        if (carrier_outcomes.sends_again(status, error_code)
                and carrier_outcomes.may_send_again(conn, notification_id)):
            pipeline.send_again(
                conn, [notification_id], f"the carrier could not deliver it (error "
                f"{error_code}): sending again once", error_code=error_code,
                delay=carrier_outcomes.SEND_AGAIN_AFTER_SECONDS, delivery_status=status)
            return "resend_later", notification_id
        queries.set_delivery_status(conn, notification_id, status, error_code)
        if reason := carrier_outcomes.suppression_reason(status, error_code):
            carrier_outcomes.suppress_number_of(conn, notification_id, reason)
        return "adopted" if adopted else "applied", notification_id


def apply_early_receipts(conn: psycopg.Connection, resend: ResendPolicy | None = None) -> int:
    """Apply parked receipts whose SID is now known (in arrival order); how many applied."""
    parked = queries.early_receipts_now_known(conn)
    for _, twilio_sid, status, error_code in parked:
        outcome, notification_id = record(conn, twilio_sid, status, error_code,
                                          park_unknown=False, resend=resend)
        log.info("early status callback applied", extra={
            "action": "status_callback_early", "outcome": outcome, "twilio_sid": twilio_sid,
            "notification_id": notification_id})
    with conn.transaction():
        queries.forget_early_receipts(conn, [row[0] for row in parked], EARLY_RECEIPT_TTL)
    return len(parked)


async def status_callback(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    form = await request.form()
    if not signature_is_valid(settings, request, form):
        STATUS_CALLBACKS.labels("forbidden").inc()
        log.warning("status callback with a missing or wrong signature, refused",
                    extra={"action": "status_callback_forbidden",
                           "client": auth.client_address(request)})
        return PlainTextResponse("invalid or missing X-Twilio-Signature\n", status_code=403)
    twilio_sid = _text(form, "MessageSid") or _text(form, "SmsSid")
    twilio_status = _text(form, "MessageStatus") or _text(form, "SmsStatus")
    if not twilio_sid or not twilio_status:
        return PlainTextResponse("MessageSid and MessageStatus are required\n", status_code=400)
    status = delivery.delivery_status_of(twilio_status)
    if status is None:
        outcome, notification_id = "ignored", None
    else:
        code = delivery.error_code_of(_text(form, "ErrorCode"))
        outcome, notification_id = await db.run(
            request, record, twilio_sid, status, code, True, _hint(request),
            resend_policy(settings))
    STATUS_CALLBACKS.labels(outcome).inc()
    level = (logging.WARNING if outcome in ("unknown_sid", "resend", "resend_later")
             else logging.INFO)
    log.log(level, _CALLBACK_MESSAGES[outcome],
            extra={"action": "status_callback", "outcome": outcome, "twilio_sid": twilio_sid,
                   "twilio_status": twilio_status, "notification_id": notification_id,
                   "error_code": form.get("ErrorCode") or None})
    # Twilio only needs a 2xx; the body is ignored.
    return Response(status_code=200)


def resend_policy(settings: Settings) -> ResendPolicy:
    return ResendPolicy(settings.smsq_max_attempts, settings.smsq_retry_backoff)


def _text(form: FormData, name: str) -> str | None:
    """A field as text; None when absent, or a file (Twilio posts a plain form)."""
    value = form.get(name)
    return value if isinstance(value, str) else None


def _hint(request: Request) -> uuid.UUID | None:
    """The notification id smsq put in the StatusCallback URL (`?n=`), if well formed."""
    try:
        return uuid.UUID(request.query_params.get("n") or "")
    except ValueError:
        return None
