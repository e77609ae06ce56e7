"""Are RabbitMQ and Postgres there? Used by scripts/lib.sh before anything else runs.

    python -m consumer.services check          # exit 0 when both answer and the database exists
    python -m consumer.services need-rabbitmq  # exit 0 when RabbitMQ does NOT answer
    python -m consumer.services need-postgres  # exit 0 when Postgres does NOT answer
    python -m consumer.services wait           # wait for both, then create the database
"""

from __future__ import annotations

import socket
import sys
import time
from urllib.parse import urlsplit

import psycopg
from psycopg import sql

from consumer.settings import ConfigError, Settings, load_settings, split_amqp_urls


def broker_addresses(amqp_url: str) -> list[tuple[str, int]]:
    """(host, port) of each broker of AMQP_URL (one URL, or several separated by commas)."""
    addresses = []
    for url in split_amqp_urls(amqp_url):
        parts = urlsplit(url)
        addresses.append((parts.hostname or "127.0.0.1", parts.port or 5672))
    return addresses


def postgres_addresses(database_url: str) -> list[tuple[str, int]]:
    """(host, port) of each host of DATABASE_URL, libpq's multi-host form included
    (postgresql://user@host1:5432,host2:5432/db): urlsplit cannot read that form."""
    info = psycopg.conninfo.conninfo_to_dict(database_url)
    hosts = str(info.get("host") or "127.0.0.1").split(",")
    ports = str(info.get("port") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [(host or "127.0.0.1", int(port or 5432)) for host, port in zip(hosts, ports)]


def answers(addresses: list[tuple[str, int]]) -> bool:
    """Does any of them accept a TCP connection?"""
    for address in addresses:
        try:
            with socket.create_connection(address, timeout=2):
                return True
        except OSError:
            continue
    return False


def rabbitmq_answers(settings: Settings) -> bool:
    return answers(broker_addresses(settings.amqp_url))


def postgres_answers(settings: Settings) -> bool:
    return answers(postgres_addresses(settings.database_dsn))


def _maintenance_dsn(settings: Settings) -> tuple[str, str]:
    """A DSN to the server's `postgres` database, and the name of ours."""
    info = psycopg.conninfo.conninfo_to_dict(settings.database_dsn)
    name = str(info.get("dbname") or "smsq")
    info["dbname"] = "postgres"
    return psycopg.conninfo.make_conninfo("", **info), name


def ensure_database(settings: Settings) -> bool:
    """Create the database named in DATABASE_URL if it is missing; True if created."""
    dsn, name = _maintenance_dsn(settings)
    with psycopg.connect(dsn, autocommit=True, connect_timeout=5) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True


def wait_for(settings: Settings, seconds: float = 90) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if rabbitmq_answers(settings) and postgres_answers(settings):
            try:
                if ensure_database(settings):
                    print(f"created database {_maintenance_dsn(settings)[1]}", file=sys.stderr)
                return
            except psycopg.OperationalError:
                pass  # Postgres accepts connections before it is ready for them
        time.sleep(0.5)
    missing = [name for name, ok in (("RabbitMQ at AMQP_URL", rabbitmq_answers(settings)),
                                     ("Postgres at DATABASE_URL", postgres_answers(settings)))
               if not ok]
    raise SystemExit(f"not reachable after {seconds:.0f} s: {', '.join(missing) or 'database'}")


def main(argv: list[str]) -> int:
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"smsq: configuration error: {exc}", file=sys.stderr)
        return 2
    verb = argv[0] if argv else "check"
    if verb == "need-rabbitmq":
        return 1 if rabbitmq_answers(settings) else 0
    if verb == "need-postgres":
        return 1 if postgres_answers(settings) else 0
    if verb == "wait":
        wait_for(settings)
        return 0
    if not (rabbitmq_answers(settings) and postgres_answers(settings)):
        return 1
    try:
        ensure_database(settings)
    except psycopg.OperationalError:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
