"""smsq serve's side of the guard rails: POST /twilio/inbound (opt-out and opt-in keywords)
and the dashboard's suppression list."""

from __future__ import annotations

import psycopg
import pytest
from starlette.testclient import TestClient
from twilio.request_validator import RequestValidator

from consumer.serve.app import create_app
from consumer.serve.inbound import EMPTY_TWIML
from tests.web_support import AUTH_TOKEN, PUBLIC_URL, app, client, log_in, web_settings  # noqa: F401

NUMBER = "+14155550188"
URL = PUBLIC_URL + "/twilio/inbound"


def listed(settings) -> dict[str, str]:
    with psycopg.connect(settings.database_dsn) as conn:
        return dict(conn.execute("SELECT phone_number, reason FROM suppressed_number"))


def inbound(web: TestClient, body: str, sender: str = NUMBER, signed: bool = True):
    form = {"From": sender, "To": "+15005550006", "Body": body, "MessageSid": "SM" + "b" * 32,
            "AccountSid": "AC" + "0" * 32}
    signature = RequestValidator(AUTH_TOKEN).compute_signature(URL, form) if signed else "bad"
    return web.post("/twilio/inbound", data=form, headers={"X-Twilio-Signature": signature})


@pytest.fixture
def web(settings):
    with TestClient(create_app(web_settings(settings))) as test_client:
        yield test_client


@pytest.mark.parametrize("keyword", ["STOP", " stop ", "Unsubscribe", "REVOKE", "optout"])
def test_an_opt_out_keyword_suppresses_the_sender(web, settings, keyword):
    answer = inbound(web, keyword)
    assert answer.status_code == 200
    assert answer.text == EMPTY_TWIML and answer.headers["content-type"].startswith("text/xml")
    assert listed(settings) == {NUMBER: "opt_out"}


def test_an_opt_in_keyword_lifts_what_the_recipient_asked_for_only(web, settings):
    operator_number = "+14155550199"
    with psycopg.connect(settings.database_dsn) as conn:
        conn.execute("INSERT INTO suppressed_number (phone_number, reason) "
                     "VALUES (%s, 'operator')", (operator_number,))
    inbound(web, "STOP")
    assert inbound(web, "start").status_code == 200
    assert inbound(web, "UNSTOP", sender=operator_number).status_code == 200
    assert listed(settings) == {operator_number: "operator"}


def test_other_texts_and_bad_signatures_change_nothing(web, settings):
    assert inbound(web, "please stop texting me").status_code == 200
    assert inbound(web, "STOP", signed=False).status_code == 403
    assert listed(settings) == {}


def test_the_keywords_are_settings(settings):
    custom = web_settings(settings, smsq_opt_out_keywords="ARRET", smsq_opt_in_keywords="ARRIBA")
    with TestClient(create_app(custom)) as web:
        inbound(web, "STOP")
        assert listed(settings) == {}
        inbound(web, "arret")
        assert listed(settings) == {NUMBER: "opt_out"}
        inbound(web, "Arriba")
        assert listed(settings) == {}


def test_the_dashboard_adds_and_removes_numbers_with_a_csrf_token(client, settings):  # noqa: F811
    token = log_in(client)
    refused = client.post("/actions/suppress", data={"number": NUMBER},
                          follow_redirects=False)
    assert refused.status_code == 403 and listed(settings) == {}
    added = client.post("/actions/suppress", data={
        "number": f"{NUMBER}, +1 415 555 0199, nonsense", "note": "fraud", "csrf_token": token},
        follow_redirects=False)
    assert added.status_code == 303
    assert listed(settings) == {NUMBER: "operator", "+14155550199": "operator"}
    page = client.get("/suppressions")
    assert NUMBER in page.text and "fraud" in page.text and "nonsense" in page.text  # flash
    assert "+14155550199" in client.get("/suppressions", params={"q": "+1 415 555 0199"}).text
    client.post("/actions/unsuppress", data={"number": NUMBER, "csrf_token": token})
    assert listed(settings) == {"+14155550199": "operator"}
    overview = client.get("/").text
    assert "Guard rails" in overview and "Suppressed numbers" in overview
