"""Log lines, alone: an action on every line, numbers masked in both formats."""

from __future__ import annotations

import json
import logging

import pika
import pytest

from consumer.logs import JsonFormatter, TextFormatter, error_text, name_the_action


def record(message: str, **extra: object) -> logging.LogRecord:
    made = logging.makeLogRecord({"name": "uvicorn.error", "levelname": "INFO",
                                  "levelno": logging.INFO, "msg": message, **extra})
    name_the_action(made)
    return made


def test_a_library_line_takes_its_logger_name_as_action():
    assert json.loads(JsonFormatter().format(record("Shutting down")))["action"] == "uvicorn.error"


def test_an_smsq_line_keeps_its_action():
    line = JsonFormatter().format(record("sent", action="send_sent", notification_id="n1"))
    assert (json.loads(line)["action"], json.loads(line)["notification_id"]) == ("send_sent", "n1")


@pytest.mark.parametrize("formatter", [JsonFormatter(), TextFormatter()])
def test_numbers_are_masked_but_for_the_last_4_digits(formatter):
    line = formatter.format(record("to +14155550123", action="x", to="+447700900123"))
    assert "+14155550123" not in line and "+447700900123" not in line
    assert "+*******0123" in line and "+********0123" in line


def test_a_failed_rabbitmq_connection_is_described_by_its_cause():
    """pika raises it wrapped in exceptions that have no text of their own."""
    with pytest.raises(pika.exceptions.AMQPConnectionError) as failed:
        pika.BlockingConnection(pika.URLParameters("amqp://guest:guest@127.0.0.1:1/%2F"))
    assert error_text(failed.value).startswith("ConnectionRefusedError: ")
    assert error_text(ValueError("plain")) == "ValueError: plain"
    assert error_text(KeyError()) == "KeyError"


def test_a_field_with_line_breaks_stays_on_the_event_line():
    record = logging.makeLogRecord({"msg": "postgres unavailable", "levelname": "WARNING",
                                    "error": "connection failed: refused\n\tIs the server running?"})
    assert TextFormatter().format(record).endswith(
        "[error=connection failed: refused Is the server running?]")
