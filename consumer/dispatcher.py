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
from consumer.outcomes import (
    RECONCILE_DELAYS,
    Decision,
    RetryPolicy,
    TwilioAttempt,
    decide,
    pause_delay,
    reconcile_next,
)
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
    paused_until: float = 0.0  # after a 429 with Retry-After, or an account-wide error
    pause_reason: str | None = None  # the account-wide error that paused it, until resumed
    pause_message: str = ""
    pauses: int = 0  # account-wide pauses in a row: each waits longer
    in_flight: int = 0  # requests of this sender on the wire

    def worst_rank(self) -> int:
        return max(entry[0] for entry in self.queue)

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def may_release(self, now: float) -> bool:
        """After an account-wide pause, one request probes the account before the others."""
        return not self.paused(now) and (self.pause_reason is None or self.in_flight == 0)


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
            except Exception:  # noqa: BLE001 - a bug of ours must not stop every sender
                log.exception("dispatch loop failed, starting afresh", extra={
                    "action": "dispatch_loop_error", "wait_seconds": backoff})
            else:
                continue
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
        now = time.monotonic()
        for sender in self.held.values():
            tokens = sender.bucket.tokens
            metrics.BUCKET_TOKENS.labels(sender.key or "default").set(tokens)
            paused_for = (sender.paused_until - now if sender.pause_reason and holder
                          else None)
            rows.append((sender.key, sender.address, holder, tokens,
                         self.settings.twilio_sms_rate, sender.bucket.capacity, paused_for,
                         sender.pause_reason if holder else None,
                         sender.pause_message if holder else None))
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
            if sender.paused(now):  # its rows stay pending, claimable by nobody else anyway
                sender.wake_at = sender.paused_until
                continue
            if len(sender.queue) <= self.in_hand_target // 2:
                self._claim(sender, self.in_hand_target - len(sender.queue), max_rank=2)
            elif sender.notified_rank is not None and sender.notified_rank < sender.worst_rank():
                self._claim(sender, self.in_hand_target, max_rank=sender.worst_rank() - 1)
                self._hand_back_surplus(sender)
            sender.notified_rank = None

    def _claim(self, sender: Sender, limit: int, max_rank: int) -> None:
        try:
            claim = store.claim_due(self.db, sender.key, self.holder, limit, self.lease,
                                    max_rank)
        except psycopg.DataError as exc:
            failed = store.fail_unloadable(self.db, sender.key)
            log.error("rows no claim can load marked failed", extra={
                "action": "claim_unloadable", "sender": sender.key or "default",
                "notification_ids": [str(i) for i in failed], "error": error_text(exc)})
            if not failed:
                raise
            return  # claimed again at once: maybe_due is still set
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
            try:
                if row.expire_datetime is not None and row.expire_datetime <= _utcnow():
                    heapq.heappop(sender.queue)
                    self._expire(row)
                    continue
                if not sender.may_release(time.monotonic()):
                    return
                if not sender.bucket.try_take(_cost(row)):
                    return
            except Exception as exc:  # noqa: BLE001 - one row smsq cannot handle
                heapq.heappop(sender.queue)
                self._fail(row, exc)
                continue
            heapq.heappop(sender.queue)
            self.in_flight[row.id] = row
            sender.in_flight += 1
            self.pool.submit(self._send, sender.address, row)

    def _fail(self, row: store.ClaimedRow, exc: Exception) -> None:
        """DESIGN.md: a row smsq cannot handle becomes failed; the others go on."""
        message = f"failed in smsq: {type(exc).__name__}: {exc}"[:2000]
        self.outcomes.append(store.Outcome(row.id, "failed", message, attempted=False))
        metrics.DISPATCH_SENDS.labels("failed", "").inc()
        log.error("message failed in smsq", exc_info=exc, extra={
            "action": "send_failed", "notification_id": str(row.id)})

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
                try:
                    wait = sender.bucket.wait_time(_cost(sender.queue[0][-1]))
                except Exception:  # noqa: BLE001 - _release_from fails that row at once
                    wait = 0.0
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
            sender = self.held.get(result.row.sender)
            try:
                if isinstance(result, SendResult):
                    if sender is not None:
                        sender.in_flight -= 1
                    self._on_sent(result)
                else:
                    self._on_reconciled(result)
            except psycopg.OperationalError:
                raise
            except Exception as exc:  # noqa: BLE001 - one row smsq cannot handle
                self._fail(result.row, exc)

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
        self._pause_or_resume(row.sender, decision)
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
        unknown = decision.status == "processing"
        return store.Outcome(
            row.id, decision.status, decision.status_message, error_code=decision.error_code,
            retry_in=decision.retry_in,
            # An unknown outcome is reconciled soon: first check when this lease ends.
            lease_seconds=RECONCILE_DELAYS[0] if unknown else None,
            reconcile_checks=0 if unknown else None,
            attempted=attempt is not None and decision.pause is None)

    def _wake_for(self, sender_key: str, at: float) -> None:
        """Look for due rows of this sender again at `at` (a retry we scheduled ourselves)."""
        sender = self.held.get(sender_key)
        if sender is not None:
            sender.wake_at = at if sender.wake_at is None else min(sender.wake_at, at)

    def _pause_or_resume(self, sender_key: str, decision: Decision) -> None:
        """An account-wide error pauses the sender, longer each time in a row, with one
        error logged per pause; any other answer from Twilio ends the pause."""
        sender = self.held.get(sender_key)
        if sender is None:
            return
        now = time.monotonic()
        if decision.pause is None:
            if sender.pause_reason is not None and decision.status != "failed":
                self._resume(sender)
            return
        if sender.pause_reason is not None and sender.paused(now):
            return  # requests that were on the wire when the pause began
        sender.pauses += 1
        delay = pause_delay(sender.pauses, self.policy)
        if sender.pause_reason not in (None, decision.pause):
            metrics.SENDER_PAUSED.labels(sender.key or "default", sender.pause_reason).set(0)
        sender.paused_until, sender.wake_at = now + delay, now + delay
        sender.pause_reason, sender.pause_message = decision.pause, decision.status_message
        metrics.SENDER_PAUSED.labels(sender.key or "default", decision.pause).set(1)
        log.error("sender paused: Twilio refuses every message of this account or sender", extra={
            "action": "sender_paused", "sender": sender.key or "default",
            "reason": decision.pause, "error_code": decision.error_code,
            "status_message": decision.status_message, "pause_seconds": round(delay, 1),
            "pauses_in_a_row": sender.pauses})
        self._hand_back_queue(sender)

    def _resume(self, sender: Sender) -> None:
        metrics.SENDER_PAUSED.labels(sender.key or "default", sender.pause_reason).set(0)
        log.info("sender resumed", extra={"action": "sender_resumed",
                                          "sender": sender.key or "default",
                                          "reason": sender.pause_reason,
                                          "pauses_in_a_row": sender.pauses})
        sender.pause_reason, sender.pause_message, sender.pauses = None, "", 0

    def _hand_back_queue(self, sender: Sender) -> None:
        """Rows in hand go back to pending while the sender waits (status shows them so)."""
        ids = [entry[-1].id for entry in sender.queue]
        sender.queue.clear()
        self._flush_outcomes()
        store.release_unsent(self.db, ids, self.holder)

    def _pause_after_retry_after(self, result: SendResult) -> None:
        sender = self.held.get(result.row.sender)
        if sender is not None and result.attempt is not None and result.attempt.retry_after:
            # Twilio asked this account to slow down: hold the whole sender, not just the row.
            sender.paused_until = max(sender.paused_until,
                                      time.monotonic() + result.attempt.retry_after)

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
                lease_seconds=RECONCILE_DELAYS[-1], attempted=False))
            log.warning("reconciliation failed", extra={
                "action": "reconcile_failed", "notification_id": str(row.id),
                "error": str(result.error)})
            return
        if self._sending_to(row.to_phone_number):
            # A send of ours to the same number may be the message Twilio listed: decide
            # once that one is recorded (the row is looked at again, its lease expired).
            return
        found = self._first_unrecorded(row, result.found)
        if found is not None:
            self.outcomes.append(store.Outcome(
                row.id, "sent", sid=found.sid, segments=found.segments or _cost(row),
                sent_datetime=found.date_created, attempted=False))
            self._log_reconciled(row, "sent", found.sid)
        elif row.lease_expired:
            self._not_found(row)
        # Else: not found yet, but its lease is still running (a request of a holder that just
        # died may still be on its way to Twilio); it is looked at again when the lease expires.

    def _not_found(self, row: store.ClaimedRow) -> None:
        """Checked again a little later, and sent again only once every check found nothing."""
        checks = row.reconcile_checks + 1
        delay = reconcile_next(checks)
        if delay is not None:
            self.outcomes.append(store.Outcome(
                row.id, "processing", f"outcome unknown; not found at Twilio in {checks} "
                f"check(s), checking again in {delay:g} s", lease_seconds=delay,
                attempted=False, reconcile_checks=checks))
            metrics.DISPATCH_RECONCILED.labels("not_found_yet").inc()
            return
        self.outcomes.append(store.Outcome(
            row.id, "pending", f"not found at Twilio in {checks} checks after an unknown "
            "outcome; sending again", attempted=False, reconcile_checks=0))
        self._wake_for(row.sender, time.monotonic())
        self._log_reconciled(row, "pending", None)

    def _sending_to(self, number: str) -> bool:
        return any(row.to_phone_number == number for row in self.in_flight.values())

    def _first_unrecorded(self, row: store.ClaimedRow,
                          found: list[FoundMessage]) -> FoundMessage | None:
        """The oldest match whose SID no row holds, in the database or about to be.

        Two unrecorded matches (the same text sent twice to one person, both answers lost)
        cannot be told apart: each row takes the oldest one left, which is deterministic and
        never resends, and the ambiguity is logged for an operator.
        """
        if not found:
            return None
        recorded = store.recorded_sids(self.db, [message.sid for message in found])
        recorded.update(outcome.sid for outcome in self.outcomes if outcome.sid)
        unrecorded = [message for message in found if message.sid not in recorded]
        if len(unrecorded) > 1:
            log.warning("several messages at Twilio match one notification", extra={
                "action": "reconcile_ambiguous", "notification_id": str(row.id),
                "sids": [message.sid for message in unrecorded], "taken": unrecorded[0].sid})
        return unrecorded[0] if unrecorded else None

    def _log_reconciled(self, row: store.ClaimedRow, status: str, sid: str | None) -> None:
        metrics.DISPATCH_RECONCILED.labels("found" if status == "sent" else "not_found").inc()
        log.info("reconciled with twilio", extra={
            "action": "reconciled", "notification_id": str(row.id), "status": status,
            "sid": sid})

    # -- writing outcomes, losing and releasing senders ------------------------------------------

    def _flush_outcomes(self) -> None:
        if not self.outcomes:
            return
        # Kept until written: a lost connection retries them after the reconnect.
        try:
            store.record_outcomes(self.db, self.outcomes)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:  # one row's outcome: write the others, fail that one
            failed = store.record_each(self.db, self.outcomes)
            log.error("outcomes that could not be written marked failed", extra={
                "action": "record_failed", "error": error_text(exc),
                "notification_ids": [str(i) for i in failed]})
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
                    media_url=tuple(row.media_url), media_token=row.media_token,
                    notification_id=row.id, expire_datetime=row.expire_datetime)


def run(settings: Settings, stop: StopSignal) -> None:
    metrics.serve_metrics(settings.smsq_metrics_port, settings.smsq_metrics_host,
                          metrics.program_registry(metrics.DISPATCH_METRICS, settings.database_dsn))
    Dispatcher(settings, stop).run()
