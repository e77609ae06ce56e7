"""The dispatcher's pure pieces: which senders it paces, how a network failure is read."""

from __future__ import annotations

import pytest
import urllib3.exceptions
from urllib3.connection import HTTPConnection

from consumer.dispatch.sharing import paced_senders
from consumer.dispatch.twilio_client import _left_before_failure
from consumer.settings import Settings


def test_paced_senders_are_the_default_one_and_the_pool():
    settings = Settings(_env_file=None, twilio_phone_number="+15005550006",
                        smsq_senders="+15017122661, +15017122662")
    assert paced_senders(settings) == {"": "+15005550006", "+15017122661": "+15017122661",
                                       "+15017122662": "+15017122662"}


def test_a_messaging_service_is_preferred_as_the_default_sender():
    settings = Settings(_env_file=None, twilio_phone_number="+15005550006",
                        twilio_messaging_service_sid="MG" + "1" * 32)
    assert paced_senders(settings) == {"": "MG" + "1" * 32}


def _refused() -> urllib3.exceptions.NewConnectionError:
    return urllib3.exceptions.NewConnectionError(HTTPConnection("h"), "refused")


@pytest.mark.parametrize("failure, sent", [
    (_refused(), False),
    (urllib3.exceptions.ConnectTimeoutError(), False),
    (urllib3.exceptions.ProxyError("Unable to connect to proxy", _refused()), False),
    (urllib3.exceptions.ProxyError("Unable to connect to proxy",
                                   urllib3.exceptions.SSLError("bad record mac")), True),
    (urllib3.exceptions.ReadTimeoutError(None, "/", "read timed out"), True),
    (urllib3.exceptions.ProtocolError("Connection aborted.", ConnectionResetError()), True),
    (urllib3.exceptions.SSLError("bad record mac"), True),
])
def test_only_a_failed_connect_means_the_request_did_not_leave(failure, sent):
    assert _left_before_failure(failure) is sent
