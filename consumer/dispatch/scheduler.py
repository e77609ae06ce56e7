"""Which sender may send what next: the dispatcher's scheduling rules, pure.

The dispatcher (consumer/dispatch/loop.py) owns the connections and the threads. It tells the
scheduler what happened (a sender taken, a notification, rows claimed, a send finished, an
account-wide error) and asks it what to do now: which claims to make, which rows to send or
expire, when to wake up. The scheduler reads only the clock it is given, so every rule here is
tested in memory (tests/unit/test_scheduler.py).

The work per event does not grow with the number of senders: a sender waits in a heap of
timers (its next token, its next publish or retry time, the end of its pause) or in one of two
sets (senders that may claim now, senders that may send now), and only those are looked at.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Generic, Protocol, TypeVar
from uuid import UUID

from consumer.dispatch.bucket import TokenBucket
from consumer.dispatch.outcomes import BUDGET_PAUSE, Decision, RetryPolicy, pause_delay

# A row due already but not claimable (locked by an operator's transaction) is looked at
# again after this, not in a busy loop.
MIN_WAKE_SECONDS = 0.05
# A request's tokens count from when it leaves (TokenBucket.held), except where a token is
# shorter than this: at an unlimited rate, requests would go one at a time.
DEPARTURE_SLACK_SECONDS = 0.002
# A request goes to a worker up to this long before its tokens are there, and the worker holds
# its first bytes until they are: the loop's wake-up, a free thread and building the request
# (tens of milliseconds under load) then no longer stretch the time between two of a sender.
RELEASE_LEAD_SECONDS = 0.1
ALL_RANKS = 2  # a claim of every priority: high (0), medium (1) and low (2)


class Row(Protocol):
    """What the scheduler needs of a claimed row."""

    id: UUID
    sender: str
    priority_rank: int
    publish_datetime: datetime
    expire_datetime: datetime | None


RowT = TypeVar("RowT", bound=Row)  # the dispatcher's rows: the scheduler hands them back


class Clock:
    """Monotonic seconds for timers, UTC wall time for publish and expiry times."""

    def monotonic(self) -> float:
        return time.monotonic()

    def now(self) -> datetime:
        return datetime.now(timezone.utc)


@dataclass
class Sender:
    """One paced sender while this process holds its lock."""

    key: str
    address: str
    bucket: TokenBucket
    queue: list = field(default_factory=list)  # heap of (rank, publish, seq, row)
    maybe_due: bool = True  # rows may be due that are not claimed yet
    wake_at: float | None = None  # when the next scheduled row becomes due
    notified_rank: int | None = None  # best priority announced since the last claim
    paused_until: float = 0.0  # after a 429 with Retry-After, or an account-wide error
    pause_reason: str | None = None  # the account-wide error that paused it, until resumed
    pause_message: str = ""
    pauses: int = 0  # account-wide pauses in a row: each waits longer
    # Requests of this sender on the wire, by row id: an answer to a request of an earlier
    # Sender object of the same key (before a reconnect or a hand-over) is not counted here.
    on_wire: set = field(default_factory=set)
    spent_today: float = 0.0  # segments sent (or on the wire) on `budget_day`, UTC
    budget_day: date | None = None
    let_go: bool = False  # no longer paced here: nothing of it may leave any more

    @property
    def in_flight(self) -> int:
        return len(self.on_wire)

    def worst_rank(self) -> int:
        return max(entry[0] for entry in self.queue)

    def paused(self, now: float) -> bool:
        return now < self.paused_until

    def withholds(self, now: float) -> bool:
        """Must a request released ahead and not yet left be called back? Yes once the sender
        is let go (its lock lost), and while Twilio asked it to wait (Retry-After, an
        account-wide error); not for the daily budget, which counted it already."""
        return self.let_go or (self.paused(now) and self.pause_reason != BUDGET_PAUSE)

    def may_release(self, now: float) -> bool:
        """After an account-wide pause, one request probes the account before the others."""
        return not self.paused(now) and (self.pause_reason is None or self.in_flight == 0)


@dataclass(frozen=True)
class ClaimRequest:
    """Claim up to `limit` due rows of `sender` of rank <= `max_rank`. `overtake`: rows of a
    better priority than the worst in hand, merged in; the surplus is handed back."""

    sender: str
    limit: int
    max_rank: int
    overtake: bool = False


@dataclass(frozen=True)
class Send(Generic[RowT]):
    sender: Sender
    row: RowT
    cost: float  # the tokens it took: given back if it does not go
    not_before: float  # the clock's time its tokens are there: it must not leave earlier


@dataclass(frozen=True)
class Expire(Generic[RowT]):
    row: RowT


@dataclass(frozen=True)
class Fail(Generic[RowT]):
    """A row the scheduler could not handle (its cost or times raised): it becomes failed."""

    row: RowT
    error: Exception


@dataclass(frozen=True)
class Paused:
    sender: Sender
    delay: float
    decision: Decision


@dataclass(frozen=True)
class Resumed:
    sender: Sender
    reason: str
    pauses: int


class Scheduler(Generic[RowT]):
    def __init__(self, rate: float, burst: float, in_hand_target: int, policy: RetryPolicy,
                 cost: Callable[[RowT], float], clock: Clock | None = None,
                 daily_limit: int | None = None, lead: float = 0.0) -> None:
        """`lead`: how long before its tokens are there a request may be released (its
        Send says when it may leave)."""
        self.rate, self.burst = rate, burst
        self.lead = lead
        self.in_hand_target = in_hand_target
        self.policy = policy
        self.cost = cost
        self.clock = clock or Clock()
        self.daily_limit = daily_limit  # segments per sender per UTC day; None: no limit
        self.senders: dict[str, Sender] = {}
        self._sequence = itertools.count()  # heap tie-breaker
        self._timers: list[tuple[float, int, str]] = []
        self._to_claim: dict[str, None] = {}  # insertion-ordered sets
        self._to_release: dict[str, None] = {}
        self._awaiting_departure: set[str] = set()  # held until their last request leaves

    # -- senders --------------------------------------------------------------------------

    def take(self, key: str, address: str, tokens: float | None = None,
             spent_today: float = 0.0) -> Sender:
        """Pace `key` from now on; its bucket full, or with the `tokens` handed over; the
        segments it sent today so far count against the daily limit."""
        bucket = TokenBucket(self.rate, self.burst, clock=self.clock.monotonic, tokens=tokens)
        sender = self.senders[key] = Sender(key, address, bucket, spent_today=spent_today,
                                            budget_day=self.clock.now().date())
        self._to_claim[key] = None
        return sender

    def drop(self, key: str) -> list[UUID]:
        """Stop pacing `key` (handed to another dispatcher); the ids of its rows in hand."""
        ids = self.hand_back(key)
        self.senders.pop(key).let_go = True
        self._to_claim.pop(key, None)
        self._to_release.pop(key, None)
        self._awaiting_departure.discard(key)
        return ids  # its timers find no sender and are skipped

    def drop_all(self) -> None:
        """Every lock is gone (the database went away): nothing is paced here any more."""
        for sender in self.senders.values():
            sender.let_go = True
        self.senders.clear()
        self._timers.clear()
        self._to_claim.clear()
        self._to_release.clear()
        self._awaiting_departure.clear()

    # -- what happened --------------------------------------------------------------------

    def announce(self, key: str, rank: int) -> None:
        """A row of `rank` became due for `key` (LISTEN smsq_due)."""
        sender = self.senders.get(key)
        if sender is not None:
            sender.maybe_due = True
            sender.notified_rank = rank if sender.notified_rank is None else min(
                rank, sender.notified_rank)
            self._to_claim[key] = None

    def announce_all(self) -> None:
        """Something may have been missed (the listener reconnected, the fallback poll)."""
        for key, sender in self.senders.items():
            sender.maybe_due = True
            self._to_claim[key] = None

    def wake(self, key: str, at: float) -> None:
        """Look for due rows of `key` again at `at` (a retry or pause we scheduled)."""
        sender = self.senders.get(key)
        if sender is not None and (sender.wake_at is None or at < sender.wake_at):
            sender.wake_at = at
            heapq.heappush(self._timers, (at, next(self._sequence), key))

    def claimed(self, request: ClaimRequest, rows: list[RowT], drained: bool,
                next_due_in: float | None) -> list[UUID]:
        """Rows a claim returned; the ids of the surplus to hand back (after an overtake)."""
        sender = self.senders.get(request.sender)
        if sender is None:
            return [row.id for row in rows]
        for row in rows:
            heapq.heappush(sender.queue, (row.priority_rank, row.publish_datetime,
                                          next(self._sequence), row))
        if drained:  # sleep until the next scheduled row (or a notification), no polling
            sender.maybe_due = False
            if next_due_in is not None:
                self.wake(sender.key, self.clock.monotonic() + max(next_due_in,
                                                                   MIN_WAKE_SECONDS))
        self._to_release[sender.key] = None
        return self._surplus(sender) if request.overtake else []

    def finished(self, key: str, row_id: UUID, decision: Decision | None,
                 retry_after: float | None = None, unspent: float = 0.0
                 ) -> Paused | Resumed | None:
        """The request of `key` for `row_id` came back; `unspent`: segments counted against
        today's budget when it left that it did not use after all. An account-wide error
        pauses the sender, longer each time in a row; any other answer from Twilio ends the
        pause."""
        sender = self.senders.get(key)
        if sender is None or row_id not in sender.on_wire:
            return None  # not this Sender's (dropped and taken again since), or told already
        sender.on_wire.discard(row_id)
        sender.spent_today -= unspent
        self._forget_departure(sender, row_id)  # a request that failed to connect never left
        self._to_release[key] = None
        now = self.clock.monotonic()
        event = self._pause_or_resume(sender, decision, now) if decision else None
        if retry_after:  # Twilio asked to slow down: the whole sender waits, not the row
            self._pause_until(sender, now + retry_after)
        if decision is not None and decision.retry_in is not None:
            self.wake(key, now + decision.retry_in)
        return event

    def unsend(self, send: Send[RowT]) -> None:
        """A row released to send was stopped before its request (a guard rail): its tokens
        and its share of the budget come back."""
        sender = self.senders.get(send.sender.key)
        if sender is not None and send.row.id in sender.on_wire:
            sender.on_wire.discard(send.row.id)
            sender.spent_today -= send.cost
            sender.bucket.give_back(send.cost, send.not_before)
            self._forget_departure(sender, send.row.id)
            self._to_release[sender.key] = None

    def departed(self, key: str, row_id: UUID, at: float) -> None:
        """The request of `key` for `row_id` left at `at` (monotonic): the tokens it held
        count from then (see TokenBucket.held), and a sender waiting for it may go on."""
        sender = self.senders.get(key)
        if sender is not None:
            self._forget_departure(sender, row_id, at)

    def departure_pending(self, key: str) -> bool:
        """Has `key` a request not yet left that holds its tokens?"""
        return bool(self.senders[key].bucket.held)

    @property
    def awaiting_departures(self) -> bool:
        """Is a sender held until a request of its own leaves? (The dispatcher then wants
        to hear of each departure at once.)"""
        return bool(self._awaiting_departure)

    def hand_back(self, key: str) -> list[UUID]:
        """The rows in hand of `key`, to return to pending while it waits."""
        sender = self.senders[key]
        ids = [entry[-1].id for entry in sender.queue]
        sender.queue.clear()
        return ids

    # -- what to do now --------------------------------------------------------------------

    def claims(self) -> list[ClaimRequest]:
        """The claims to make now: senders low on rows, or told of a better priority."""
        self._fire_timers()
        requests = []
        now = self.clock.monotonic()
        for key in list(self._to_claim):
            del self._to_claim[key]
            request = self._claim_for(self.senders[key], now) if key in self.senders else None
            if request is not None:
                requests.append(request)
        return requests

    def releases(self, free_slots: int
                 ) -> Iterator[Send[RowT] | Expire[RowT] | Fail[RowT] | Paused]:
        """Rows that may go now, as the buckets allow, within `free_slots` requests; rows
        that expired on the way; senders that reached their daily budget (their rows in hand
        are to go back to pending). Senders take turns, one row each round."""
        self._fire_timers()
        now, wall = self.clock.monotonic(), self.clock.now()
        while self._to_release and free_slots > 0:
            for key in list(self._to_release):
                if free_slots <= 0:
                    return
                action = self._next_of(key, now, wall)
                if action is None:
                    continue
                if isinstance(action, Send):
                    free_slots -= 1
                yield action

    def next_wake(self, free_slots: int) -> float | None:
        """When something may next be done without an event; None: only an event can."""
        if self._to_claim or (self._to_release and free_slots > 0):
            return self.clock.monotonic()
        return self._timers[0][0] if self._timers else None

    def holds_row(self, key: str, row_id: UUID) -> bool:
        """Whether `row_id` waits in the queue of sender `key` here."""
        sender = self.senders.get(key)
        return sender is not None and any(entry[-1].id == row_id for entry in sender.queue)

    def queued_ids(self) -> list[UUID]:
        return [entry[-1].id for sender in self.senders.values() for entry in sender.queue]

    # -- inside -----------------------------------------------------------------------------

    def _fire_timers(self) -> None:
        now = self.clock.monotonic()
        while self._timers and self._timers[0][0] <= now:
            at, _, key = heapq.heappop(self._timers)
            sender = self.senders.get(key)
            if sender is None:
                continue
            if sender.wake_at is not None and sender.wake_at <= now:
                sender.maybe_due, sender.wake_at = True, None
                self._to_claim[key] = None
            self._to_release[key] = None

    def _forget_departure(self, sender: Sender, row_id: UUID,
                          left: float | None = None) -> None:
        sender.bucket.unhold(row_id, left)
        if sender.key in self._awaiting_departure:
            self._awaiting_departure.discard(sender.key)
            self._to_release[sender.key] = None

    def _claim_for(self, sender: Sender, now: float) -> ClaimRequest | None:
        if not sender.maybe_due:
            return None
        if sender.paused(now):  # its rows stay pending until the pause ends
            self.wake(sender.key, sender.paused_until)
            return None
        rank, sender.notified_rank = sender.notified_rank, None
        if len(sender.queue) <= self.in_hand_target // 2:
            return ClaimRequest(sender.key, self.in_hand_target - len(sender.queue), ALL_RANKS)
        if rank is not None and rank < sender.worst_rank():
            return ClaimRequest(sender.key, self.in_hand_target, sender.worst_rank() - 1,
                                overtake=True)
        return None

    def _surplus(self, sender: Sender) -> list[UUID]:
        if len(sender.queue) <= self.in_hand_target:
            return []
        ordered = sorted(sender.queue)
        sender.queue = ordered[:self.in_hand_target]  # a sorted list is a heap
        return [entry[-1].id for entry in ordered[self.in_hand_target:]]

    def _next_of(self, key: str, now: float,
                 wall: datetime) -> Send[RowT] | Expire[RowT] | Fail[RowT] | Paused | None:
        """The next action of one sender, or None (it leaves the release set, and a timer
        brings it back when its bucket or pause allows)."""
        sender = self.senders.get(key)
        if sender is None or not sender.queue:
            self._to_release.pop(key, None)
            if sender is not None and sender.maybe_due:
                self._to_claim[key] = None
            return None
        row = sender.queue[0][-1]
        try:
            if row.expire_datetime is not None and row.expire_datetime <= wall:
                heapq.heappop(sender.queue)
                return Expire(row)
            if not sender.may_release(now):
                self._to_release.pop(key, None)
                if sender.paused(now):
                    heapq.heappush(self._timers, (sender.paused_until, next(self._sequence), key))
                return None  # else a probe is on the wire: its outcome brings it back
            cost = self.cost(row)
            if self._over_budget(sender, cost, wall):
                self._to_release.pop(key, None)
                return self._budget_pause(sender, now, wall)
            # Its own time, not `now`: releasing a whole round takes a while under load, and a
            # not_before counted from the round's start would be that much early.
            not_before = sender.bucket.take_ahead(cost, self.lead)
            if not_before is None:
                self._to_release.pop(key, None)
                if sender.bucket.held_back(cost):
                    self._awaiting_departure.add(key)  # its departures bring it back
                    return None
                at = now + sender.bucket.wait_time(cost) - self.lead
                heapq.heappush(self._timers, (at, next(self._sequence), key))
                return None
        except Exception as exc:  # noqa: BLE001 - one row the scheduler cannot handle
            heapq.heappop(sender.queue)
            return Fail(row, exc)
        heapq.heappop(sender.queue)
        sender.on_wire.add(row.id)
        if cost > self.rate * DEPARTURE_SLACK_SECONDS:  # its tokens count from when it leaves
            sender.bucket.hold(row.id, cost)
        sender.spent_today += cost
        if len(sender.queue) <= self.in_hand_target // 2 and sender.maybe_due:
            self._to_claim[key] = None
        return Send(sender, row, cost, not_before)

    def _pause_until(self, sender: Sender, until: float) -> None:
        if until > sender.paused_until:
            sender.paused_until = until
            heapq.heappush(self._timers, (until, next(self._sequence), sender.key))

    def _over_budget(self, sender: Sender, cost: float, wall: datetime) -> bool:
        """Would `cost` more segments take the sender past its daily limit? A new UTC day
        starts from nothing."""
        if self.daily_limit is None:
            return False
        if sender.budget_day != wall.date():
            sender.budget_day, sender.spent_today = wall.date(), 0.0
        return sender.spent_today + cost > self.daily_limit

    def _budget_pause(self, sender: Sender, now: float, wall: datetime) -> Paused:
        """The sender waits for the next UTC day; its rows stay pending meanwhile."""
        midnight = datetime(wall.year, wall.month, wall.day, tzinfo=timezone.utc) + timedelta(1)
        delay = (midnight - wall).total_seconds()
        message = (f"daily budget reached: {sender.spent_today:g} of {self.daily_limit} "
                   f"segments (SMSQ_DAILY_SEGMENT_LIMIT) sent today; paused until "
                   f"{midnight:%Y-%m-%d} 00:00 UTC")
        sender.pause_reason, sender.pause_message = BUDGET_PAUSE, message
        self._pause_until(sender, now + delay)
        self.wake(sender.key, now + delay)
        return Paused(sender, delay, Decision("pending", pause=BUDGET_PAUSE,
                                              status_message=message))

    def _pause_or_resume(self, sender: Sender, decision: Decision,
                         now: float) -> Paused | Resumed | None:
        if decision.pause is None:
            budget_waits = sender.pause_reason == BUDGET_PAUSE and sender.paused(now)
            if sender.pause_reason is not None and decision.status != "failed" \
                    and not budget_waits:
                event = Resumed(sender, sender.pause_reason, sender.pauses)
                sender.pause_reason, sender.pause_message, sender.pauses = None, "", 0
                return event
            return None
        if sender.pause_reason is not None and sender.paused(now):
            return None  # requests that were on the wire when the pause began
        sender.pauses += 1
        delay = pause_delay(sender.pauses, self.policy)
        sender.pause_reason, sender.pause_message = decision.pause, decision.status_message
        self._pause_until(sender, now + delay)
        self.wake(sender.key, now + delay)
        return Paused(sender, delay, decision)
