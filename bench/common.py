"""What the benchmarks share: throwaway databases, and rates measured from several threads."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from consumer.migrate import migrate

# The server the benchmarks make their databases on (its own database is not touched).
SERVER_URL = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/smsq")


def with_dbname(url: str, name: str) -> str:
    """`url` naming database `name` instead (server, user and options kept)."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextmanager
def scratch_database(name: str, server_url: str = SERVER_URL) -> Iterator[str]:
    """A freshly migrated database of its own; dropped at the end, also on Ctrl-C."""
    admin = with_dbname(server_url, "postgres")
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        url = with_dbname(server_url, name)
        migrate(url)
        yield url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                sql.Identifier(name)))


def calls_per_second(call: Callable[[], object], threads: int, seconds: float) -> float:
    """How often `threads` threads calling `call` over and over for `seconds` got through."""
    deadline = time.monotonic() + seconds
    done = [0] * threads

    def work(slot: int) -> None:
        while time.monotonic() < deadline:
            call()
            done[slot] += 1

    workers = [threading.Thread(target=work, args=(slot,)) for slot in range(threads)]
    started = time.monotonic()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(done) / (time.monotonic() - started)
