"""Helpers for tests that drive the real programs against the real RabbitMQ and Postgres."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pika
import psycopg

from consumer import amqp
from consumer.ingest import storage
from consumer.settings import Settings
from schemas.message import Notification
from schemas.publish import broker_parameters

ROOT = Path(__file__).resolve().parent.parent


def env_of(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment that gives a subprocess exactly these settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SMSQ_", "TWILIO_"))}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
    env.update(extra)
    return env


def start_smsq(settings: Settings, *args: str, log_path: Path | None = None,
               **extra_env: str) -> subprocess.Popen:
    """Start `smsq <args>` as its own process, as an operator would."""
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL
    return subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", *args],
        # Not the repo root: a developer's .env there must not leak into the test.
        env=env_of(settings, **extra_env), cwd=tempfile.gettempdir(), stdout=out,
        stderr=subprocess.STDOUT,
    )


def run_smsq(settings: Settings, *args: str, stdin: str | None = None,
             **extra_env: str) -> subprocess.CompletedProcess:
    """Run `smsq <args>` to its end, as an operator would; its output captured as text."""
    return subprocess.run([sys.executable, "-m", "consumer.cli", *args], input=stdin,
                          env=env_of(settings, **extra_env), cwd=tempfile.gettempdir(),
                          capture_output=True, text=True, timeout=60)


def stop(process: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 20) -> int:
    process.send_signal(sig)
    return process.wait(timeout=timeout)


def declare_queues(settings: Settings) -> None:
    """The test's exchange and queues, as `smsq consume` declares them at start."""
    with amqp.connect(settings, "test") as connection:
        amqp.declare_topology(connection.channel(), settings)


def free_port() -> int:
    """A port nothing listens on now (the OS picks it), for a program the test starts."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], Any], timeout: float = 30, interval: float = 0.05,
               message: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {message}")
        time.sleep(interval)


def publish_raw(settings: Settings, bodies: list[bytes],
                properties: pika.BasicProperties | None = None,
                routing_key: str | None = None, exchange: str | None = None) -> None:
    """Publish bodies as they are (no validation), confirmed, as any producer could."""
    connection = pika.BlockingConnection(broker_parameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        props = properties or pika.BasicProperties(delivery_mode=2)
        for body in bodies:
            channel.basic_publish(
                settings.smsq_exchange if exchange is None else exchange,
                settings.smsq_routing_key if routing_key is None else routing_key,
                body, props, mandatory=True)
    finally:
        connection.close()


def queue_depth(settings: Settings, queue: str) -> int:
    connection = pika.BlockingConnection(broker_parameters(settings.amqp_url))
    try:
        return connection.channel().queue_declare(queue, passive=True).method.message_count
    finally:
        connection.close()


def get_all(settings: Settings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Drain a queue (acknowledging), returning (properties, body) pairs."""
    connection = pika.BlockingConnection(broker_parameters(settings.amqp_url))
    found = []
    try:
        channel = connection.channel()
        while True:
            method, props, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((props, body))
    finally:
        connection.close()


def ingest_row(priority: str = "low", sender: str = "", publish: datetime | None = None,
               notification_id: uuid.UUID | None = None) -> storage.IngestRow:
    """A validated message, as consume hands it to the store."""
    notification = Notification.model_validate({
        "id": notification_id or uuid.uuid4(), "body": "hello", "priority": priority,
        "publish_datetime": publish, "sms": {"to_phone_number": "+14155550123"}})
    return storage.IngestRow.of(notification, sender)


def count_rows(settings: Settings, where: str = "true") -> int:
    with psycopg.connect(settings.database_dsn) as conn:
        return conn.execute(f"SELECT count(*) FROM notification WHERE {where}").fetchone()[0]


class StreamPublisher(threading.Thread):
    """Publishes valid messages, confirmed, until stopped; `published` maps id -> body."""

    def __init__(self, settings: Settings, interval: float = 0.01) -> None:
        super().__init__(daemon=True)
        self.settings = settings
        self.interval = interval
        self.published: dict[str, str] = {}
        self.stopping = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._publish_until_stopped()
        except BaseException as exc:  # noqa: BLE001 - handed to the test by stop()
            self.error = exc

    def _publish_until_stopped(self) -> None:
        connection = amqp.connect(self.settings, "test stream")
        channel = connection.channel()
        amqp.declare_topology(channel, self.settings)  # as `smsq publish` does
        channel.confirm_delivery()
        number = 0
        while not self.stopping.wait(self.interval):
            notification_id, body = str(uuid.uuid4()), f"stream message {number}"
            message = {"id": notification_id, "body": body,
                       "sms": {"to_phone_number": "+14155550123"}}
            channel.basic_publish(self.settings.smsq_exchange, self.settings.smsq_routing_key,
                                  json.dumps(message).encode(),
                                  pika.BasicProperties(delivery_mode=2), mandatory=True)
            self.published[notification_id] = body
            number += 1
        connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=30)
        if self.error:
            raise self.error


def close_amqp_connections_of(pid: int) -> int:
    """Close, from the broker's side, the AMQP connections of one process; return how many."""
    sockets = subprocess.run(["ss", "-tnpH", "state", "established", "( dport = :5672 )"],
                             check=True, capture_output=True, text=True).stdout
    local_ports = {line.split()[2].rsplit(":", 1)[1] for line in sockets.splitlines()
                   if f"pid={pid}," in line}
    connections = subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid", "peer_port"],
        check=True, capture_output=True, text=True).stdout
    closing = [line.split("\t")[0] for line in connections.splitlines()
               if line.split("\t")[1] in local_ports]
    for connection_pid in closing:
        # Not checked: a connection whose client is not reading (consume holding its byte
        # bound) cannot end its channels in time, and rabbitmqctl says so; it is closed anyway.
        subprocess.run(["rabbitmqctl", "close_connection", connection_pid, "closed by test"],
                       capture_output=True)
    wait_until(lambda: not set(closing) & set(subprocess.run(
        ["rabbitmqctl", "list_connections", "-q", "--no-table-headers", "pid"],
        check=True, capture_output=True, text=True).stdout.split()),
        message="the connections to close")
    return len(closing)
