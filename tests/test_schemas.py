"""The message contract, checked without any service."""

from __future__ import annotations

import base64
import json
import uuid

import pytest

from schemas.errors import InvalidMessage, parse_notification
from schemas.jsonschema import SCHEMA_PATH, render
from schemas.message import ID_NAMESPACE, derive_id

VALID = {"body": "Your code is 482910", "sms": {"to_phone_number": "+14155550123"}}


def message(**changes) -> bytes:
    data = json.loads(json.dumps(VALID))
    sms = changes.pop("sms", None)
    if sms:
        data["sms"].update(sms)
    data.update(changes)
    return json.dumps(data).encode()


def reason(raw: bytes, region: str | None = None) -> str:
    with pytest.raises(InvalidMessage) as caught:
        parse_notification(raw, region)
    return str(caught.value)


def test_committed_json_schema_matches_the_models():
    assert SCHEMA_PATH.read_text() == render(), "run: python -m schemas.jsonschema"


def test_minimal_message_gets_the_documented_defaults():
    n = parse_notification(message())
    assert (n.type, n.priority, n.title, n.id, n.publish_datetime) == ("sms", "low", "", None, None)


@pytest.mark.parametrize("raw_number, region", [
    ("+1 (415) 555-0123", None), ("(415) 555-0123", "US"), ("4155550123", "US")])
def test_phone_numbers_are_normalised_to_e164(raw_number, region):
    n = parse_notification(message(sms={"to_phone_number": raw_number}), region)
    assert n.sms.to_phone_number == "+14155550123"


def test_one_media_url_becomes_a_list():
    n = parse_notification(message(sms={"media_url": "https://example.com/a.png"}))
    assert n.sms.media_url == ["https://example.com/a.png"]


@pytest.mark.parametrize("raw, expected", [
    (b"not json", "message: not valid JSON"),
    (b"[1, 2]", "message: must be a JSON object, got an array"),
    (b"\xff\xfe{}", "message: not UTF-8 text"),
    (b'{"body": "a\xffb", "sms": {"to_phone_number": "+14155550123"}}', "message: not UTF-8 text"),
    (message(body=None), "body: must be a string"),
    (json.dumps({"sms": VALID["sms"]}).encode(), "body: required field is missing"),
    (message(body=""), "body: must not be empty"),
    (message(body="x" * 1601), "body: at most 1600 characters, got 1601"),
    (message(title="t" * 125), "title: at most 124 characters, got 125"),
    (message(sms={"to_phone_number": "+1123"}), "sms.to_phone_number: not a valid phone number: '+1123'"),
    (message(sms={"to_phone_number": "+11234567890"}), "sms.to_phone_number: not a valid phone number"),
    (message(sms={"to_phone_number": "4155550123"}), "sms.to_phone_number: needs a leading +"),
    (message(publish_datetime="2026-11-24T12:00:00"), "publish_datetime: needs a time zone"),
    (message(expire_datetime="2026-11-24T12:00:00"), "expire_datetime: needs a time zone"),
    (message(bdy="typo"), "bdy: unknown field"),
    (message(sms={"too": "+14155550123"}), "sms.too: unknown field"),
    (message(type="email"), "type: channel 'email' is not served here"),
    (message(type="fax"), "type: only 'sms' is served"),
    (message(priority="urgent"), "priority: must be one of 'low', 'medium' or 'high'"),
    (message(id="not-a-uuid"), "id: must be a UUID"),
    (message(sms={"media_url": ["https://e.com/a.png"] * 11}), "sms.media_url: at most 10 items, got 11"),
    (message(sms={"media_url": "ftp://e.com/a.png"}), "sms.media_url: must be an http or https URL"),
    (message(publish_datetime="2026-11-24T12:00:00Z", expire_datetime="2026-11-24T11:00:00Z"),
     "expire_datetime: must be after publish_datetime (2026-11-24T12:00:00+00:00)"),
])
def test_bad_input_is_rejected_naming_the_field(raw, expected):
    assert expected in reason(raw)


def test_inline_media_over_5_mb_is_rejected():
    big = base64.b64encode(b"\0" * (5 * 1024 * 1024 + 1)).decode()
    raw = message(sms={"temporary_media": {"name": "a.png", "content_type": "image/png",
                                           "content_base64": big}})
    assert "sms.temporary_media.content_base64: larger than 5 MB" in reason(raw)


@pytest.mark.parametrize("content_type", ["image/svg+xml", "application/pdf"])
def test_inline_media_must_be_png_jpeg_or_gif(content_type):
    raw = message(sms={"temporary_media": {"name": "a", "content_type": content_type,
                                           "content_base64": "AAAA"}})
    assert "sms.temporary_media.content_type" in reason(raw)


def test_id_comes_from_message_id_or_the_body():
    given = uuid.uuid4()
    assert derive_id(str(given), b"x") == given
    assert derive_id("order-42", b"x") == uuid.uuid5(ID_NAMESPACE, "order-42")
    assert derive_id(None, b'{"a": 1}') == uuid.uuid5(ID_NAMESPACE, '{"a": 1}')
    assert derive_id(None, b"a") != derive_id(None, b"b")
