"""Is a webhook from Twilio? Its X-Twilio-Signature, checked with twilio's RequestValidator.

Twilio signs with the account's Auth Token and HMAC-SHA1, unless a Webhook Rule matches the
URL: then with that rule's SharedKey and the algorithm its Setting names (HMAC-SHA256), and
it says so in X-Twilio-Webhooks-Signature-Settings (`key=...,algorithm=HMAC_SHA256`).
"""

from __future__ import annotations

import logging

from starlette.datastructures import Headers
from twilio.request_validator import (
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

from consumer.settings import Settings

log = logging.getLogger(__name__)


def signing_secret(settings: Settings, headers: Headers) -> str | None:
    """The secret this request says it was signed with, if smsq was given it."""
    shared = headers.get(SIGNATURE_SETTINGS_HEADER)
    secret = settings.smsq_webhook_shared_key if shared else settings.twilio_auth_token
    if secret is None:
        missing = "SMSQ_WEBHOOK_SHARED_KEY" if shared else "TWILIO_AUTH_TOKEN"
        log.error(f"cannot check a Twilio signature: {missing} unset",
                  extra={"action": "twilio_signature_unverifiable", "missing": missing})
        return None
    return secret.get_secret_value()


def is_signed(settings: Settings, url: str, form: object, headers: Headers) -> bool:
    """`url` as Twilio requested it (under SMSQ_PUBLIC_URL), `form` the POST parameters."""
    signature = headers.get(SIGNATURE_HEADER)
    if not signature:
        return False
    secret = signing_secret(settings, headers)
    if secret is None:
        return False
    algorithm = get_signature_algorithm(headers.get(SIGNATURE_SETTINGS_HEADER))
    return RequestValidator(secret).validate(url, form, signature, algorithm)
