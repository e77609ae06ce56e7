"""POST /twilio/inbound: Twilio's incoming-message webhook, for opt-out and opt-in keywords.

A recipient who texts an opt-out keyword (SMSQ_OPT_OUT_KEYWORDS: STOP, STOPALL, UNSUBSCRIBE,
CANCEL, END, QUIT, REVOKE, OPTOUT) is put on the suppression list; one who texts an opt-in
keyword (SMSQ_OPT_IN_KEYWORDS: START, YES, UNSTOP) is taken off it, unless an operator put the
number there. The whole text must be the keyword, in any case, with any surrounding spaces, as
Twilio matches them. Other texts are logged and ignored. Signed like the status callback, and
answered with empty TwiML: smsq replies nothing (Twilio's own opt-out replies, when enabled,
are sent by Twilio).
"""

from __future__ import annotations

import logging

import psycopg
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from consumer.metrics import INBOUND_MESSAGES
from consumer.ops import suppression
from consumer.pipeline import LIFTED_BY_OPT_IN, SuppressionReason
from consumer.serve import auth, db, receipts
from consumer.settings import Settings

log = logging.getLogger(__name__)

INBOUND_PATH = "/twilio/inbound"
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'
_MESSAGES = {
    "opt_out": "incoming opt-out keyword: number suppressed",
    "opt_in": "incoming opt-in keyword: number no longer suppressed",
    "ignored": "incoming message without a keyword, ignored",
}


def keyword_kind(body: str, settings: Settings) -> str:
    """`opt_out`, `opt_in` or `ignored`, for the whole text of an incoming message."""
    word = body.strip().upper()
    if word in settings.opt_out_keywords:
        return "opt_out"
    if word in settings.opt_in_keywords:
        return "opt_in"
    return "ignored"


def apply_keyword(conn: psycopg.Connection, number: str, kind: str, keyword: str) -> bool:
    """Change the list for one number; whether it changed."""
    if kind == "opt_out":
        return bool(suppression.add(conn, [number], SuppressionReason.OPT_OUT,
                                    f"texted {keyword}"))
    return bool(suppression.remove(conn, [number], LIFTED_BY_OPT_IN))


async def inbound_message(request: Request) -> Response:
    settings: Settings = request.app.state.settings
    form = await request.form()
    if not receipts.signature_is_valid(settings, request, form):
        INBOUND_MESSAGES.labels("forbidden").inc()
        log.warning("incoming message with a missing or wrong signature, refused",
                    extra={"action": "inbound_forbidden",
                           "client": auth.client_address(request)})
        return PlainTextResponse("invalid or missing X-Twilio-Signature\n", status_code=403)
    sender, body = form.get("From"), form.get("Body")
    if not isinstance(sender, str) or not sender or not isinstance(body, str):
        return PlainTextResponse("From and Body are required\n", status_code=400)
    kind = keyword_kind(body, settings)
    number = suppression.as_e164(sender, None)
    changed = False
    if kind != "ignored" and number is not None:
        changed = await db.run(request, apply_keyword, number, kind, body.strip().upper())
    elif kind != "ignored":  # a short code or an alphanumeric sender: nothing to list
        kind = "ignored"
    INBOUND_MESSAGES.labels(kind).inc()
    log.info(_MESSAGES[kind], extra={
        "action": "inbound_message", "outcome": kind, "from": sender, "changed": changed,
        "message_sid": form.get("MessageSid") or form.get("SmsSid")})
    return Response(EMPTY_TWIML, media_type="text/xml")
