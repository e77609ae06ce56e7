"""The dispatcher's scheduling rules in memory: no database, no Twilio, a clock we move.

Each test plays the dispatcher's part: it tells the scheduler what happened and does what the
scheduler answers (claims are answered from an in-memory list of due rows).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

import pytest

from consumer.dispatch.outcomes import Decision, RetryPolicy
from consumer.dispatch.scheduler import (
    ALL_RANKS,
    ClaimRequest,
    Clock,
    Expire,
    Fail,
    Paused,
    Resumed,
    Scheduler,
    Send,
)
from consumer.dispatch.sharing import SenderSharing

START = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
POLICY = RetryPolicy(max_attempts=10, backoff=4.0, backoff_max=60.0)


class FakeClock(Clock):
    def __init__(self) -> None:
        self.seconds = 1000.0

    def monotonic(self) -> float:
        return self.seconds

    def now(self) -> datetime:
        return START + timedelta(seconds=self.seconds - 1000.0)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


@dataclass
class FakeRow:
    body: str
    priority_rank: int = 2
    sender: str = ""
    cost: int = 1
    expire_datetime: datetime | None = None
    publish_datetime: datetime = START
    id: uuid.UUID = field(default_factory=uuid.uuid4)


class Harness:
    """A scheduler with a due list standing in for the database."""

    def __init__(self, rate: float = 1.0, burst: float = 1.0, target: int = 3,
                 lead: float = 0.0) -> None:
        self.clock = FakeClock()
        self.scheduler = Scheduler(rate, burst, target, POLICY, lambda row: row.cost,
                                   clock=self.clock, lead=lead)
        self.due: list[FakeRow] = []
        self.rows: dict[uuid.UUID, FakeRow] = {}
        self.handed_back: list[uuid.UUID] = []
        self.claims: list[ClaimRequest] = []

    def publish(self, *rows: FakeRow) -> None:
        self.due.extend(rows)
        for row in rows:
            self.rows[row.id] = row
            self.scheduler.announce(row.sender, row.priority_rank)

    def step(self, free_slots: int = 100, depart: bool = True) -> list:
        """One turn of the dispatcher's loop: claim what is asked, then release. Released
        requests leave at once, unless `depart` is False (busy workers)."""
        for request in self.scheduler.claims():
            self.claims.append(request)
            wanted = sorted((r for r in self.due if r.sender == request.sender
                             and r.priority_rank <= request.max_rank),
                            key=lambda r: (r.priority_rank, r.publish_datetime))[:request.limit]
            for row in wanted:
                self.due.remove(row)
            surplus = self.scheduler.claimed(request, wanted, len(wanted) < request.limit,
                                             None)
            self.handed_back += surplus
            self.due += [self.rows[i] for i in surplus]  # back to pending
        actions = list(self.scheduler.releases(free_slots))
        for send in (a for a in actions if isinstance(a, Send) and depart):
            self.scheduler.departed(send.row.sender, send.row.id, self.clock.seconds)
        return actions

    def sent_bodies(self, actions: list) -> list[str]:
        return [a.row.body for a in actions if isinstance(a, Send)]

    def finish(self, actions: list, decision: Decision = Decision("sent"),
               retry_after: float | None = None) -> list:
        return [self.scheduler.finished(a.row.sender, a.row.id, decision, retry_after)
                for a in actions if isinstance(a, Send)]


def test_a_sender_sends_one_segment_a_second():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    assert h.sent_bodies(h.step()) == ["m0"]
    assert h.sent_bodies(h.step()) == []  # no token yet
    assert h.scheduler.next_wake(100) == pytest.approx(h.clock.seconds + 1.0)
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["m1"]


def test_a_request_is_released_ahead_of_its_token_and_told_when_it_may_leave():
    h = Harness(rate=1.0, burst=1.0, lead=0.1)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    start = h.clock.seconds
    [first] = h.step()
    assert first.not_before == start  # its token is there: it may leave at once
    assert h.step() == []
    assert h.scheduler.next_wake(100) == pytest.approx(start + 0.9)
    h.clock.advance(0.9)
    [second] = h.step(depart=False)
    assert second.row.body == "m1" and second.not_before == pytest.approx(start + 1.0)
    h.clock.advance(0.1)
    h.scheduler.departed("", second.row.id, start + 1.03)  # it left 30 ms after its token
    h.clock.advance(0.9)
    assert h.step() == []  # the third waits for a token after the second left, less the lead
    h.clock.advance(0.03)
    [third] = h.step()
    assert third.not_before == pytest.approx(start + 2.03)


def test_a_request_released_late_in_a_slow_round_may_leave_at_its_tokens_time_not_before():
    h = Harness(rate=1.0, burst=1.0, lead=0.1)
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("m0"), FakeRow("m1"))
    start = h.clock.seconds
    assert h.sent_bodies(h.step()) == ["m0"]  # it leaves at once: the next token at +1 s

    def slow_cost(row: FakeRow) -> float:  # a busy loop: 30 ms pass while it looks at a row
        h.clock.advance(0.03)
        return row.cost

    h.scheduler.cost = slow_cost
    h.clock.advance(0.95)
    [send] = h.step(depart=False)
    assert send.not_before == pytest.approx(start + 1.0)  # not 30 ms early


def test_a_send_given_back_after_later_ones_were_taken_ahead_frees_no_slot_twice():
    """At a rate too fast to hold tokens (1,000/s), one round takes three tokens ahead; a
    guard rail then stops the first. Its token must not let the next row leave with the
    third (found by review: both were told the same time)."""
    h = Harness(rate=1000.0, burst=1.0, target=10, lead=0.1)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    sends = [a for a in h.step(depart=False) if isinstance(a, Send)]
    assert [s.row.body for s in sends] == ["m0", "m1", "m2"]
    h.scheduler.unsend(sends[0])  # SMSQ_RECIPIENT_LIMIT: m0 never goes
    h.publish(FakeRow("m3"))
    [m3] = [a for a in h.step(depart=False) if isinstance(a, Send)]
    times = sorted([sends[1].not_before, sends[2].not_before, m3.not_before])
    assert min(b - a for a, b in zip(times, times[1:])) >= 1 / 1000 - 1e-9


def test_a_request_released_ahead_is_called_back_once_its_sender_pauses_or_is_let_go():
    h = Harness(rate=1.0, burst=1.0, lead=0.1)
    sender = h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("m0"))
    [send] = h.step(depart=False)
    assert not send.sender.withholds(h.clock.seconds)
    h.scheduler.finished("", send.row.id, Decision("pending", pause="account_auth"))
    assert send.sender.withholds(h.clock.seconds)  # Twilio refuses the account: not now
    h.clock.advance(3600)
    assert not send.sender.withholds(h.clock.seconds)
    h.scheduler.drop_all()  # the locks are gone with the database
    assert sender.withholds(h.clock.seconds)


def test_a_burst_goes_at_once_and_then_the_rate_holds():
    h = Harness(rate=1.0, burst=3.0, target=5)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(5)])
    assert h.sent_bodies(h.step()) == ["m0", "m1", "m2"]
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["m3"]


def test_a_message_larger_than_the_bucket_goes_when_full_and_leaves_a_debt():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("long", cost=3), FakeRow("short"))
    assert h.sent_bodies(h.step()) == ["long"]
    h.clock.advance(2.9)  # the debt of 2 segments is paid first
    assert h.sent_bodies(h.step()) == []
    h.clock.advance(0.2)
    assert h.sent_bodies(h.step()) == ["short"]


def test_a_high_priority_message_overtakes_the_low_ones_in_hand():
    h = Harness(rate=1.0, burst=1.0, target=3)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"low {n}") for n in range(10)])
    assert h.sent_bodies(h.step()) == ["low 0"]
    h.publish(FakeRow("code 1", priority_rank=0), FakeRow("code 2", priority_rank=0))
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["code 1"]
    assert h.claims[-1] == ClaimRequest("", 3, 1, overtake=True)
    # In hand: at most the target; the worst one went back to the database.
    [surplus] = h.handed_back
    assert surplus in {r.id for r in h.due if r.body.startswith("low")}
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["code 2"]


def test_senders_take_turns_and_each_keeps_its_own_rate():
    h = Harness(rate=1.0, burst=1.0)
    for key in ("a", "b"):
        h.scheduler.take(key, key)
    h.publish(*[FakeRow(f"{key}{n}", sender=key) for key in ("a", "b") for n in range(2)])
    assert sorted(h.sent_bodies(h.step())) == ["a0", "b0"]
    h.clock.advance(1.0)
    assert sorted(h.sent_bodies(h.step())) == ["a1", "b1"]


def test_free_slots_bound_the_requests_released():
    h = Harness(rate=100.0, burst=10.0, target=10)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(10)])
    assert len(h.sent_bodies(h.step(free_slots=4))) == 4
    assert h.scheduler.next_wake(0) is None or h.scheduler.next_wake(0) > h.clock.seconds


def test_an_expired_row_is_expired_not_sent():
    h = Harness()
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("late", expire_datetime=START - timedelta(seconds=1)), FakeRow("fine"))
    actions = h.step()
    assert [type(a) for a in actions] == [Expire, Send]
    assert actions[0].row.body == "late" and actions[1].row.body == "fine"


def test_a_row_whose_cost_cannot_be_computed_fails_and_the_others_go_on():
    h = Harness()
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("bad", cost=None), FakeRow("good"))  # type: ignore[arg-type]
    actions = h.step()
    assert isinstance(actions[0], Fail) and actions[0].row.body == "bad"
    assert h.sent_bodies(actions) == ["good"]


def test_an_account_wide_error_pauses_the_sender_then_one_probe_goes_first():
    h = Harness(rate=10.0, burst=5.0, target=8)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(12)])
    first = h.step()
    assert len(first) == 5
    refused = Decision("pending", error_code=20003, pause="account_auth",
                       status_message="sender paused: HTTP 401")
    events = h.finish(first[:1], refused)
    [paused] = events
    assert isinstance(paused, Paused) and 2.0 <= paused.delay <= 4.0
    # The others on the wire come back refused too: still one pause, not one per row.
    assert h.finish(first[1:], refused) == [None] * (len(first) - 1)
    assert len(h.scheduler.hand_back("")) == 3  # the dispatcher returns them to pending
    assert h.step() == []  # nothing goes, nothing is claimed while paused
    assert h.claims == [ClaimRequest("", 8, ALL_RANKS)]
    h.clock.advance(paused.delay)
    probe = h.step()
    assert len(h.sent_bodies(probe)) == 1  # one request probes the account
    assert h.step() == []
    [again] = h.finish(probe, refused)
    assert isinstance(again, Paused) and again.delay > paused.delay / 2  # growing
    assert h.scheduler.senders[""].pauses == 2
    h.clock.advance(again.delay)
    probe = h.step()
    [resumed] = h.finish(probe, Decision("sent"))
    assert isinstance(resumed, Resumed) and resumed.pauses == 2
    h.clock.advance(1.0)
    assert len(h.sent_bodies(h.step())) > 1  # the rest flows at the rate again


def test_retry_after_holds_the_whole_sender():
    h = Harness(rate=10.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    sent = h.step()
    h.finish(sent, Decision("pending", retry_in=5.0), retry_after=5.0)
    h.clock.advance(4.9)
    assert h.step() == []
    h.clock.advance(0.2)
    assert h.sent_bodies(h.step()) == ["m1"]


def test_a_drained_sender_sleeps_until_its_next_row_is_due():
    h = Harness()
    h.scheduler.take("", "+15005550006")
    assert h.step() == []
    assert h.claims == [ClaimRequest("", 3, ALL_RANKS)]
    # Told that the next row becomes due in 30 s: no claim before then, one after.
    h.scheduler.claimed(ClaimRequest("", 3, ALL_RANKS), [], True, 30.0)
    h.clock.advance(29.0)
    assert h.scheduler.claims() == []
    h.clock.advance(1.0)
    assert h.scheduler.claims() == [ClaimRequest("", 3, ALL_RANKS)]


def test_losing_every_sender_forgets_them_all():
    h = Harness()
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("m0"))
    h.scheduler.drop_all()
    assert h.step() == [] and h.scheduler.queued_ids() == []
    assert h.scheduler.next_wake(100) is None


def test_a_request_that_leaves_late_takes_its_token_from_when_it_left():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    [send] = h.step(depart=False)
    h.clock.advance(0.3)
    h.scheduler.departed("", send.row.id, h.clock.seconds)  # a busy worker: it left 0.3 s after its release
    h.clock.advance(0.99)
    assert h.sent_bodies(h.step()) == []  # a token after its release, not after it left
    h.clock.advance(0.01)
    assert h.sent_bodies(h.step()) == ["m1"]


def test_a_burst_that_leaves_late_is_charged_once():
    h = Harness(rate=100.0, burst=10.0, target=30)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(20)])
    burst = h.sent_bodies(sends := h.step(depart=False))
    assert burst == [f"m{n}" for n in range(10)]
    h.clock.advance(0.02)  # all ten leave 20 ms late
    for send in sends:
        h.scheduler.departed("", send.row.id, h.clock.seconds)
    h.clock.advance(0.01)  # one token after they left, not nine more
    assert h.sent_bodies(h.step()) == ["m10"]


def test_an_answer_from_before_a_reconnect_does_not_count_against_the_sender_taken_again():
    # Counted, it made the new sender's requests on the wire -1: after an account-wide
    # pause, no probe (which needs none on the wire) was ever released.
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(FakeRow("old"))
    old = h.step()
    h.scheduler.drop_all()  # the database went away; "old" is still on the wire
    sender = h.scheduler.take("", "+15005550006")
    h.finish(old)
    assert sender.in_flight == 0


def test_a_sender_waits_for_its_last_request_to_leave_before_the_next():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    [send] = h.step(depart=False)
    h.clock.advance(1.2)  # m0 has not left: its token counts from when it leaves
    assert h.sent_bodies(h.step()) == [] and h.scheduler.awaiting_departures
    h.scheduler.departed("", send.row.id, h.clock.seconds)  # it left now: its token counts from now
    assert not h.scheduler.awaiting_departures
    assert h.sent_bodies(h.step()) == []
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["m1"]


def test_a_request_that_never_left_does_not_hold_its_sender():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    sends = h.step(depart=False)
    h.finish(sends, Decision("pending", retry_in=60.0))  # the connect was refused
    h.clock.advance(1.0)
    assert h.sent_bodies(h.step()) == ["m1"]


def test_a_sender_faster_than_the_departure_slack_is_not_held_for_departures():
    # At an unlimited rate, waiting for each request to leave would send one at a time.
    h = Harness(rate=1_000_000.0, burst=1.0, target=10)
    h.scheduler.take("", "+15005550006")
    h.publish(*[FakeRow(f"m{n}") for n in range(3)])
    assert h.sent_bodies(h.step(depart=False)) == ["m0"]
    h.clock.advance(0.01)  # m0 has not left 10 ms after its release
    assert h.sent_bodies(h.step(depart=False)) == ["m1"]
    assert not h.scheduler.awaiting_departures


def test_a_sender_faster_than_the_departure_slack_is_handed_over_with_requests_not_left():
    h = Harness(rate=1_000_000.0, burst=100.0, target=50)
    h.scheduler.take("a", "+15005550006")
    h.publish(*[FakeRow(f"m{n}", sender="a") for n in range(50)])
    assert len(h.step(depart=False)) == 50
    assert Sharing(h.scheduler)._senders_to_hand_over(1) == ["a"]


class Sharing(SenderSharing):
    def __init__(self, scheduler) -> None:
        self.scheduler = scheduler


def test_a_sender_whose_request_has_not_left_is_not_handed_over():
    h = Harness(rate=1.0, burst=1.0)
    h.scheduler.take("a", "+15005550006")
    h.scheduler.take("b", "+15005550007")
    h.publish(FakeRow("to a", sender="a"))
    [send] = h.step(depart=False)
    sharing = Sharing(h.scheduler)
    assert sharing._senders_to_hand_over(2) == ["b"]  # a's next holder could overtake it
    h.scheduler.departed("a", send.row.id, h.clock.seconds)
    assert sorted(sharing._senders_to_hand_over(2)) == ["a", "b"]
