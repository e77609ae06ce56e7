"""The notification message: the contract between producers and smsq.

Every rule of the message format lives here, so the consumer, the CLI and producers written
in Python share one definition; `notification.schema.json` is generated from these models
for producers in other languages.

Contract: docs/contract.md (section 1, Message).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import re
import uuid
from datetime import datetime, timedelta, timezone
from typing import Annotated, Any, Literal, get_args
from urllib.parse import urlsplit

import phonenumbers
from pydantic import (
    AfterValidator,
    AwareDatetime,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
)

MAX_MEDIA_URLS = 10  # Twilio's limit, counting an inline temporary_media too
MAX_INLINE_MEDIA_BYTES = 5 * 1024 * 1024
InlineMediaType = Literal["image/png", "image/jpeg", "image/gif"]
INLINE_MEDIA_TYPES: tuple[str, ...] = get_args(InlineMediaType)
CHANNELS_NOT_SERVED = ("email", "app", "push")

# Namespace of the UUIDv5 ids derived from a message_id that is not a UUID, or from the body.
ID_NAMESPACE = uuid.UUID("6f1c2a4e-8b0d-5c3e-9a71-5d2f0e8b4c19")


class _Strict(BaseModel):
    # Unknown fields are rejected: a typo must not silently drop data. No string is cached
    # while parsing: values (bodies, ids, numbers) rarely repeat, and even caching the keys
    # made validation 15% slower (4.1 against 3.5 us a message, pydantic 2.14).
    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True, frozen=True,
                              cache_strings=False)


# The times a message may carry, in UTC. Python holds years 1 to 9999 and Postgres far more,
# so a time written with an offset (9999-12-31T23:00:00-05:00) could be stored and then
# never loaded again: psycopg hands a timestamptz back in the session's time zone, up to a
# day away from UTC (+14:00 today, local mean times of old dates reach almost 16 h). A day
# of margin on each side keeps every stored time loadable in any session.
EARLIEST_DATETIME = datetime.min.replace(tzinfo=timezone.utc) + timedelta(days=1)
LATEST_DATETIME = datetime.max.replace(tzinfo=timezone.utc) - timedelta(days=1)
_DATETIME_RANGE = (f"between {EARLIEST_DATETIME.date().isoformat()} and "
                   f"{LATEST_DATETIME.date().isoformat()} in UTC")


def _storable(value: datetime) -> datetime:
    try:
        in_utc = value.astimezone(timezone.utc)
    except OverflowError:  # before year 1 or after 9999 once in UTC
        in_utc = None
    if in_utc is None or not EARLIEST_DATETIME <= in_utc <= LATEST_DATETIME:
        raise ValueError(f"must lie {_DATETIME_RANGE}, got {value.isoformat()}")
    return value


StorableDatetime = Annotated[AwareDatetime, AfterValidator(_storable)]


def _one_or_many(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


@functools.lru_cache(maxsize=65_536)
def normalise_phone_number(raw: str, default_region: str | None) -> str:
    """E.164 form of `raw`, or ValueError in words a person understands.

    Cached: parsing is the costliest step of validation and recipients repeat.
    """
    parsed = _written_as_e164(raw)
    if parsed is not None and phonenumbers.is_valid_number(parsed):
        return raw  # already E.164: parsing and formatting it would give it back
    if not raw.startswith("+") and default_region is None:
        raise ValueError(
            f"needs a leading + and country code, or SMSQ_DEFAULT_REGION set: {raw!r}"
        )
    try:
        parsed = phonenumbers.parse(raw, default_region)
    except phonenumbers.NumberParseException:
        raise ValueError(f"not a valid phone number: {raw!r}") from None
    if not phonenumbers.is_valid_number(parsed):
        raise ValueError(f"not a valid phone number: {raw!r}")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


_E164_DIGITS = re.compile(r"\+([1-9][0-9]{6,14})")


def _written_as_e164(raw: str) -> phonenumbers.PhoneNumber | None:
    """The number `raw` names if it is written as E.164 already, as most producers send it.

    phonenumbers.parse reads any way of writing a number, and is half the cost of checking
    one seen for the first time (most recipients of one-time codes are). For "+" and digits
    it only splits off the country code, and strips a national prefix written after it
    ("+44 0...") or keeps a leading zero (Italy): those inputs are left to it (None), as is
    any the country's metadata could read a national prefix from. So whenever this returns
    a number, it is the one parse returns (a country code without metadata gives a number
    is_valid_number refuses, so parse decides it too). tests/test_schemas.py checks both
    agree.
    """
    match = _E164_DIGITS.fullmatch(raw)
    if match is None:
        return None
    digits = match.group(1)
    for length in (1, 2, 3):  # country codes are prefix-free: at most one of these is one
        country_code = int(digits[:length])
        if country_code in phonenumbers.COUNTRY_CODE_TO_REGION_CODE:
            break
    else:
        return None
    national = digits[length:]
    prefix = _national_prefix(country_code)
    if national.startswith("0") or (prefix is not None and prefix.match(national)):
        return None
    return phonenumbers.PhoneNumber(country_code=country_code, national_number=int(national))


@functools.cache
def _national_prefix(country_code: int) -> re.Pattern | None:
    """How a country code's metadata reads a national prefix; None where it reads none."""
    metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
        country_code, phonenumbers.region_code_for_country_code(country_code))
    pattern = metadata.national_prefix_for_parsing if metadata is not None else None
    return re.compile(pattern) if pattern else None


def _check_media_url(url: str) -> str:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - read for its check: a port out of range raises
    except ValueError as exc:
        raise ValueError(f"not a valid URL ({exc}): {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"must be an http or https URL: {url!r}")
    return url


MediaUrl = Annotated[str, Field(min_length=1, max_length=2048)]
_URL_SCHEMA = {"type": "string", "minLength": 1, "maxLength": 2048, "pattern": "^https?://"}
_MEDIA_URL_SCHEMA = {
    "anyOf": [_URL_SCHEMA, {"type": "array", "items": _URL_SCHEMA, "maxItems": MAX_MEDIA_URLS}],
    "description": "one http(s) URL or a list of at most 10 (MMS)",
}


class TemporaryMedia(_Strict):
    """An inline image that smsq hosts itself for Twilio to fetch."""

    name: str = Field(min_length=1, max_length=255)
    content_type: InlineMediaType
    content_base64: str = Field(description="the image, base64-encoded; at most 5 MB decoded")

    @field_validator("content_base64")
    @classmethod
    def _decodes_small_enough(cls, value: str) -> str:
        # Refuse before decoding a huge payload: 4 base64 chars carry 3 bytes.
        if len(value) > (MAX_INLINE_MEDIA_BYTES // 3 + 1) * 4 + 4:
            raise ValueError("larger than 5 MB once decoded")
        try:
            content = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
        if len(content) > MAX_INLINE_MEDIA_BYTES:
            raise ValueError(f"larger than 5 MB once decoded ({len(content)} bytes)")
        if not content:
            raise ValueError("is empty")
        return value

    @property
    def content(self) -> bytes:
        return base64.b64decode(self.content_base64)


class SmsPart(_Strict):
    to_phone_number: str = Field(
        min_length=1, max_length=64, description="E.164 after normalisation, e.g. +14155550123"
    )
    media_url: Annotated[
        list[MediaUrl], BeforeValidator(_one_or_many), WithJsonSchema(_MEDIA_URL_SCHEMA)
    ] = Field(
        default_factory=list,
        max_length=MAX_MEDIA_URLS,
        description="one http(s) URL or a list of at most 10 (MMS)",
    )
    temporary_media: TemporaryMedia | None = Field(
        None, description="counts as one of the 10 media Twilio takes in all")

    @field_validator("to_phone_number")
    @classmethod
    def _e164(cls, value: str, info: ValidationInfo) -> str:
        region = (info.context or {}).get("default_region")
        return normalise_phone_number(value.strip(), region)

    @field_validator("media_url")
    @classmethod
    def _http_only(cls, urls: list[str]) -> list[str]:
        return [_check_media_url(url) for url in urls]

    @field_validator("temporary_media")
    @classmethod
    def _ten_media_in_all(cls, media: TemporaryMedia | None,
                          info: ValidationInfo) -> TemporaryMedia | None:
        # A field validator (media_url is validated before it), not a model validator:
        # the error names the field, and a model validator costs every message a call.
        count = len(info.data.get("media_url", ())) + (media is not None)
        if count > MAX_MEDIA_URLS:
            raise ValueError(f"at most {MAX_MEDIA_URLS} media in all (media_url and "
                             f"temporary_media together), got {count}")
        return media


class Notification(_Strict):
    """One SMS notification, as published to the `notifications` exchange."""

    id: uuid.UUID | None = Field(None, description="idempotency key; derived when absent")
    type: Literal["sms"] = Field("sms", description="only sms is served")
    user_id: str | None = None
    title: str = Field("", max_length=124, description="not part of the SMS text")
    body: str = Field(min_length=1, max_length=1600, description="the SMS text")
    url: str | None = None
    priority: Literal["low", "medium", "high"] = "low"
    publish_datetime: StorableDatetime | None = Field(
        None, description=f"not sent before; default now; {_DATETIME_RANGE}")
    expire_datetime: StorableDatetime | None = Field(
        None, description=f"not sent after; {_DATETIME_RANGE}")
    content_type: str | None = None
    object_id: str | None = None
    sms: SmsPart

    @field_validator("type", mode="before")
    @classmethod
    def _sms_only(cls, value: Any) -> Any:
        if value in CHANNELS_NOT_SERVED:
            raise ValueError(f"channel {value!r} is not served here: smsq sends sms only")
        return value

    # A field validator, not a model one: it runs only for messages that set an expiry
    # (pydantic validates fields in order, so publish_datetime is already in info.data),
    # and its error names the field.
    @field_validator("expire_datetime")
    @classmethod
    def _after_publish(cls, value: datetime | None, info: ValidationInfo) -> datetime | None:
        publish_datetime = info.data.get("publish_datetime")
        if value is not None and publish_datetime is not None and value <= publish_datetime:
            raise ValueError(f"must be after publish_datetime ({publish_datetime.isoformat()})")
        return value

    def with_defaults(self, fallback_id: uuid.UUID, now: datetime | None = None) -> Notification:
        """The message as stored: with its id and publish time filled in."""
        return self.model_copy(
            update={
                "id": self.id or fallback_id,
                "publish_datetime": self.publish_datetime or now or datetime.now(timezone.utc),
            }
        )


def derive_id(message_id: str | bytes | None, body: bytes) -> uuid.UUID:
    """The id of a message that carries none: its AMQP message_id, else a hash of the body.

    A message_id that is not UTF-8 comes as bytes (pika leaves it undecoded); it is hashed
    as it is, as a text one is hashed as its UTF-8 bytes."""
    if isinstance(message_id, str) and message_id:
        try:
            return uuid.UUID(message_id)
        except ValueError:
            return uuid.uuid5(ID_NAMESPACE, message_id)
    return _uuid5_of_bytes(message_id or body)


def _uuid5_of_bytes(name: bytes) -> uuid.UUID:
    # uuid.uuid5 takes text; this is the same hash on bytes.
    digest = hashlib.sha1(ID_NAMESPACE.bytes + name).digest()
    return uuid.UUID(bytes=digest[:16], version=5)
