"""`smsq dispatch`: Postgres -> token bucket per sender -> Twilio, by priority, never twice.

One thread runs the loop and owns the two database connections; it never waits on Twilio.

- The lock connection holds a session-level advisory lock per sender this process paces.
  Every second the loop tries to take the free ones, so a standby takes over within about a
  second of the holder's death (Postgres frees the locks when its connection closes).
  Taking a sender over starts with reconciling its rows left in `processing`.
- The work connection claims due rows (`FOR UPDATE SKIP LOCKED`, best priority first) and
  writes outcomes, each in a short transaction of its own: none is open during a Twilio
  request.
- Only about two seconds of a sender's sending is claimed at a time, so a high-priority
  message published into a backlog waits for little, and few rows sit claimed if this
  process dies. A notification of a better priority than the worst row in hand claims the
  better rows at once and merges them in; the surplus goes back to `pending`.
- Rows leave the in-hand queue one by one as the sender's bucket allows, to a bounded pool of
  threads that make the Twilio requests, so Twilio's latency does not cap the rate.
- A listener thread (its own connection, LISTEN smsq_due), the workers and the signal handler
  all post to one event queue; the loop sleeps on it until the next event or the next thing
  it has scheduled (a token, a publish or retry time, the tick), so a due message is sent
  within milliseconds. Outcomes that arrive together are written with one statement.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from uuid import UUID

import psycopg

from consumer import dispatch_store as store
from consumer import metrics
from consumer.bucket import TokenBucket
from consumer.outcomes import Decision, RetryPolicy, TwilioAttempt, decide
from consumer.segments import cost_of
from consumer.settings import Settings
from consumer.logs import error_text
from consumer.signals import StopSignal
from consumer.store import FOLD_COUNTS_EVERY_SECONDS, fold_counts
from consumer.twilio_client import FoundMessage, Outgoing, TwilioSender

log = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # take free senders, save buckets, reconcile expired leases
HORIZON_SECONDS = 2.0  # claim about this much of a sender's sending at a time
# Twilio counts arrivals, and a request's way there varies by milliseconds (a new
# connection, thread scheduling, the network): paced at exactly the rate, two sends of a 1/s
# sender now and then arrive less than a second apart. Pacing 1% slower (10 ms a token at
# 1/s) absorbs that, and still sends within one message a minute of the rate.
PACING_MARGIN = 0.01
SHUTDOWN_GRACE_SECONDS = 5.0  # wait this long for requests on the wire at SIGTERM
MAX_BACKOFF_SECONDS = 10.0
# A row due already but not claimable (locked by an operator's transaction) is looked at
# again after this, not in a busy loop.
MIN_WAKE_SECONDS = 0.05


def paced_senders(settings: Settings) -> dict[str, str]:
    """sender key (as stored in notification.sender) -> the From number or Messaging Service."""
    senders = {}
    default = settings.twilio_messaging_service_sid or settings.twilio_phone_number
    if default:
        senders[""] = default
    for number in settings.extra_senders:
        senders[number] = number
    return senders


@dataclass
class Sender:
    """One paced sender while this process holds its lock."""

    key: str
    address: str
    bucket: TokenBucket
    queue: list = field(default_factory=list)  # heap of (rank, publish, seq, ClaimedRow)
    maybe_due: bool = True  # rows may be due that are not claimed yet
    wake_at: float | None = None  # monotonic time when the next scheduled row becomes due
    notified_rank: int | None = None  # best priority announced since the last claim
    paused_until: float = 0.0  # after a 429 with Retry-After

    def worst_rank(self) -> int:
        return max(entry[0] for entry in self.queue)


@dataclass
class SendResult:
    row: store.ClaimedRow
    attempt: TwilioAttempt | None
    error: Exception | None
    seconds: float
    finished: datetime


@dataclass
class ReconcileResult:
    row: store.ClaimedRow
    found: list[FoundMessage]
    error: Exception | None


class WorkerPool:
    """Daemon threads that run the Twilio calls and post each result to the loop.

    Daemon threads, unlike concurrent.futures', do not hold the process at exit: a request
    stuck until its read timeout must not stretch a SIGTERM past its grace period.
    """

    def __init__(self, size: int, results: queue.SimpleQueue) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.results = results
        for number in range(size):
            threading.Thread(target=self._work, name=f"twilio-{number}", daemon=True).start()

    def submit(self, call: Callable[..., object], *args: object) -> None:
        self.tasks.put((call, args))

    def _work(self) -> None:
        while True:
            call, args = self.tasks.get()
            self.results.put(("done", call(*args)))


class DueListener(threading.Thread):
    """LISTEN smsq_due on a connection of its own; posts ('due', sender, rank) events."""

    def __init__(self, settings: Settings, events: queue.SimpleQueue, stop: StopSignal) -> None:
        super().__init__(name="listen", daemon=True)
        self.dsn, self.events, self.stop = settings.database_dsn, events, stop

    def run(self) -> None:
        self.backoff = 0.5
        while not self.stop.requested:
            try:
                self._listen()
            except psycopg.OperationalError as exc:
                if self.stop.requested:
                    return
                log.warning("listen connection lost", extra={"action": "listen_retry",
                                                             "error": error_text(exc)})
                self.stop.wait(self.backoff)
                self.backoff = min(self.backoff * 2, MAX_BACKOFF_SECONDS)

    def _listen(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True,
                             application_name="smsq dispatch listen") as conn:
            conn.execute("LISTEN smsq_due")
            self.backoff = 0.5  # listening again: the next loss starts its backoff afresh
            self.events.put(("poll",))  # whatever was announced while nobody listened
            while not self.stop.requested:
                for notify in conn.notifies(timeout=1.0):
                    sender, _, rank = notify.payload.rpartition(" ")
                    self.events.put(("due", sender, int(rank)))


class Dispatcher:
    def __init__(self, settings: Settings, stop: StopSignal) -> None:
        self.settings = settings
        self.stop = stop
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.addresses = paced_senders(settings)
        self.policy = RetryPolicy(settings.smsq_max_attempts, settings.smsq_retry_backoff,
                                  settings.smsq_retry_backoff_max)
        self.lease = settings.smsq_lease_seconds
        self.concurrency = settings.smsq_dispatch_concurrency
        self.in_hand_target = max(1, min(settings.twilio_sms_batch_size, math.ceil(
            settings.twilio_sms_rate * HORIZON_SECONDS + settings.smsq_burst)))
        self.twilio = TwilioSender(settings, self.concurrency)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self.pool = WorkerPool(self.concurrency, self.events)
        self.held: dict[str, Sender] = {}
        self.in_flight: dict[UUID, store.ClaimedRow] = {}  # sends and reconciliations
        self.outcomes: list[store.Outcome] = []
        self.lock_db: psycopg.Connection | None = None
        self.db: psycopg.Connection | None = None
        self.sequence = itertools.count()  # heap tie-breaker
        self.turn = 0
        self.next_tick = self.next_poll = self.next_renew = self.next_fold = 0.0

    # -- the outer loop: connect, dispatch, reconnect ------------------------------------------

    def run(self) -> None:
        DueListener(self.settings, self.events, self.stop).start()
        threading.Thread(target=self._wake_on_stop, name="stop", daemon=True).start()
        log.info("dispatching", extra={"action": "dispatch_started", "holder": self.holder,
                                       "senders": len(self.addresses)})
        backoff = 0.5
        while not self.stop.requested:
            try:
                self._connect()
                backoff = 0.5
                self._loop()
            except psycopg.OperationalError as exc:
                log.warning("postgres unavailable, retrying", extra={
                    "action": "postgres_retry", "wait_seconds": backoff,
                    "error": error_text(exc)})
                self._forget_senders()
                self._close()
                self.stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_SECONDS)
        self._shut_down()
        log.info("dispatcher stopped", extra={"action": "dispatch_stopped"})

    def _wake_on_stop(self) -> None:
        self.stop.wait(None)
        self.events.put(("stop",))

    def _connect(self) -> None:
        dsn = self.settings.database_dsn
        if self.lock_db is None or self.lock_db.closed:
            self.lock_db = psycopg.connect(dsn, autocommit=True,
                                           application_name="smsq dispatch locks")
        if self.db is None or self.db.closed:
            self.db = psycopg.connect(dsn, autocommit=True, application_name="smsq dispatch")
        metrics.DEPENDENCY_UP.labels("postgres").set(1)

    def _close(self) -> None:
        metrics.DEPENDENCY_UP.labels("postgres").set(0)
        for conn in (self.lock_db, self.db):
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self.lock_db = self.db = None

    def _loop(self) -> None:
        while not self.stop.requested:
            self._flush_outcomes()  # first: a row put back to pending must be claimable
            now = time.monotonic()
            if now >= self.next_tick:
                self._tick(now)
            self._claim_where_needed(now)
            self._release_ready()
            self._flush_outcomes()
            self._wait_for_events(self._next_wake(now) - time.monotonic())

    # -- every second: senders, buckets, leases -------------------------------------------------

    def _tick(self, now: float) -> None:
        self.next_tick = now + TICK_SECONDS
        # Also proves the lock connection alive: if it died, our locks are gone with it.
        for key in store.try_lock_senders(self.lock_db, [k for k in self.addresses
                                                          if k not in self.held]):
            self._take_over(key)
        self._save_buckets(self.holder)
        if now >= self.next_renew:
            self.next_renew = now + self.lease / 4
            store.renew_leases(self.db, self._claimed_ids(), self.holder, self.lease)
        self._reconcile(list(self.held), expired_only=True)
        if now >= self.next_fold:  # keeps the counts cheap to read, with or without serve
            self.next_fold = now + FOLD_COUNTS_EVERY_SECONDS
            fold_counts(self.db)
        if now >= self.next_poll:  # the fallback, should a notification ever be missed
            self.next_poll = now + self.settings.smsq_dispatch_poll_seconds
            for sender in self.held.values():
                sender.maybe_due = True

    def _take_over(self, key: str) -> None:
        bucket = TokenBucket(self.settings.twilio_sms_rate * (1 - PACING_MARGIN),
                             self.settings.smsq_burst)
        self.held[key] = Sender(key, self.addresses[key], bucket)
        metrics.SENDERS_HELD.set(len(self.held))
        log.info("pacing sender", extra={"action": "sender_acquired", "sender": key or "default",
                                         "holder": self.holder})
        # A previous holder may have died mid-send: ask Twilio before anything is resent.
        self._reconcile([key], expired_only=False)

    def _save_buckets(self, holder: str | None) -> None:
        rows = []
        for sender in self.held.values():
            tokens = sender.bucket.tokens
            metrics.BUCKET_TOKENS.labels(sender.key or "default").set(tokens)
            rows.append((sender.key, sender.address, holder, tokens,
                         self.settings.twilio_sms_rate, sender.bucket.capacity))
        store.save_buckets(self.db, rows)

    def _queued_ids(self) -> list[UUID]:
        return [entry[-1].id for sender in self.held.values() for entry in sender.queue]

    def _claimed_ids(self) -> list[UUID]:
        return self._queued_ids() + list(self.in_flight)

    # -- claiming -------------------------------------------------------------------------------

    def _claim_where_needed(self, now: float) -> None:
        for sender in self.held.values():
            if sender.wake_at is not None and now >= sender.wake_at:
                sender.maybe_due, sender.wake_at = True, None
            if not sender.maybe_due:
                continue
            if len(sender.queue) <= self.in_hand_target // 2:
                self._claim(sender, self.in_hand_target - len(sender.queue), max_rank=2)
            elif sender.notified_rank is not None and sender.notified_rank < sender.worst_rank():
                self._claim(sender, self.in_hand_target, max_rank=sender.worst_rank() - 1)
                self._hand_back_surplus(sender)
            sender.notified_rank = None

    def _claim(self, sender: Sender, limit: int, max_rank: int) -> None:
        claim = store.claim_due(self.db, sender.key, self.holder, limit, self.lease, max_rank)
        for row in claim.rows:
            heapq.heappush(sender.queue, (row.priority_rank, row.publish_datetime,
                                          next(self.sequence), row))
        if claim.drained:
            # Sleep until the next scheduled row (or a notification) instead of polling.
            sender.maybe_due = False
            sender.wake_at = (None if claim.next_due_in is None
                              else time.monotonic() + max(claim.next_due_in, MIN_WAKE_SECONDS))

    def _hand_back_surplus(self, sender: Sender) -> None:
        if len(sender.queue) <= self.in_hand_target:
            return
        ordered = sorted(sender.queue)
        sender.queue = ordered[:self.in_hand_target]  # a sorted list is a heap
        store.release_unsent(self.db, [entry[-1].id for entry in ordered[self.in_hand_target:]],
                             self.holder)

    # -- releasing, as the buckets allow --------------------------------------------------------

    def _release_ready(self) -> None:
        senders = list(self.held.values())
        self.turn = (self.turn + 1) % max(1, len(senders))
        for sender in senders[self.turn:] + senders[:self.turn]:  # no sender always first
            self._release_from(sender)

    def _release_from(self, sender: Sender) -> None:
        while sender.queue and len(self.in_flight) < self.concurrency:
            row = sender.queue[0][-1]
            if row.expire_datetime is not None and row.expire_datetime <= _utcnow():
                heapq.heappop(sender.queue)
                self._expire(row)
                continue
            if time.monotonic() < sender.paused_until:
                return
            if not sender.bucket.try_take(_cost(row)):
                return
            heapq.heappop(sender.queue)
            self.in_flight[row.id] = row
            self.pool.submit(self._send, sender.address, row)

    def _expire(self, row: store.ClaimedRow) -> None:
        message = f"expired at {row.expire_datetime.isoformat()} before it could be sent"
        self.outcomes.append(store.Outcome(row.id, "errored", message, attempted=False))
        metrics.DISPATCH_SENDS.labels("expired", "").inc()
        log.info("message expired", extra={"action": "message_expired",
                                           "notification_id": str(row.id)})

    def _next_wake(self, now: float) -> float:
        wake = min(self.next_tick, self.next_poll)
        for sender in self.held.values():
            if sender.wake_at is not None:
                wake = min(wake, sender.wake_at)
            if sender.queue and len(self.in_flight) < self.concurrency:
                wait = sender.bucket.wait_time(_cost(sender.queue[0][-1]))
                wake = min(wake, max(now + wait, sender.paused_until))
        return wake

    # -- events: notifications and results --------------------------------------------------------

    def _wait_for_events(self, timeout: float) -> None:
        try:
            event = self.events.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return
        while True:
            self._handle(event)
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return

    def _handle(self, event: tuple) -> None:
        kind = event[0]
        if kind == "due":
            sender = self.held.get(event[1])
            if sender is not None:
                sender.maybe_due = True
                rank = event[2]
                sender.notified_rank = min(rank, sender.notified_rank if
                                           sender.notified_rank is not None else rank)
        elif kind == "poll":
            for sender in self.held.values():
                sender.maybe_due = True
        elif kind == "done":
            result = event[1]
            self.in_flight.pop(result.row.id, None)
            if isinstance(result, SendResult):
                self._on_sent(result)
            else:
                self._on_reconciled(result)

    # -- sending (in a worker thread) and its outcome (in the loop) ----------------------------

    def _send(self, address: str, row: store.ClaimedRow) -> SendResult:
        started = time.perf_counter()
        try:
            attempt, error = self.twilio.send(_outgoing(row, address)), None
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the row becomes failed
            attempt, error = None, exc
        seconds = time.perf_counter() - started
        metrics.TWILIO_REQUEST_SECONDS.observe(seconds)
        return SendResult(row, attempt, error, seconds, _utcnow())

    def _on_sent(self, result: SendResult) -> None:
        row = result.row
        if result.error is not None:
            decision = Decision("failed", status_message=(
                f"smsq error: {type(result.error).__name__}: {result.error}"))
        else:
            decision = decide(result.attempt, row.attempts + 1, self.policy)
        self.outcomes.append(self._outcome_of(result, decision))
        self._pause_after_retry_after(result)
        if decision.retry_in is not None:
            self._wake_for(row.sender, time.monotonic() + decision.retry_in)
        code = decision.error_code
        metrics.DISPATCH_SENDS.labels(decision.status, str(code) if code else "").inc()
        log.info(_SEND_LOG[decision.status][1], extra={
            "action": _SEND_LOG[decision.status][0], "notification_id": str(row.id),
            "sid": result.attempt.sid if result.attempt else None, "error_code": code,
            "status_message": decision.status_message or None,
            "twilio_ms": round(result.seconds * 1000, 1)})

    def _outcome_of(self, result: SendResult, decision: Decision) -> store.Outcome:
        row, attempt = result.row, result.attempt
        if decision.status == "sent":
            return store.Outcome(row.id, "sent", sid=attempt.sid,
                                 segments=attempt.segments or _cost(row),
                                 sent_datetime=result.finished)
        return store.Outcome(
            row.id, decision.status, decision.status_message, error_code=decision.error_code,
            retry_in=decision.retry_in,
            lease_seconds=self.lease if decision.status == "processing" else None,
            attempted=attempt is not None)

    def _wake_for(self, sender_key: str, at: float) -> None:
        """Look for due rows of this sender again at `at` (a retry we scheduled ourselves)."""
        sender = self.held.get(sender_key)
        if sender is not None:
            sender.wake_at = at if sender.wake_at is None else min(sender.wake_at, at)

    def _pause_after_retry_after(self, result: SendResult) -> None:
        sender = self.held.get(result.row.sender)
        if sender is not None and result.attempt is not None and result.attempt.retry_after:
            # Twilio asked this account to slow down: hold the whole sender, not just the row.
            sender.paused_until = time.monotonic() + result.attempt.retry_after

    # -- reconciling rows whose outcome is unknown ---------------------------------------------

    def _reconcile(self, senders: list[str], expired_only: bool) -> None:
        if not senders:
            return
        rows = store.stale_processing(self.db, senders, self._claimed_ids(), expired_only)
        for row in rows:
            self.in_flight[row.id] = row
            self.pool.submit(self._find, self.addresses[row.sender], row)

    def _find(self, address: str, row: store.ClaimedRow) -> ReconcileResult:
        try:
            found = self.twilio.find_sent(_outgoing(row, address), row.claimed_datetime)
            return ReconcileResult(row, found, None)
        except Exception as exc:  # noqa: BLE001 - Twilio unreachable: try again later
            return ReconcileResult(row, [], exc)

    def _on_reconciled(self, result: ReconcileResult) -> None:
        row = result.row
        if result.error is not None:
            self.outcomes.append(store.Outcome(
                row.id, "processing", f"reconciliation failed, will retry: {result.error}",
                lease_seconds=self.lease, attempted=False))
            log.warning("reconciliation failed", extra={
                "action": "reconcile_failed", "notification_id": str(row.id),
                "error": str(result.error)})
            return
        if self._sending_to(row.to_phone_number):
            # A send of ours to the same number may be the message Twilio listed: decide
            # once that one is recorded (the row is looked at again, its lease expired).
            return
        found = self._first_unrecorded(result.found)
        if found is not None:
            self.outcomes.append(store.Outcome(
                row.id, "sent", sid=found.sid, segments=found.segments or _cost(row),
                sent_datetime=found.date_created, attempted=False))
            self._log_reconciled(row, "sent", found.sid)
        elif row.lease_expired:
            self.outcomes.append(store.Outcome(
                row.id, "pending", "not found at Twilio after an unknown outcome; sending again",
                attempted=False))
            self._wake_for(row.sender, time.monotonic())
            self._log_reconciled(row, "pending", None)
        # Else: not found yet, but its lease is still running (a request of a holder that just
        # died may still be on its way to Twilio); it is looked at again when the lease expires.

    def _sending_to(self, number: str) -> bool:
        return any(row.to_phone_number == number for row in self.in_flight.values())

    def _first_unrecorded(self, found: list[FoundMessage]) -> FoundMessage | None:
        """The first match whose SID no other row holds, in the database or about to be."""
        if not found:
            return None
        recorded = store.recorded_sids(self.db, [message.sid for message in found])
        recorded.update(outcome.sid for outcome in self.outcomes if outcome.sid)
        return next((message for message in found if message.sid not in recorded), None)

    def _log_reconciled(self, row: store.ClaimedRow, status: str, sid: str | None) -> None:
        metrics.DISPATCH_RECONCILED.labels("found" if status == "sent" else "not_found").inc()
        log.info("reconciled with twilio", extra={
            "action": "reconciled", "notification_id": str(row.id), "status": status,
            "sid": sid})

    # -- writing outcomes, losing and releasing senders ------------------------------------------

    def _flush_outcomes(self) -> None:
        if self.outcomes:
            # Kept until written: a lost connection retries them after the reconnect.
            store.record_outcomes(self.db, self.outcomes)
            self.outcomes = []

    def _forget_senders(self) -> None:
        """The database went away, and our locks with it: another dispatcher may pace them now.

        Rows in hand stay `processing` under our name until their lease expires, and are then
        reconciled by whoever holds the sender. Requests on the wire finish; their outcomes
        are written after the reconnect.
        """
        self.held.clear()
        metrics.SENDERS_HELD.set(0)

    def _shut_down(self) -> None:
        """Hand back what is not sent, let requests on the wire finish, release the locks."""
        try:
            self._connect()
            unsent = self._queued_ids()
            for sender in self.held.values():
                sender.queue.clear()
            returned = store.release_unsent(self.db, unsent, self.holder)
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while self.in_flight and time.monotonic() < deadline:
                self._wait_for_events(min(0.1, deadline - time.monotonic()))
                self._flush_outcomes()
            self._flush_outcomes()
            self._save_buckets(None)
            log.info("released senders", extra={
                "action": "senders_released", "returned_to_pending": returned,
                "still_on_the_wire": len(self.in_flight)})
        except psycopg.OperationalError as exc:
            log.warning("could not hand rows back; they are reconciled after their lease",
                        extra={"action": "release_failed", "error": error_text(exc)})
        finally:
            self._close()  # closing the lock connection frees every sender's lock
            self.twilio.close()


_SEND_LOG = {
    "sent": ("message_sent", "message sent"),
    "pending": ("send_retry", "send failed, will retry"),
    "errored": ("send_errored", "message rejected"),
    "processing": ("send_unknown", "send outcome unknown, will reconcile"),
    "failed": ("send_failed", "message failed in smsq"),
}


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


def _cost(row: store.ClaimedRow) -> int:
    return cost_of(row.body, has_media=bool(row.media_url or row.media_token))


def _outgoing(row: store.ClaimedRow, address: str) -> Outgoing:
    return Outgoing(to=row.to_phone_number, sender_address=address, body=row.body,
                    media_url=tuple(row.media_url), media_token=row.media_token)


def run(settings: Settings, stop: StopSignal) -> None:
    metrics.serve_metrics(settings.smsq_metrics_port, settings.smsq_metrics_host,
                          metrics.program_registry(metrics.DISPATCH_METRICS, settings.database_dsn))
    Dispatcher(settings, stop).run()
