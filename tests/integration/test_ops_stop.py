"""Clean stops and what the programs log, with every program running against the sandbox.

SIGTERM to each program ends it with exit status 0 within 10 s, mid-traffic, and nothing is
lost or sent twice. Their logs are one JSON object per line with an action name, phone
numbers masked, and no secret.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import psycopg
import pytest

from consumer.sandbox import spawn
from consumer.settings import Settings
from schemas.message import derive_id
from tests.support import (
    StreamPublisher,
    count_rows,
    declare_queues,
    free_port,
    publish_raw,
    start_smsq,
    wait_until,
)

AUTH_TOKEN = "tok-S3CRET-4b1d"
DASHBOARD_PASSWORD = "dash-S3CRET-9e2f"
RECIPIENT = "+14155550123"


@pytest.fixture
def sandbox(settings):
    """`smsq fake-twilio` as its own process, and settings that send through it."""
    process, control = spawn(auth_token=AUTH_TOKEN)
    port = free_port()
    sandboxed = Settings(_env_file=None, **{**settings.model_dump(), **dict(
        twilio_api_url=control.url, twilio_account_sid=control.account_sid,
        twilio_auth_token=AUTH_TOKEN, twilio_phone_number="+15005550006",
        twilio_sms_rate=40.0, smsq_burst=5.0, smsq_http_port=port,
        smsq_public_url=f"http://127.0.0.1:{port}", smsq_dashboard_user="admin",
        smsq_dashboard_password=DASHBOARD_PASSWORD, smsq_log_format="json",
        smsq_log_level="DEBUG")})
    yield sandboxed, control, process
    if process.poll() is None:
        process.kill()


class Programs:
    """consume, dispatch and serve as separate processes, each logging to its own file."""

    def __init__(self, settings, folder: Path) -> None:
        self.settings, self.folder, self.running = settings, folder, {}

    def start(self, name: str) -> None:
        self.running[name] = start_smsq(self.settings, name, log_path=self.folder / f"{name}.log")

    def terminate(self, name: str) -> int:
        """SIGTERM; the exit status, which must come within 10 s."""
        process = self.running.pop(name)
        process.send_signal(signal.SIGTERM)
        return process.wait(timeout=10)

    def kill_all(self) -> None:
        for process in self.running.values():
            process.kill()

    def log_lines(self) -> list[str]:
        return [line for log in sorted(self.folder.glob("*.log"))
                for line in log.read_text().splitlines()]


@pytest.fixture
def programs(sandbox, tmp_path):
    running = Programs(sandbox[0], tmp_path)
    yield running
    running.kill_all()


def sent_count(settings) -> int:
    return count_rows(settings, "status = 'sent'")


def test_sigterm_ends_each_program_with_0_within_10_s_mid_traffic_losing_nothing(
        sandbox, programs):
    settings, control, fake_process = sandbox
    for name in ("consume", "dispatch", "serve"):
        programs.start(name)
    publisher = StreamPublisher(settings, interval=0.005)
    publisher.start()
    try:
        wait_until(lambda: count_rows(settings) >= 30, message="messages to be stored")
        assert programs.terminate("consume") == 0  # while messages keep arriving
        programs.start("consume")
        wait_until(lambda: sent_count(settings) >= 10, message="sends to begin")
    finally:
        publisher.stop()
    assert programs.terminate("dispatch") == 0  # while sends are paced
    assert count_rows(settings, "status = 'processing'") == 0  # claimed rows handed back
    assert sent_count(settings) < len(publisher.published)  # it was stopped mid-traffic
    programs.start("dispatch")

    wait_until(lambda: sent_count(settings) == len(publisher.published), timeout=60,
               message="every message to be sent")
    with psycopg.connect(settings.database_dsn) as conn:
        stored = {str(row[0]) for row in conn.execute("SELECT id FROM notification")}
    assert stored == set(publisher.published)
    accepted = Counter(m["body"] for m in control.messages() if m["accepted"])
    assert accepted == Counter(publisher.published.values())  # each exactly once

    for name in ("consume", "dispatch", "serve"):
        assert programs.terminate(name) == 0, name
    fake_process.send_signal(signal.SIGTERM)
    assert fake_process.wait(timeout=10) == 0


def test_logs_are_json_lines_with_action_and_id_numbers_masked_no_secret(sandbox, programs):
    settings, control, _ = sandbox
    for name in ("consume", "dispatch", "serve"):
        programs.start(name)
    good = {"id": "9b2f6c1e-0c43-4d8e-b2a4-3d1f0e5a7c11", "body": "Your code is 482910",
            "sms": {"to_phone_number": RECIPIENT}}
    bad = {"body": "hi", "sms": {"to_phone_number": "+1415555012"}}
    declare_queues(settings)
    publish_raw(settings, [json.dumps(good).encode(), json.dumps(bad).encode()])
    wait_until(lambda: control.messages(), message="the send")
    wait_until(lambda: count_rows(settings, "status = 'sent'") == 1, message="sent status")
    for name in ("consume", "dispatch", "serve"):
        assert programs.terminate(name) == 0

    lines = programs.log_lines()
    events = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all(event.get("action") for event in events)
    actions_about_it = {e["action"] for e in events if e.get("notification_id") == good["id"]}
    assert actions_about_it, "no event names the notification sent"
    text = "\n".join(lines)
    [dead] = [e for e in events if e["action"] == "message_dead_lettered"]
    assert dead["key"] == str(derive_id(None, json.dumps(bad).encode()))  # as `smsq dead` shows
    assert "5012" in dead["reason"]
    for secret_or_number in (AUTH_TOKEN, DASHBOARD_PASSWORD, RECIPIENT, "+1415555012"):
        assert secret_or_number not in text
