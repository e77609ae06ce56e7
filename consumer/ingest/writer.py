"""The writers of `smsq consume`: batches of validated deliveries stored in Postgres.

SMSQ_INGEST_WRITERS threads, each with a database connection of its own, store batches side
by side (one commits while the next is copied in), retrying through a Postgres outage and
through a deadlock with another writer. They never touch pika: the consumer's thread
(consume.py) hands them batches and is woken, with `add_callback_threadsafe`, to acknowledge
what they committed.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

import pika
import psycopg
import tenacity

from consumer import metrics, pipeline, reconnect
from consumer.ingest import storage
from consumer.ingest.delivery_reader import UndecodableProperties, decode_properties
from consumer.logs import error_text, some_ids
from consumer.settings import Settings
from consumer.signals import StopSignal

log = logging.getLogger(__name__)

# Postgres plans the foreign-key check of sms_notification once per session. Planned while
# `notification` is nearly empty, that plan is a sequential scan, kept until the next ANALYZE
# (never, where autovacuum is off), and every insert then reads the whole table: ingest
# slows to a crawl as the table grows. Re-planning now and then keeps it an index lookup.
REPLAN_EVERY_ROWS = 5_000
@dataclass(slots=True)
class Delivery:
    tag: int
    # As the reader leaves them (bytes), decoded on first use: most messages never need them.
    raw_properties: pika.BasicProperties | bytes
    body: bytes
    row: storage.IngestRow | None = None
    error: str | None = None  # why it goes to the dead-letter queue instead
    # Why the properties could not be decoded (they then read as empty), or None.
    properties_error: str | None = None

    @property
    def properties(self) -> pika.BasicProperties:
        if isinstance(self.raw_properties, bytes):
            try:
                self.raw_properties = decode_properties(self.raw_properties)
            except UndecodableProperties as exc:
                self.properties_error = str(exc)
                self.raw_properties = pika.BasicProperties()
        return self.raw_properties


class Outcome(enum.Enum):
    WAITING = "waiting"
    STORED = "stored"
    ABANDONED = "abandoned"  # stopping while Postgres is away: left for the broker to redeliver
    FAILED = "failed"  # an error no retry fixes; the consumer stops


@dataclass(eq=False)
class Batch:
    # The connection whose channel delivered these tags; they mean nothing on another one.
    connection: pika.BlockingConnection
    deliveries: list[Delivery] = field(default_factory=list)
    body_bytes: int = 0
    started: float = field(default_factory=time.monotonic)
    outcome: Outcome = Outcome.WAITING
    failure: BaseException | None = None

    def __len__(self) -> int:
        return len(self.deliveries)

    def age_seconds(self) -> float:
        return time.monotonic() - self.started

    def rows(self) -> list[storage.IngestRow]:
        return [d.row for d in self.deliveries if d.row is not None]


class WriterSession:
    """One writer thread's database connection: opened on first use and after a loss, its
    plans discarded every REPLAN_EVERY_ROWS rows stored."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.db: psycopg.Connection | None = None
        self.rows_since_replan = 0
        self.next_fold = time.monotonic() + pipeline.FOLD_COUNTS_EVERY_SECONDS

    def connection(self) -> psycopg.Connection:
        if self.db is None or self.db.closed:
            self.db = psycopg.connect(self.settings.database_dsn, autocommit=False,
                                      connect_timeout=5, application_name="smsq consume")
            storage.prepare_ingest(self.db)
            metrics.DEPENDENCY_UP.labels("postgres").set(1)
        if self.rows_since_replan >= REPLAN_EVERY_ROWS:
            self.db.execute("DISCARD PLANS")
            self.rows_since_replan = 0
        return self.db

    def stored(self, rows: int) -> None:
        self.rows_since_replan += rows

    def fold_counts_if_due(self) -> None:
        """Every insert appends count deltas (migration 0004): consume folds them too, so
        that a deployment running no `smsq serve` does not grow them forever."""
        if time.monotonic() < self.next_fold or self.db is None or self.db.closed:
            return
        self.next_fold = time.monotonic() + pipeline.FOLD_COUNTS_EVERY_SECONDS
        try:
            folded = pipeline.fold_counts(self.db)
            self.db.commit()
        except psycopg.Error as exc:  # the next batch finds out whether Postgres is away
            log.warning("could not fold the counts", extra={
                "action": "counts_fold_failed", "error": error_text(exc)})
            self.close()
            return
        log.debug("counts folded", extra={"action": "counts_folded", "rows": folded})

    def close(self) -> None:
        if self.db is not None:
            try:
                self.db.close()
            except psycopg.Error:
                pass
            self.db = None


class BatchWriter:
    """Stores batches in SMSQ_INGEST_WRITERS threads, each with a database connection of its
    own, so that one batch's commit (a wait for the disk) overlaps the next one's COPY.

    Batches may commit out of order; the pika thread still acknowledges them in order.
    `on_done(batch)` is called from a writer thread once the batch's outcome is set.
    """

    def __init__(self, settings: Settings, stop: StopSignal,
                 on_done: Callable[[Batch], None]) -> None:
        self.settings = settings
        self.stop = stop
        self.on_done = on_done
        self.pending: queue.SimpleQueue[Batch | None] = queue.SimpleQueue()
        self.gave_up = False
        self.threads = [
            threading.Thread(target=self._run, name=f"smsq-ingest-writer-{number}", daemon=True)
            for number in range(1, settings.smsq_ingest_writers + 1)]

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def submit(self, batch: Batch) -> None:
        self.pending.put(batch)

    def close(self) -> None:
        """Store what was submitted (or give it up if stopping during an outage), then end."""
        for _thread in self.threads:
            self.pending.put(None)
        for thread in self.threads:
            thread.join()

    def _run(self) -> None:
        session = WriterSession(self.settings)
        try:
            while (batch := self.pending.get()) is not None:
                self._store(session, batch)
                self.on_done(batch)
                session.fold_counts_if_due()
        finally:
            session.close()

    def _store(self, session: WriterSession, batch: Batch) -> None:
        # Once a batch is given up (stopping while Postgres is away), so is every batch
        # taken after it: nothing would be gained by storing them, as none is acknowledged.
        if self.gave_up:
            batch.outcome = Outcome.ABANDONED
            return
        try:
            self._store_with_retry(session, batch)
            batch.outcome = Outcome.STORED
        except psycopg.OperationalError:  # raised only once a stop has ended the retries
            self.gave_up = True
            batch.outcome = Outcome.ABANDONED
        except Exception as exc:  # noqa: BLE001 - handed to the pika thread, which raises it
            batch.failure = exc
            batch.outcome = Outcome.FAILED

    def _store_with_retry(self, session: WriterSession, batch: Batch) -> None:
        """Commit the batch's valid rows, retrying while Postgres is away, until stopped."""
        retrying = reconnect.retrying("postgres", self.stop, psycopg.OperationalError, log,
                                      before_sleep=_log_store_retry, first_wait=0.1)
        for attempt in retrying:
            with attempt:
                self._store_once(session, batch)

    def _store_once(self, session: WriterSession, batch: Batch) -> None:
        started = time.perf_counter()
        try:
            db = session.connection()
            new_ids = self._insert(db, batch)
            db.commit()
        except psycopg.errors.DeadlockDetected:
            # A deadlock with another writer (batches holding the same ids in crossing
            # order): Postgres is fine and so is the connection; the batch is tried again.
            db.rollback()
            raise
        except psycopg.OperationalError:
            session.close()
            metrics.DEPENDENCY_UP.labels("postgres").set(0)
            raise
        session.stored(len(new_ids))
        rows = batch.rows()
        metrics.MESSAGES_INGESTED.inc(len(new_ids))
        metrics.MESSAGES_DUPLICATE.inc(len(rows) - len(new_ids))
        metrics.INGEST_BATCH_SECONDS.observe(time.perf_counter() - started)
        metrics.INGEST_BATCH_SIZE.observe(len(batch))
        log.debug("batch stored", extra={"action": "batch_stored", "stored": len(new_ids),
                                         "duplicates": len(rows) - len(new_ids)})
        if len(new_ids) < len(rows):
            _log_already_stored(rows, new_ids)

    def _insert(self, db: psycopg.Connection, batch: Batch) -> list[UUID]:
        try:
            return storage.insert_batch(db, batch.rows())
        except psycopg.DataError:
            db.rollback()
            return self._insert_one_by_one(db, batch)

    def _insert_one_by_one(self, db: psycopg.Connection, batch: Batch) -> list[UUID]:
        """A value that Postgres refuses spoiled the batch: store the others, dead-letter it.

        Validation should leave nothing for Postgres to refuse; this keeps one message that
        slipped through (a NUL character, say) from blocking the queue forever. Only data
        errors: a broken constraint means a bug or a schema out of step, and dead-lettering
        every message for it would be worse than stopping.
        """
        inserted = []
        with db.transaction():
            for delivery in batch.deliveries:
                if delivery.row is None:
                    continue
                try:
                    with db.transaction():  # a savepoint: a refused row spoils only itself
                        inserted += storage.insert_batch(db, [delivery.row])
                except psycopg.DataError as exc:
                    delivery.row = None
                    delivery.error = f"message: refused by the database ({exc})"
        return inserted


def _log_already_stored(rows: list[storage.IngestRow], new_ids: list[UUID]) -> None:
    """Redeliveries after a crash, or a producer publishing an id twice (a changed body too):
    acknowledged, and the stored message left as it was."""
    first_stored, again = set(new_ids), []
    for row in rows:  # an id twice in one batch: the first is stored, the second is not
        if row.id in first_stored:
            first_stored.discard(row.id)
        else:
            again.append(row.id)
    log.info("already stored, acknowledged without storing again", extra={
        "action": "duplicates_acknowledged", "count": len(again),
        "ids": some_ids(again, 10)})


_log_postgres_retry = reconnect.logged("postgres", log)


def _log_store_retry(state: tenacity.RetryCallState) -> None:
    assert state.outcome is not None  # called after a failed attempt
    exc = state.outcome.exception()
    if isinstance(exc, psycopg.errors.DeadlockDetected):
        log.info("batch collided with another writer's, retrying", extra={
            "action": "batch_conflict_retry", "attempt": state.attempt_number,
            "error": error_text(exc)})
    else:
        _log_postgres_retry(state)
