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

import collections
import gc
import logging
import math
import os
import queue
import socket
import threading
import time
from datetime import datetime, timezone
from uuid import UUID

import psycopg

from consumer import metrics, reconnect
from consumer.dispatch import claims
from consumer.dispatch.guard_rails import GuardRails
from consumer.dispatch.outcomes import (
    BUDGET_PAUSE,
    PAUSE_REASONS,
    RECONCILE_DELAYS,
    Decision,
    RetryPolicy,
    decide,
)
from consumer.dispatch.prices import PriceSweeper
from consumer.dispatch.reconcile import Reconciliation
from consumer.dispatch.scheduler import (
    ALL_RANKS,
    RELEASE_LEAD_SECONDS,
    ClaimRequest,
    Expire,
    Paused,
    Resumed,
    Scheduler,
    Send,
    Sender,
)
from consumer.dispatch.sharing import TICK_SECONDS, SenderSharing, paced_senders
from consumer.dispatch.threads import DueListener, SendResult, WorkerPool
from consumer.dispatch.twilio_client import TwilioSender
from consumer.logs import error_text
from consumer.pipeline import FOLD_COUNTS_EVERY_SECONDS, fold_counts
from consumer.settings import Settings
from consumer.signals import StopSignal

log = logging.getLogger(__name__)

HORIZON_SECONDS = 2.0  # claim about this much of a sender's sending at a time
# Twilio counts arrivals, and a request's way there varies by milliseconds (a new
# connection, thread scheduling, the network): paced at exactly the rate, two sends of a 1/s
# sender now and then arrive less than a second apart. Pacing 1% slower (10 ms a token at
# 1/s) absorbs that, and still sends within one message a minute of the rate.
PACING_MARGIN = 0.01
SHUTDOWN_GRACE_SECONDS = 5.0  # wait this long for requests on the wire at SIGTERM
CLAIMS_PER_STATEMENT = 200  # senders claimed for in one statement at most


class Dispatcher(SenderSharing, Reconciliation, GuardRails):
    def __init__(self, settings: Settings, stop: StopSignal) -> None:
        self.settings = settings
        self.stop = stop
        self.holder = f"{socket.gethostname()}:{os.getpid()}"
        self.addresses = paced_senders(settings)
        policy = RetryPolicy(settings.smsq_max_attempts, settings.smsq_retry_backoff,
                             settings.smsq_retry_backoff_max)
        self.policy = policy
        self.lease = settings.smsq_lease_seconds
        self.concurrency = settings.smsq_dispatch_concurrency
        in_hand_target = max(1, min(settings.twilio_sms_batch_size, math.ceil(
            settings.twilio_sms_rate * HORIZON_SECONDS + settings.smsq_burst)))
        self.scheduler: Scheduler[claims.ClaimedRow] = Scheduler(
            settings.twilio_sms_rate * (1 - PACING_MARGIN), settings.smsq_burst, in_hand_target,
            policy, lambda row: row.cost, daily_limit=settings.smsq_daily_segment_limit,
            lead=RELEASE_LEAD_SECONDS)
        self.twilio = TwilioSender(settings, self.concurrency)
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        # Requests that left, from the workers: (sender, row id, when). Read before releases
        # and results; an event wakes the loop for one only while a sender waits for it.
        self.departures: collections.deque[tuple[str, UUID, float]] = collections.deque()
        self.wake_on_departure = False
        self.pool = WorkerPool(self.concurrency, self.events)
        self.in_flight: dict[UUID, claims.ClaimedRow] = {}  # sends and reconciliations
        self.outcomes: list[claims.Outcome] = []
        self._lock_db: psycopg.Connection | None = None  # None while not connected
        self._db: psycopg.Connection | None = None
        self.next_tick = self.next_poll = self.next_renew = self.next_fold = 0.0
        self.unsent_when_lost: list[UUID] = []  # rows in hand when Postgres went away

    @property
    def lock_db(self) -> psycopg.Connection:
        """The connection holding the senders' locks (the loop runs only while connected)."""
        assert self._lock_db is not None, "used while connected only"
        return self._lock_db

    @property
    def db(self) -> psycopg.Connection:
        """The connection that claims rows and writes outcomes."""
        assert self._db is not None, "used while connected only"
        return self._db

    @property
    def held(self) -> dict[str, Sender]:
        return self.scheduler.senders

    # -- the outer loop: connect, dispatch, reconnect ------------------------------------------

    def run(self) -> None:
        DueListener(self.settings, self.events, self.stop).start()
        PriceSweeper(self.settings, self.twilio, self.stop).start()
        threading.Thread(target=self._wake_on_stop, name="stop", daemon=True).start()
        log.info("dispatching", extra={"action": "dispatch_started", "holder": self.holder,
                                       "senders": len(self.addresses)})
        while not self.stop.requested:
            if not reconnect.until_connected("postgres", self.stop, psycopg.OperationalError,
                                             log, self._connect):
                break
            try:
                self._loop()  # returns only when a stop is requested: _shut_down hands back
                continue
            except psycopg.OperationalError as exc:
                log.warning("postgres connection lost", extra={
                    "action": "postgres_lost", "error": error_text(exc)})
            except Exception:  # noqa: BLE001 - a bug of ours must not stop every sender
                log.exception("dispatch loop failed, starting afresh", extra={
                    "action": "dispatch_loop_error"})
            self._forget_senders()
            self._close()
            self.stop.wait(reconnect.FIRST_WAIT_SECONDS)  # a loop that fails at once must not spin
        self._shut_down()
        log.info("dispatcher stopped", extra={"action": "dispatch_stopped"})

    def _wake_on_stop(self) -> None:
        self.stop.wait(None)
        self.events.put(("stop",))

    def _connect(self) -> None:
        dsn = self.settings.database_dsn
        if self._lock_db is None or self._lock_db.closed:
            self._lock_db = psycopg.connect(
                dsn, autocommit=True,
                application_name=claims.LOCK_CONNECTION_PREFIX + self.holder,
                # Both ends notice a lost network in seconds, not TCP's hours: the server
                # then frees our locks for another dispatcher, and we stop sending.
                keepalives=1, keepalives_idle=5, keepalives_interval=1, keepalives_count=3)
            self._lock_db.execute("SET tcp_keepalives_idle = 5; SET tcp_keepalives_interval = 1;"
                                 " SET tcp_keepalives_count = 3")
        if self._db is None or self._db.closed:
            self._db = psycopg.connect(dsn, autocommit=True, application_name="smsq dispatch")
        metrics.DEPENDENCY_UP.labels("postgres").set(1)
        self._hand_back_unsent_when_lost()

    def _close(self) -> None:
        metrics.DEPENDENCY_UP.labels("postgres").set(0)
        for conn in (self._lock_db, self._db):
            if conn is not None:
                try:
                    conn.close()
                except psycopg.Error:
                    pass
        self._lock_db = self._db = None

    def _loop(self) -> None:
        while not self.stop.requested:
            self._flush_outcomes()  # first: a row put back to pending must be claimable
            now = time.monotonic()
            if now >= self.next_tick:
                self._tick(now)
            self._claim_where_needed()
            self._release_ready()
            self._flush_outcomes()
            self._wait_for_events(self._next_wake() - time.monotonic())

    # -- every second: senders, buckets, leases -------------------------------------------------

    def _tick(self, now: float) -> None:
        self.next_tick = now + TICK_SECONDS
        self._note_departures()  # a sender whose request left may be handed over
        self.twilio.close_idle()
        self._share_senders()
        self._save_buckets(self.holder)
        claims.heartbeat(self.db, self.holder, len(self.held))
        if now >= self.next_renew:
            self.next_renew = now + self.lease / 4
            claims.renew_leases(self.db, self._claimed_ids(), self.holder, self.lease)
        self._reconcile(list(self.held), expired_only=True)
        if now >= self.next_fold:  # keeps the counts cheap to read, with or without serve
            self.next_fold = now + FOLD_COUNTS_EVERY_SECONDS
            fold_counts(self.db)
            self._forget_old_places()
        if now >= self.next_poll:  # the fallback, should a notification ever be missed
            self.next_poll = now + self.settings.smsq_dispatch_poll_seconds
            self.scheduler.announce_all()

    def _claimed_ids(self) -> list[UUID]:
        return self.scheduler.queued_ids() + list(self.in_flight)

    # -- claiming and releasing, as the scheduler says ----------------------------------------

    def _claim_where_needed(self) -> None:
        requests = self.scheduler.claims()
        for start in range(0, len(requests), CLAIMS_PER_STATEMENT):
            self._claim(requests[start:start + CLAIMS_PER_STATEMENT])

    def _claim(self, requests: list[ClaimRequest]) -> None:
        wanted = [(r.sender, r.limit, r.max_rank) for r in requests]
        try:
            claimed = claims.claim_many(self.db, wanted, self.holder, self.lease)
        except psycopg.DataError as exc:  # a row no claim can load: find whose, claim alone
            if len(requests) > 1:
                for request in requests:
                    self._claim([request])
                return
            self._fail_unloadable(requests[0].sender, exc)
            return
        surplus: list[UUID] = []
        for request in requests:  # every claimed row in hand before the next statement
            claim = claimed[request.sender]
            surplus += self.scheduler.claimed(request, claim.rows, claim.drained,
                                              claim.next_due_in)
        self._hand_back(surplus)
        self._on_suppressed([row for claim in claimed.values() for row in claim.suppressed])
        self._on_without_sms_part([row for claim in claimed.values()
                                   for row in claim.without_sms_part])

    @staticmethod
    def _on_without_sms_part(rows: list[claims.ClaimedRow]) -> None:
        """Rows the claim itself failed: written around smsq without their sms part."""
        for row in rows:
            metrics.DISPATCH_SENDS.labels("failed", "").inc()
            log.error("message failed in smsq: it has no sms_notification row", extra={
                "action": "send_failed", "notification_id": str(row.id),
                "status_message": claims.NO_SMS_PART})

    def _fail_unloadable(self, key: str, exc: psycopg.DataError) -> None:
        failed = claims.fail_unloadable(self.db, key)
        log.error("rows no claim can load marked failed", extra={
            "action": "claim_unloadable", "sender": key or "default",
            "notification_ids": [str(i) for i in failed], "error": error_text(exc)})
        if not failed:
            raise exc
        self.scheduler.announce(key, ALL_RANKS)  # claimed again at once, without them

    def _release_ready(self) -> None:
        self._note_departures()
        sends = []
        try:
            for action in self.scheduler.releases(self.concurrency - len(self.in_flight)):
                if isinstance(action, Send):
                    sends.append(action)
                elif isinstance(action, Expire):
                    self._expire(action.row)
                elif isinstance(action, Paused):
                    self._on_paused(action)
                else:
                    self._fail(action.row, action.error)
            allowed = self._within_recipient_limits(sends)
        except Exception:  # noqa: BLE001 - re-raised: the loop ends, and starts afresh
            # Out of the scheduler's queue and not yet in flight: handed back at the
            # reconnect, as rows in hand are (else: after their lease). Not those a guard
            # stopped already: their outcome is queued, and lands on the row in processing.
            self.unsent_when_lost += [send.row.id for send in sends
                                      if send.row.id not in self._queued_outcome_ids()]
            raise
        for send in allowed:
            self.in_flight[send.row.id] = send.row
            self.pool.submit(self._send, send)

    def _fail(self, row: claims.ClaimedRow, exc: Exception) -> None:
        """A row smsq cannot handle becomes failed; the others go on (docs/contract.md, 4)."""
        message = f"failed in smsq: {type(exc).__name__}: {exc}"[:2000]
        self.outcomes.append(claims.Outcome(row.id, "failed", message, attempted=False))
        metrics.DISPATCH_SENDS.labels("failed", "").inc()
        log.error("message failed in smsq", exc_info=exc, extra={
            "action": "send_failed", "notification_id": str(row.id)})

    def _expire(self, row: claims.ClaimedRow) -> None:
        assert row.expire_datetime is not None  # the scheduler expires only rows that expire
        message = f"expired at {row.expire_datetime.isoformat()} before it could be sent"
        self.outcomes.append(claims.Outcome(row.id, "errored", message, attempted=False))
        metrics.DISPATCH_SENDS.labels("expired", "").inc()
        log.info("message expired", extra={"action": "message_expired",
                                           "notification_id": str(row.id)})

    def _note_departures(self) -> None:
        while self.departures:
            self.scheduler.departed(*self.departures.popleft())

    def _next_wake(self) -> float:
        # Set before looking at the departures: a worker appends, then reads the flag.
        self.wake_on_departure = self.scheduler.awaiting_departures
        if self.wake_on_departure and self.departures:
            return time.monotonic()
        wake = self.scheduler.next_wake(self.concurrency - len(self.in_flight))
        return min(self.next_tick, self.next_poll, wake if wake is not None else math.inf)

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
            self.scheduler.announce(event[1], event[2])
        elif kind == "poll":
            self.scheduler.announce_all()
        elif kind == "done":
            self._note_departures()  # a request's departure is queued before its result
            result = event[1]
            self.in_flight.pop(result.row.id, None)
            sender_event = None
            try:
                if isinstance(result, SendResult):
                    sender_event = self._on_sent(result)
                else:
                    self._on_reconciled(result)
            except psycopg.OperationalError:
                raise
            except Exception as exc:  # noqa: BLE001 - one row smsq cannot handle
                self._fail(result.row, exc)
                # Its sender must not wait for it (in_flight, a departure that never comes);
                # a no-op when finished() ran already, or for a reconciliation.
                self.scheduler.finished(result.row.sender, result.row.id, None)
            # Outside the row's guard: what fails here is the sender's, or the database's
            # (the loop starts afresh), never the row's.
            if isinstance(sender_event, Paused):
                self._on_paused(sender_event)
            elif isinstance(sender_event, Resumed):
                self._on_resumed(sender_event)

    # -- sending (in a worker thread) and its outcome (in the loop) ----------------------------

    def _send(self, send: Send[claims.ClaimedRow]) -> SendResult:
        # A request may leave tens of milliseconds after its release (busy threads, the GIL):
        # its tokens count from when it leaves, so two of one sender reach Twilio a token apart.
        row = send.row
        released = time.monotonic()

        def departed(at: float) -> None:
            self.departures.append((row.sender, row.id, at))
            if self.wake_on_departure:  # only wakes the loop, which reads self.departures
                self.events.put(("departed",))

        try:
            attempt, error = self.twilio.send(
                row.outgoing(send.sender.address), departed, send.not_before,
                withhold=lambda: send.sender.withholds(time.monotonic())), None
        except Exception as exc:  # noqa: BLE001 - a bug of ours: the row becomes failed
            attempt, error = None, exc
        # From when it could leave: the wait for its tokens is not Twilio's time.
        seconds = time.monotonic() - max(send.not_before, released)
        metrics.TWILIO_REQUEST_SECONDS.observe(seconds)
        return SendResult(row, attempt, error, seconds, datetime.now(timezone.utc))

    def _on_sent(self, result: SendResult) -> Paused | Resumed | None:
        """Queue the outcome of a send; what it did to its sender, for the caller to act on."""
        row = result.row
        if result.attempt is not None and result.attempt.withheld:
            self._on_withheld(row)
            return None
        if result.error is not None:
            decision = Decision("failed", status_message=(
                f"smsq error: {type(result.error).__name__}: {result.error}"))
        else:
            assert result.attempt is not None  # no error: the worker made the request
            decision = decide(result.attempt, row.attempts + 1, self.policy)
        self.outcomes.append(self._outcome_of(result, decision))
        retry_after = result.attempt.retry_after if result.attempt else None
        event = self.scheduler.finished(row.sender, row.id, decision, retry_after,
                                        self._unspent(result, decision))
        code = decision.error_code
        metrics.DISPATCH_SENDS.labels(decision.status, str(code) if code else "").inc()
        log.info(_SEND_LOG[decision.status][1], extra={
            "action": _SEND_LOG[decision.status][0], "notification_id": str(row.id),
            "sid": result.attempt.sid if result.attempt else None, "error_code": code,
            "status_message": decision.status_message or None,
            "twilio_ms": round(result.seconds * 1000, 1)})
        return event

    def _on_withheld(self, row: claims.ClaimedRow) -> None:
        """Released ahead, called back before it left (its sender was paused meanwhile): back
        to pending, no attempt counted, its tokens spent (a later take may count on them)."""
        self.outcomes.append(claims.Outcome(
            row.id, "pending", "not sent: its sender was paused before it left",
            attempted=False))
        self.scheduler.finished(row.sender, row.id, None, unspent=row.cost)
        metrics.DISPATCH_SENDS.labels("withheld", "").inc()
        log.info("message called back before it left: its sender is paused", extra={
            "action": "send_withheld", "notification_id": str(row.id)})

    def _outcome_of(self, result: SendResult, decision: Decision) -> claims.Outcome:
        row, attempt = result.row, result.attempt
        if decision.status == "sent":
            assert attempt is not None  # only Twilio's answer says sent
            return claims.Outcome(row.id, "sent", sid=attempt.sid,
                                 segments=attempt.segments or row.cost,
                                 sent_datetime=result.finished)
        unknown = decision.status == "processing"
        return claims.Outcome(
            row.id, decision.status, decision.status_message, error_code=decision.error_code,
            retry_in=decision.retry_in,
            # An unknown outcome is reconciled soon: first check when this lease ends.
            lease_seconds=RECONCILE_DELAYS[0] if unknown else None,
            reconcile_checks=0 if unknown else None,
            attempted=attempt is not None and decision.pause is None)

    def _on_paused(self, event: Paused) -> None:
        sender = event.sender
        label = sender.key or "default"
        for reason in {r for r in PAUSE_REASONS if r != sender.pause_reason}:
            metrics.SENDER_PAUSED.labels(label, reason).set(0)
        metrics.SENDER_PAUSED.labels(label, sender.pause_reason).set(1)
        if sender.pause_reason == BUDGET_PAUSE:
            self._on_budget_paused(event)
        else:
            self._log_account_pause(event)
        # Rows in hand go back to pending while it waits (status shows them so).
        self._flush_outcomes()
        self._hand_back(self.scheduler.hand_back(sender.key))

    @staticmethod
    def _log_account_pause(event: Paused) -> None:
        sender, decision = event.sender, event.decision
        log.error("sender paused: Twilio refuses every message of this account or sender",
                  extra={"action": "sender_paused", "sender": sender.key or "default",
                         "reason": sender.pause_reason, "error_code": decision.error_code,
                         "status_message": decision.status_message,
                         "pause_seconds": round(event.delay, 1),
                         "pauses_in_a_row": sender.pauses})

    def _on_resumed(self, event: Resumed) -> None:
        label = event.sender.key or "default"
        metrics.SENDER_PAUSED.labels(label, event.reason).set(0)
        log.info("sender resumed", extra={"action": "sender_resumed", "sender": label,
                                          "reason": event.reason,
                                          "pauses_in_a_row": event.pauses})

    # -- writing outcomes, losing and releasing senders ------------------------------------------

    def _flush_outcomes(self) -> None:
        if not self.outcomes:
            return
        # Kept until written: a lost connection retries them after the reconnect.
        try:
            claims.record_outcomes(self.db, self.outcomes)
        except psycopg.OperationalError:
            raise
        except psycopg.Error as exc:  # one row's outcome: write the others, fail that one
            failed = claims.record_each(self.db, self.outcomes)
            log.error("outcomes that could not be written marked failed", extra={
                "action": "record_failed", "error": error_text(exc),
                "notification_ids": [str(i) for i in failed]})
        self.outcomes = []

    def _forget_senders(self) -> None:
        """The database went away, and our locks with it: another dispatcher may pace them now.

        Rows in hand were never sent: they are handed back as soon as we reconnect (a
        failover to a standby takes a second). Until then they wait in `processing`, and a
        dispatcher taking their sender meanwhile waits the wire bound for them. Requests on
        the wire finish; their outcomes are written after the reconnect.
        """
        self.unsent_when_lost += self.scheduler.queued_ids()
        self.scheduler.drop_all()
        metrics.SENDERS_HELD.set(0)

    def _queued_outcome_ids(self) -> set[UUID]:
        return {outcome.id for outcome in self.outcomes}

    def _hand_back_unsent_when_lost(self) -> None:
        # Never a row whose request may be on the wire, or whose outcome waits to be written.
        waiting = self._queued_outcome_ids() | self.in_flight.keys()
        self.unsent_when_lost = [i for i in self.unsent_when_lost if i not in waiting]
        if self.unsent_when_lost:
            # We hold no sender now; one another dispatcher took meanwhile is its to reconcile.
            returned = claims.release_unsent(self.db, self.unsent_when_lost, self.holder,
                                             unheld_only=True)
            log.info("rows in hand when postgres went away handed back", extra={
                "action": "unsent_handed_back", "count": returned})
            self.unsent_when_lost = []

    def _shut_down(self) -> None:
        """Hand back what is not sent, let requests on the wire finish, release the locks."""
        try:
            self._connect()
            unsent = [i for key in self.held for i in self.scheduler.hand_back(key)]
            returned = claims.release_unsent(self.db, unsent, self.holder)
            deadline = time.monotonic() + SHUTDOWN_GRACE_SECONDS
            while self.in_flight and time.monotonic() < deadline:
                self._wait_for_events(min(0.1, deadline - time.monotonic()))
                self._flush_outcomes()
            self._flush_outcomes()
            self._save_buckets(None)
            claims.dispatcher_stopped(self.db, self.holder)
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


def run(settings: Settings, stop: StopSignal) -> None:
    metrics.serve_metrics(settings.smsq_metrics_port, settings.smsq_metrics_host,
                          metrics.program_registry(metrics.DISPATCH_METRICS, settings.database_dsn))
    dispatcher = Dispatcher(settings, stop)
    # A full collection walks every object alive: about 60,000 once the Twilio client and
    # psycopg are loaded, 16 ms on an idle core and several times that on a busy one, in the
    # middle of a claim or a send (the idle p99 of bench/dispatch.py jumped with it). What
    # exists by now lives as long as the process: out of the collector's walks.
    gc.freeze()
    dispatcher.run()
