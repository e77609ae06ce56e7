"""The message contract, checked without any service."""

from __future__ import annotations

import base64
import json
import uuid

import phonenumbers
import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import InvalidMessage, parse_notification
from schemas.jsonschema import SCHEMA_PATH, render
from schemas.message import ID_NAMESPACE, _written_as_e164, derive_id, normalise_phone_number

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


MEDIA = {"name": "a.png", "content_type": "image/png", "content_base64": "AAAA"}
PHONE = b'"sms": {"to_phone_number": "+14155550123"}'


@pytest.mark.parametrize("raw, expected", [
    # Times that Python cannot hold once in UTC, or that a session time zone far from UTC
    # could not load back: a day of margin on each side.
    (message(expire_datetime="9999-12-31T23:00:00-05:00"),
     "expire_datetime: must lie between 0001-01-02 and 9999-12-30 in UTC, "
     "got 9999-12-31T23:00:00-05:00"),
    (message(publish_datetime="0001-01-01T00:30:00+01:00"),
     "publish_datetime: must lie between 0001-01-02 and 9999-12-30 in UTC"),
    (message(expire_datetime="9999-12-31T00:00:00Z"), "expire_datetime: must lie between"),
    (message(publish_datetime="0001-01-01T23:59:59Z"), "publish_datetime: must lie between"),
    # Ten media in all, an inline one included (Twilio's limit).
    (message(sms={"media_url": ["https://e.com/a.png"] * 10, "temporary_media": MEDIA}),
     "sms.temporary_media: at most 10 media in all (media_url and temporary_media together), "
     "got 11"),
    # What pydantic's parser reads but JSON forbids, or Postgres cannot store.
    (b'{"body": NaN, ' + PHONE + b'}', "body: NaN is not a number JSON can carry"),
    (b'{"body": "x", "user_id": -Infinity, ' + PHONE + b'}', "user_id: -Infinity is not a number"),
    (b'{"body": 1e400, ' + PHONE + b'}', "body: 1e400 is not a number JSON can carry"),
    (b'{"body": "a", ' + PHONE + b', "body": "b"}', "body: given twice"),
    (b'{"body": "a", "sms": {"to_phone_number": "+14155550123", "to_phone_number" : "+14155550124"}}',
     "sms.to_phone_number: given twice"),
    (b'{"body" : "a", "body": "b", ' + PHONE + b'}', "body: given twice"),
    (b'{"body": "a", "title": "\\u0000", ' + PHONE + b'}', "title: contains a NUL character"),
    # Numbers given for text fields are counted as their digits, and never repeated whole.
    (b'{"body": "x", "sms": {"to_phone_number": ' + b"1" * 200 + b'}}',
     "sms.to_phone_number: at most 64 characters, got 200"),
    (b'{"body": "x", "title": ' + b"9" * 200 + b', ' + PHONE + b'}',
     "title: at most 124 characters, got 200"),
    (b'{"body": ' + b"[" * 10_000 + b"]" * 10_000 + b'}', "message: not valid JSON (recursion"),
    (message(sms={"media_url": "http://[::1"}), "sms.media_url: not a valid URL"),
    (message(sms={"media_url": "http://e.com:99999999/a.png"}), "sms.media_url: not a valid URL"),
])
def test_odd_input_is_rejected_naming_the_field(raw, expected):
    assert expected in reason(raw)


def test_a_huge_unknown_key_is_named_cut_short():
    text = reason(b'{"body": "x", "' + b"k" * 100_000 + b'": 1, ' + PHONE + b'}')
    assert len(text) < 300 and "(100000 characters): unknown field" in text


@pytest.mark.parametrize("raw", [
    message(publish_datetime="0001-01-02T00:00:00Z", expire_datetime="9999-12-30T23:59:59Z"),
    message(sms={"media_url": ["https://e.com/a.png"] * 9, "temporary_media": MEDIA}),
    message(body="NaN", title="inf", user_id="a \"quoted\" word", url="https://e.com/:x"),
    message(body="\\u0000 is how JSON writes NUL"),
    b'{\n  "body" : "spaced",\n  "sms" : {"to_phone_number" : "+14155550123"}\n}',
])
def test_edge_values_that_are_fine_pass(raw):
    parse_notification(raw)


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


# -- the E.164 shortcut of phone-number validation ----------------------------------------

def by_phonenumbers(raw: str, region: str | None) -> str:
    """What phonenumbers itself makes of a number: parse, check, format (or 'invalid')."""
    try:
        parsed = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return "invalid"
    if not phonenumbers.is_valid_number(parsed):
        return "invalid"
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def by_smsq(raw: str, region: str | None) -> str:
    try:
        return normalise_phone_number.__wrapped__(raw, region)  # not the cache
    except ValueError:
        return "invalid"


def example_numbers() -> list[tuple[int, str]]:
    """(country code, national number) of phonenumbers' example of every type everywhere."""
    numbers = [phonenumbers.example_number_for_type(region, kind)
               for region in phonenumbers.SUPPORTED_REGIONS
               for kind in range(phonenumbers.PhoneNumberType.UNKNOWN)]
    numbers += [phonenumbers.example_number_for_non_geo_entity(code)
                for code in phonenumbers.COUNTRY_CODES_FOR_NON_GEO_REGIONS]
    return sorted({(n.country_code, phonenumbers.national_significant_number(n))
                   for n in numbers if n is not None})


def test_numbers_written_as_e164_are_read_as_phonenumbers_reads_them():
    """Every example number, as E.164 and with a national prefix or a zero written after
    the country code (which phonenumbers may strip): the shortcut never disagrees."""
    numbers, taken = example_numbers(), 0
    for country_code, national in numbers:
        metadata = phonenumbers.PhoneMetadata.metadata_for_region_or_calling_code(
            country_code, phonenumbers.region_code_for_country_code(country_code))
        written = [f"+{country_code}{national}", f"+{country_code}0{national}"]
        if metadata is not None and metadata.national_prefix:
            written.append(f"+{country_code}{metadata.national_prefix}{national}")
        for raw in written:
            assert by_smsq(raw, None) == by_phonenumbers(raw, None), raw
        taken += _written_as_e164(written[0]) is not None
    assert taken > len(numbers) / 2  # the shortcut is taken, mostly


@given(country_code=st.sampled_from(sorted(phonenumbers.COUNTRY_CODE_TO_REGION_CODE)),
       digits=st.text("0123456789", max_size=15), region=st.sampled_from([None, "US", "GB"]))
def test_any_plus_and_digits_is_read_as_phonenumbers_reads_it(country_code, digits, region):
    raw = f"+{country_code}{digits}"
    assert by_smsq(raw, region) == by_phonenumbers(raw, region)
