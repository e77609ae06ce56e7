"""Every setting is validated at start: a malformed one ends the program with exit status 2
and one line naming the variable, never a traceback."""

from __future__ import annotations

import socket
import subprocess
import sys
import typing

import psycopg
import pytest
from pydantic import AnyHttpUrl, PostgresDsn, SecretStr

from consumer import cli
from consumer.settings import ConfigError, Settings, load_settings
from tests.support import ROOT, run_smsq

# Free-text settings need a hand-picked malformed value; typed ones get one from their type.
MALFORMED_TEXT = {
    "amqp_url": "http://guest:guest@127.0.0.1:5672/",
    "twilio_account_sid": "SK0123456789abcdef0123456789abcdef",  # an API key, not an account
    "smsq_trusted_proxies": "127.0.0.1, my-proxy",
    "smsq_webhook_shared_key": "has spaces in it",
    "twilio_auth_token": "has spaces in it",
    "twilio_phone_number": "555-0123",
    "twilio_messaging_service_sid": "AC0123456789abcdef0123456789abcdef",
    "smsq_default_region": "XX",
    "smsq_http_host": "not a host",
    "smsq_metrics_host": "not a host",
    "smsq_dashboard_user": "ad:min",
    "smsq_dashboard_password": " ",
    "smsq_exchange": "amq.reserved",
    "smsq_queue": "with space",
    "smsq_routing_key": "x" * 256,
    "smsq_senders": "+15005550006,12345",
}
MALFORMED_BY_TYPE = {
    int: "twelve", float: "fast", bool: "maybe", PostgresDsn: "mysql://db/smsq",
    AnyHttpUrl: "ftp://example.com",
}


def malformed_value(name: str) -> str:
    if name in MALFORMED_TEXT:
        return MALFORMED_TEXT[name]
    annotation = typing.get_type_hints(Settings)[name]
    if typing.get_origin(annotation) is typing.Literal:
        return "neither-of-them"
    base = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
    if base in MALFORMED_BY_TYPE:
        return MALFORMED_BY_TYPE[base]
    raise AssertionError(f"add a malformed example of {name.upper()} to MALFORMED_TEXT")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path) -> pytest.MonkeyPatch:
    """No smsq setting from the environment or from a .env file."""
    monkeypatch.chdir(tmp_path)
    for name in Settings.model_fields:
        monkeypatch.delenv(name.upper(), raising=False)
    return monkeypatch


@pytest.mark.parametrize("name", sorted(Settings.model_fields))
def test_malformed_setting_stops_with_exit_2_naming_it(name, clean_env, capsys):
    clean_env.setenv(name.upper(), malformed_value(name))

    status = cli.main(["migrate", "--list"])

    err = capsys.readouterr().err
    assert status == 2
    assert err.count("\n") == 1, err
    assert err.startswith(f"smsq: configuration error: {name.upper()}: "), err


def test_the_error_line_never_echoes_a_secret(clean_env, capsys):
    clean_env.setenv("TWILIO_AUTH_TOKEN", "s3cr3t t0ken")
    assert cli.main(["migrate", "--list"]) == 2
    err = capsys.readouterr().err
    assert "TWILIO_AUTH_TOKEN" in err and "s3cr3t" not in err


def test_settings_that_contradict_each_other_are_named(clean_env):
    clean_env.setenv("SMSQ_RETRY_BACKOFF", "60")
    clean_env.setenv("SMSQ_RETRY_BACKOFF_MAX", "10")
    with pytest.raises(ConfigError, match="SMSQ_RETRY_BACKOFF_MAX"):
        load_settings()


def test_batch_and_prefetch_set_alone_decide_the_other_and_set_both_must_agree(clean_env):
    defaults = load_settings()
    assert (defaults.smsq_ingest_batch_size, defaults.smsq_ingest_writers,
            defaults.smsq_prefetch) == (1000, 3, 5000)  # a batch per writer, and two more
    clean_env.setenv("SMSQ_PREFETCH", "1000")
    assert load_settings().smsq_ingest_batch_size == 200
    clean_env.setenv("SMSQ_INGEST_WRITERS", "1")
    assert load_settings().smsq_ingest_batch_size == 333
    clean_env.delenv("SMSQ_PREFETCH")
    clean_env.setenv("SMSQ_INGEST_BATCH_SIZE", "5000")
    assert load_settings().smsq_prefetch == 15_000
    clean_env.setenv("SMSQ_PREFETCH", "1500")
    with pytest.raises(ConfigError, match="SMSQ_PREFETCH must be at least"):
        load_settings()


@pytest.mark.parametrize("name, value", [
    ("twilio_phone_number", "+15005550006"),
    ("twilio_account_sid", "AC" + "0123456789abcdef" * 2),
    ("twilio_account_sid", "ACfake" + "0" * 28),
    ("twilio_account_sid", "AC1"),
    ("twilio_messaging_service_sid", "MG" + "0123456789abcdef" * 2),
    ("smsq_senders", "+15005550006, +14155550123, MG0123456789abcdef0123456789abcdef"),
    ("smsq_http_host", "0.0.0.0"),
    ("smsq_http_host", "::1"),
    ("smsq_metrics_port", ""),
    ("smsq_metrics_host", "0.0.0.0"),
    ("smsq_dashboard_password", "correct horse battery staple"),
    ("amqp_url", "amqp://guest:guest@node1:5672/%2F, amqp://guest:guest@node2:5672/%2F"),
    ("database_url",
     "postgresql://postgres@db1:5432,db2:5432/smsq?target_session_attrs=read-write"),
])
def test_well_formed_values_pass(name, value, clean_env):
    clean_env.setenv(name.upper(), value)
    load_settings()


@pytest.mark.parametrize("value, problem", [
    ("amqp://guest:secret@node1:5672/%2F,http://node2:5672/",
     "AMQP_URL: entry 2 of 2: must start with amqp:// or amqps://"),
    ("amqp://guest:secret@node1:5672/%2F,", "AMQP_URL: entry 2 of 2: empty (a stray comma?)"),
    ("amqp://guest:secret@node1:56x2/%2F,amqp://node2",
     "AMQP_URL: entry 1 of 2: not a URL (amqp://user:password@host:port/vhost)"),
    ("amqp://node1,amqp://,amqp://node3",
     "AMQP_URL: entry 2 of 3: names no host (amqp://user:password@host:port/vhost)"),
])
def test_each_broker_of_the_list_is_checked_and_named_by_its_place(value, problem, clean_env):
    clean_env.setenv("AMQP_URL", value)
    with pytest.raises(ConfigError) as caught:
        load_settings()
    assert str(caught.value) == problem
    assert "secret" not in str(caught.value)


def test_the_broker_list_and_postgres_hosts_are_read_as_lists(clean_env):
    from consumer.services import broker_addresses, postgres_addresses
    clean_env.setenv("AMQP_URL", "amqp://guest:guest@node1:5673/%2F , amqp://node2")
    clean_env.setenv("DATABASE_URL", "postgresql://postgres@db1:5433,db2/smsq"
                                     "?target_session_attrs=read-write")
    settings = load_settings()
    assert settings.amqp_urls == ["amqp://guest:guest@node1:5673/%2F", "amqp://node2"]
    assert broker_addresses(settings.amqp_url) == [("node1", 5673), ("node2", 5672)]
    assert postgres_addresses(settings.database_dsn) == [("db1", 5433), ("db2", 5432)]


def test_postgres_connections_time_out_per_host_unless_the_url_says(clean_env):
    """libpq (and psycopg) try each host of the list for connect_timeout: without one, a
    black-holed first host holds the others up for psycopg's default of 130 s."""
    info = psycopg.conninfo.conninfo_to_dict(load_settings().database_dsn)
    assert info["connect_timeout"] == "5"
    clean_env.setenv("DATABASE_URL", "postgresql://postgres@db1/smsq?connect_timeout=2")
    assert psycopg.conninfo.conninfo_to_dict(load_settings().database_dsn)["connect_timeout"] == "2"


def test_a_real_process_prints_one_line_and_no_traceback(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "SMSQ_HTTP_PORT": "99999",
           "TWILIO_AUTH_TOKEN": "s3cr3t-t0ken"}
    done = subprocess.run([sys.executable, "-m", "consumer.cli", "consume"], cwd=tmp_path,
                          env={**env, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr == ("smsq: configuration error: SMSQ_HTTP_PORT: "
                           "Input should be less than or equal to 65535\n")


def test_secrets_are_not_shown_by_repr():
    settings = Settings(_env_file=None, twilio_auth_token="s3cr3t-t0ken")
    assert "s3cr3t-t0ken" not in repr(settings)
    assert isinstance(settings.twilio_auth_token, SecretStr)


@pytest.mark.parametrize("program, setting", [("consume", "SMSQ_METRICS_PORT"),
                                              ("serve", "SMSQ_HTTP_PORT")])
def test_a_port_already_taken_stops_the_program_with_exit_2(settings, program, setting):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # its own migrated database: the line must not depend on what `smsq` holds
        done = run_smsq(settings, program, **{setting: str(port)})
    assert done.returncode == 2
    assert done.stderr == (f"smsq {program}: {setting}: cannot listen on 127.0.0.1:{port}: "
                           "Address already in use\n")


def test_an_operator_command_on_a_database_never_migrated_says_so(settings):
    with psycopg.connect(settings.database_dsn, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    done = run_smsq(settings, "status")
    assert done.returncode == 2
    assert done.stderr.startswith("smsq status: DATABASE_URL: the database lacks smsq's tables")
    assert done.stderr.endswith("run `smsq migrate` first\n") and done.stderr.count("\n") == 1


@pytest.mark.parametrize("argv, env, reason", [
    (("status",), {"DATABASE_URL": "postgresql://postgres@127.0.0.1:1/smsq"},
     "smsq status: DATABASE_URL: Postgres unreachable: "),
    (("dead", "list"), {"AMQP_URL": "amqp://guest:s3cret@127.0.0.1:1/%2F"},
     "smsq dead: AMQP_URL: RabbitMQ unreachable: ConnectionRefusedError: "),
])
def test_an_operator_command_without_its_service_ends_with_one_line_exit_1(
        settings, argv, env, reason):
    done = run_smsq(settings, *argv, **env)
    assert done.returncode == 1
    assert done.stderr.startswith(reason) and done.stderr.count("\n") == 1
    assert "s3cret" not in done.stderr


def test_a_postgres_error_is_not_called_unreachable(settings):
    """Postgres answered (here: a lock it would not wait for), so its words are given."""
    separator = "&" if "?" in settings.database_dsn else "?"
    impatient = f"{settings.database_dsn}{separator}options=-c%20lock_timeout%3D200"
    with psycopg.connect(settings.database_dsn) as locker:
        locker.execute("LOCK TABLE notification IN ACCESS EXCLUSIVE MODE")
        done = run_smsq(settings, "status", DATABASE_URL=impatient)
    assert done.returncode == 1
    assert done.stderr == "smsq status: Postgres error: canceling statement due to lock timeout\n"
