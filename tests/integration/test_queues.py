"""Quorum queues by default, a queue of the other kind named in one line, `smsq queues
migrate` moving every message (on the single local broker; a cluster is in
tests/test_engines.py)."""

from __future__ import annotations

import json
import uuid

import pika
import pytest

from consumer import amqp
from consumer.ops import queues as queue_migration
from consumer.ops.dead_queue import list_dead
from tests.integration.test_ingest import queue_types
from tests.support import (
    StreamPublisher,
    declare_queues,
    get_all,
    publish_raw,
    queue_depth,
    run_smsq,
    wait_until,
)


def message(number: int) -> bytes:
    return json.dumps({"id": str(uuid.uuid4()), "body": f"message {number}",
                       "sms": {"to_phone_number": "+14155550123"}}).encode()


def ids_in(settings, queue: str) -> list[str]:
    return [json.loads(body)["id"] for _props, body in get_all(settings, queue)]


def test_a_new_install_declares_quorum_queues(settings):
    assert settings.smsq_quorum_queues  # the default
    declare_queues(settings)
    assert queue_types(settings.smsq_queue, settings.dead_queue) == ["quorum", "quorum"]


def test_a_message_redelivered_forever_is_dead_lettered_not_dropped(settings):
    """Past the delivery limit RabbitMQ moves it to the dead-letter queue (without a
    dead-letter exchange it would drop it), and `smsq dead` says why."""
    declare_queues(settings)
    publish_raw(settings, [message(1)])
    returns = 0
    with amqp.connect(settings, "test") as connection:
        channel = connection.channel()
        while True:
            method, _props, _body = channel.basic_get(settings.smsq_queue, auto_ack=False)
            if method is None:
                break
            channel.basic_nack(method.delivery_tag, requeue=True)
            returns += 1
    assert returns == amqp.DELIVERY_LIMIT + 1
    wait_until(lambda: queue_depth(settings, settings.dead_queue) == 1, message="dead-lettered")
    [dead] = list_dead(settings)
    assert dead.reason.startswith(f"delivered {amqp.DELIVERY_LIMIT} times without being stored")


def test_browsing_the_dead_letters_never_drops_them(settings):
    """`smsq dead list` hands each message back; the dead-letter queue has no limit."""
    declare_queues(settings)
    with amqp.connect(settings, "test") as connection:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish("", settings.dead_queue, message(1),
                              pika.BasicProperties(delivery_mode=2, headers={"x-error": "bad"}))
    for _ in range(amqp.DELIVERY_LIMIT + 5):
        assert [d.reason for d in list_dead(settings)] == ["bad"]


@pytest.mark.parametrize("declared_quorum", [False, True])
def test_consume_on_a_queue_of_the_other_kind_stops_with_one_line(settings, declared_quorum):
    declare_queues(settings.model_copy(update={"smsq_quorum_queues": declared_quorum}))
    configured = settings.model_copy(update={"smsq_quorum_queues": not declared_quorum})

    result = run_smsq(configured, "consume")

    assert result.returncode == 2
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"queue '{settings.smsq_queue}'" in result.stderr
    assert "run `smsq queues migrate`" in result.stderr


@pytest.mark.parametrize("to_quorum", [True, False])
def test_migrate_moves_every_message_while_producers_publish(settings, to_quorum):
    old = settings.model_copy(update={"smsq_quorum_queues": not to_quorum})
    new = settings.model_copy(update={"smsq_quorum_queues": to_quorum})
    declare_queues(old)
    publish_raw(old, [message(n) for n in range(300)])
    publish_raw(old, [b"refused earlier"], routing_key=old.dead_queue, exchange="")
    waiting = set(ids_in_copy(old, old.smsq_queue))
    publisher = StreamPublisher(old, interval=0.002)
    publisher.start()
    wait_until(lambda: len(publisher.published) > 20, message="the producer publishing")

    result = run_smsq(new, "queues", "migrate")
    publisher.stop()

    assert result.returncode == 0, result.stderr
    kind = "quorum" if to_quorum else "classic"
    assert f"queue {settings.smsq_queue}: now a {kind} queue" in result.stdout
    assert queue_types(settings.smsq_queue, settings.dead_queue) == [kind, kind]
    stored = ids_in(new, new.smsq_queue)
    # Every message, those published during the move too; one published while both queues
    # were bound may be there twice (consume stores an id once), none is missing.
    assert set(stored) == waiting | set(publisher.published)
    assert [body for _p, body in get_all(new, new.dead_queue)] == [b"refused earlier"]
    again = run_smsq(new, "queues", "migrate")
    assert f"queue {settings.smsq_queue}: already a {kind} queue" in again.stdout


def ids_in_copy(settings, queue: str) -> list[str]:
    """The ids in a queue, left there (fetched unacknowledged, handed back)."""
    with amqp.connect(settings, "test") as connection:
        channel = connection.channel()
        found = []
        while (got := channel.basic_get(queue, auto_ack=False))[0] is not None:
            found.append(json.loads(got[2])["id"])
        channel.close()
    return found


def test_migrate_resumes_after_a_crash_and_loses_nothing(settings, monkeypatch):
    old = settings.model_copy(update={"smsq_quorum_queues": False})
    declare_queues(old)
    publish_raw(old, [message(n) for n in range(200)])
    waiting = set(ids_in_copy(old, old.smsq_queue))
    real_move = queue_migration.move_messages
    temporary = settings.smsq_queue + queue_migration.TEMPORARY_SUFFIX

    def crash_on_the_way_back(connection, source, target):
        if source == temporary:
            raise ConnectionError("the command died here")
        return real_move(connection, source, target)

    monkeypatch.setattr(queue_migration, "move_messages", crash_on_the_way_back)
    with pytest.raises(ConnectionError):
        queue_migration.migrate_queues(settings)
    # The crash happened between the two moves: the messages sit in the temporary queue.
    assert queue_depth(settings, temporary) == 200
    monkeypatch.setattr(queue_migration, "move_messages", real_move)

    migrations = queue_migration.migrate_queues(settings)

    assert [m.moved_back for m in migrations if m.queue == settings.smsq_queue] == [200]
    assert set(ids_in(settings, settings.smsq_queue)) == waiting
    with pytest.raises(pika.exceptions.ChannelClosedByBroker):
        queue_depth(settings, temporary)  # deleted


def test_migrate_refuses_while_a_consumer_holds_the_queue(settings):
    old = settings.model_copy(update={"smsq_quorum_queues": False})
    declare_queues(old)
    with amqp.connect(old, "test") as connection:
        connection.channel().basic_consume(old.smsq_queue, lambda *args: None)
        result = run_smsq(settings, "queues", "migrate")
    assert result.returncode == 2
    assert "has 1 consumer(s): stop every smsq consume first" in result.stderr
