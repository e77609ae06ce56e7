"""`smsq publish` and `smsq status`, run as an operator runs them."""

from __future__ import annotations

import json
import uuid

import psycopg
import pytest

from consumer.settings import Settings
from tests.support import declare_queues, get_all, publish_raw, queue_depth, run_smsq


@pytest.fixture
def queues(settings: Settings) -> Settings:
    declare_queues(settings)
    return settings


def test_publish_from_flags(queues):
    done = run_smsq(queues, "publish", "--to", "+1 (415) 555-0123", "--body", "Your code is 1",
                "--priority", "high", "--at", "2026-11-24T12:00:00Z", "--title", "Code",
                "--media-url", "https://e.com/a.png", "--media-url", "https://e.com/b.png")
    assert done.returncode == 0, done.stderr
    published_id = uuid.UUID(done.stdout.strip())
    [(props, body)] = get_all(queues, queues.smsq_queue)
    assert json.loads(body) == {
        "id": str(published_id), "type": "sms", "title": "Code", "body": "Your code is 1",
        "priority": "high", "publish_datetime": "2026-11-24T12:00:00Z",
        "sms": {"to_phone_number": "+14155550123",
                "media_url": ["https://e.com/a.png", "https://e.com/b.png"]}}
    assert (props.message_id, props.delivery_mode, props.content_type) == (
        str(published_id), 2, "application/json")


def test_publish_without_recipient_is_a_usage_error(queues):
    done = run_smsq(queues, "publish", "--body", "hi")
    assert done.returncode == 2
    assert "--to and --body are required" in done.stderr


@pytest.mark.parametrize("flags, expected", [
    (["--body", ""], "smsq publish: --body: must not be empty"),
    (["--body", "hi", "--at", "tomorrow"],
     "smsq publish: --at: not a valid time (input is too short), e.g. 2026-11-24T12:00:00Z"),
    (["--body", "hi", "--to", "+1123"], "smsq publish: --to: not a valid phone number: '+1123'"),
    (["--body", "hi", "--expire", "2020-01-01T00:00:00Z"],
     "smsq publish: --expire: already passed (2020-01-01T00:00:00+00:00): it would never be sent"),
])
def test_a_bad_flag_is_named_as_the_flag(queues, flags, expected):
    done = run_smsq(queues, "publish", "--to", "+14155550123", *flags)
    assert (done.returncode, done.stderr.strip()) == (2, expected)
    assert queue_depth(queues, queues.smsq_queue) == 0


def test_publish_a_json_lines_file(queues, tmp_path):
    lines = [{"body": f"message {n}", "sms": {"to_phone_number": "+14155550123"}}
             for n in range(3)]
    path = tmp_path / "messages.jsonl"
    path.write_text(json.dumps(lines[0]) + "\n\n" + "\n".join(json.dumps(m) for m in lines[1:]))
    done = run_smsq(queues, "publish", "--file", str(path))
    assert done.returncode == 0, done.stderr
    ids = done.stdout.split()
    bodies = [json.loads(body) for _, body in get_all(queues, queues.smsq_queue)]
    assert [b["body"] for b in bodies] == ["message 0", "message 1", "message 2"]
    assert [b["id"] for b in bodies] == ids
    assert "published 3 message(s)" in done.stderr


def test_publish_from_stdin(queues):
    done = run_smsq(queues, "publish", "--file", "-",
                stdin=json.dumps({"body": "hi", "sms": {"to_phone_number": "+14155550123"}}))
    assert done.returncode == 0, done.stderr
    assert queue_depth(queues, queues.smsq_queue) == 1


@pytest.mark.parametrize("bad_line, expected", [
    ('{"body": "' + "x" * 1601 + '", "sms": {"to_phone_number": "+14155550123"}}',
     "line 3: body: at most 1600 characters, got 1601"),
    ('{"body": "hi", "sms": {"to_phone_number": "+1123"}}',
     "line 3: sms.to_phone_number: not a valid phone number: '+1123'"),
    ('{"body": "hi", "sms": {"to_phone_number": "+14155550123"}, "colour": "red"}',
     "line 3: colour: unknown field"),
    ('{"body": "hi", "sms": ', "line 3: not valid JSON"),
])
def test_a_bad_line_names_line_and_field_and_publishes_nothing(queues, tmp_path, bad_line,
                                                               expected):
    good = json.dumps({"body": "fine", "sms": {"to_phone_number": "+14155550123"}})
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join([good, good, bad_line, good]) + "\n")
    done = run_smsq(queues, "publish", "--file", str(path))
    assert done.returncode == 2
    assert expected in done.stderr
    assert done.stdout == ""
    assert queue_depth(queues, queues.smsq_queue) == 0


def test_a_file_that_cannot_be_read_is_a_usage_error(queues, tmp_path):
    missing = run_smsq(queues, "publish", "--file", str(tmp_path / "nope.jsonl"))
    assert (missing.returncode, missing.stderr) == (
        2, f"smsq publish: --file: No such file or directory: {tmp_path / 'nope.jsonl'}\n")
    latin1 = tmp_path / "latin1.jsonl"
    latin1.write_bytes('{"body": "caf\u00e9"}\n'.encode("latin-1"))
    undecodable = run_smsq(queues, "publish", "--file", str(latin1))
    assert (undecodable.returncode, undecodable.stderr) == (
        2, f"smsq publish: --file: not UTF-8 text: {latin1}\n")


def test_every_bad_line_is_named_at_once(queues, tmp_path):
    good = json.dumps({"body": "fine", "sms": {"to_phone_number": "+14155550123"}})
    bad_number = '{"body": "hi", "sms": {"to_phone_number": "+1123"}}'
    too_long = '{"body": "' + "x" * 1601 + '", "sms": {"to_phone_number": "+14155550123"}}'
    path = tmp_path / "messages.jsonl"
    path.write_text("\n".join([good, bad_number, good, too_long, "{"]) + "\n")
    done = run_smsq(queues, "publish", "--file", str(path))
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == (
        "smsq publish: 3 bad line(s) of 5, nothing published:\n"
        "  line 2: sms.to_phone_number: not a valid phone number: '+1123'\n"
        "  line 4: body: at most 1600 characters, got 1601\n"
        "  line 5: not valid JSON (Expecting property name enclosed in double quotes)\n")
    assert queue_depth(queues, queues.smsq_queue) == 0


def test_status_counts_by_status_and_priority_and_queue_depths(queues):
    with psycopg.connect(queues.database_dsn) as conn:
        conn.execute("""
            INSERT INTO notification (id, body, priority, status, publish_datetime)
            SELECT gen_random_uuid(), 'x', p, s, now() - age
            FROM (VALUES ('high', 'pending', interval '10 minutes'),
                         ('high', 'pending', interval '0'), ('low', 'pending', interval '0'),
                         ('medium', 'sent', interval '3 hours'),
                         ('low', 'errored', interval '0')) AS v(p, s, age)""")
    publish_raw(queues, [b"waiting"] * 4)
    publish_raw(queues, [b"dead"], exchange="", routing_key=queues.dead_queue)

    done = run_smsq(queues, "status", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["notifications"]["pending"] == {"high": 2, "medium": 0, "low": 1}
    assert report["notifications"]["sent"] == {"high": 0, "medium": 1, "low": 0}
    assert report["notifications"]["errored"] == {"high": 0, "medium": 0, "low": 1}
    assert report["queues"] == {queues.smsq_queue: 4, queues.dead_queue: 1}
    # The oldest pending one (the sent one, older still, is not due).
    assert 600 <= report["oldest_due_age_seconds"] < 7200

    text = run_smsq(queues, "status")
    assert text.returncode == 0, text.stderr
    lines = text.stdout.splitlines()
    assert lines[0].split() == ["status", "high", "medium", "low", "total"]
    assert "pending 2 0 1 3" in [" ".join(line.split()) for line in lines]
    assert f"queue {queues.smsq_queue}: 4 message(s) ready" in lines
    assert f"queue {queues.dead_queue}: 1 message(s) ready" in lines
