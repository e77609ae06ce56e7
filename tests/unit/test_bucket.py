"""The token bucket, exactly, on a fake clock: nothing here sleeps."""

from __future__ import annotations

import random

import pytest

from consumer.dispatch.bucket import TokenBucket


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_starts_full_and_refuses_when_empty(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.tokens == 1
    assert bucket.wait_time(1) == 0.0
    assert bucket.try_take(1)
    assert bucket.tokens == 0
    assert not bucket.try_take(1)
    assert bucket.tokens == 0  # a refused take changes nothing
    assert bucket.wait_time(1) == 1.0
    clock.advance(0.999)
    assert not bucket.try_take(1)
    assert bucket.wait_time(1) == pytest.approx(0.001)
    clock.advance(0.001)
    assert bucket.try_take(1)


def test_fractional_rate(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=0.5, capacity=1, clock=clock)
    assert bucket.try_take(1)
    assert bucket.wait_time(1) == 2.0
    clock.advance(1.0)
    assert bucket.tokens == 0.5
    assert not bucket.try_take(1)
    assert bucket.wait_time(1) == 1.0
    clock.advance(1.0)
    assert bucket.try_take(1)


def test_burst_capacity_allows_that_many_at_once_then_paces(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=2, capacity=3, clock=clock)
    assert [bucket.try_take(1) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait_time(1) == 0.5
    assert bucket.wait_time(2) == 1.0
    clock.advance(0.5)
    assert bucket.try_take(1)
    assert not bucket.try_take(1)


def test_refill_is_capped_at_capacity(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=10, capacity=3, clock=clock)
    bucket.try_take(3)
    clock.advance(3600)
    assert bucket.tokens == 3
    assert [bucket.try_take(1) for _ in range(4)] == [True, True, True, False]


def test_message_larger_than_capacity_waits_for_a_full_bucket_then_leaves_a_debt(
        clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.try_take(3)  # full bucket: a 3-segment message goes
    assert bucket.tokens == -2
    assert bucket.wait_time(1) == 3.0  # the debt is paid before the next one
    clock.advance(2.5)
    assert not bucket.try_take(1)
    clock.advance(0.5)
    assert bucket.try_take(1)


def test_large_message_needs_a_full_bucket_not_just_some_tokens(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=4, clock=clock)
    assert bucket.try_take(2)
    assert bucket.tokens == 2
    assert not bucket.try_take(6)
    assert bucket.wait_time(6) == 2.0  # until full (4), not until 6 tokens
    clock.advance(2.0)
    assert bucket.try_take(6)
    assert bucket.tokens == -2
    assert bucket.wait_time(6) == 6.0


def test_waiting_exactly_wait_time_always_suffices(clock: FakeClock) -> None:
    # Rates and costs whose quotients are not exact binary fractions.
    for rate, capacity, cost in [(3, 1, 1), (0.7, 2, 1.3), (1 / 3, 1, 1), (100, 5, 7), (9.1, 3.3, 2)]:
        bucket = TokenBucket(rate=rate, capacity=capacity, clock=clock)
        for _ in range(200):
            clock.advance(bucket.wait_time(cost))
            assert bucket.try_take(cost), (rate, capacity, cost)


def test_rejects_nonsense_parameters() -> None:
    with pytest.raises(ValueError):
        TokenBucket(rate=0, capacity=1)
    with pytest.raises(ValueError):
        TokenBucket(rate=1, capacity=0)


def simulate(rate: float, capacity: float, costs: list[int], seed: int,
             idle_chance: float = 0.0) -> list[tuple[float, int]]:
    """A greedy sender on a fake clock: sends each message as soon as the bucket allows,
    sometimes pausing (idle) first. Returns (time, cost) of each send."""
    rng = random.Random(seed)
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate=rate, capacity=capacity, clock=clock)
    sends = []
    for cost in costs:
        if rng.random() < idle_chance:
            clock.advance(rng.uniform(0, 5 / rate))
        wait = bucket.wait_time(cost)
        if wait > 0:
            clock.advance(wait * 0.999)
            assert not bucket.try_take(cost)  # not a moment too early
            clock.advance(wait * 0.001)
        assert bucket.try_take(cost)
        sends.append((clock.now, cost))
    return sends


def most_in_any_window(sends: list[tuple[float, int]], seconds: float = 1.0) -> int:
    """Most cost sent in any half-open window [t, t + seconds); the worst window starts at a send."""
    worst, end, in_window = 0, 0, 0
    for start, (t0, _) in enumerate(sends):
        while end < len(sends) and sends[end][0] < t0 + seconds - 1e-9:
            in_window += sends[end][1]
            end += 1
        worst = max(worst, in_window)
        in_window -= sends[start][1]
    return worst


def test_one_per_second_never_sends_two_in_any_second_and_keeps_the_rate() -> None:
    sends = simulate(rate=1, capacity=1, costs=[1] * 10_000, seed=1)
    assert most_in_any_window(sends) == 1
    gaps = [b[0] - a[0] for a, b in zip(sends, sends[1:])]
    assert min(gaps) == pytest.approx(1.0)
    assert sends[-1][0] == pytest.approx(9_999.0)  # full at t=0, then exactly 1/s


@pytest.mark.parametrize(
    ("rate", "capacity", "max_cost", "idle_chance"),
    [(1, 1, 1, 0.0), (0.5, 1, 1, 0.3), (10, 10, 1, 0.1), (100, 20, 5, 0.05), (1, 1, 4, 0.2),
     (3, 2, 7, 0.0)],
)
def test_long_run_bounds(rate: float, capacity: float, max_cost: int, idle_chance: float) -> None:
    rng = random.Random(42)
    costs = [rng.randint(1, max_cost) for _ in range(5_000)]
    sends = simulate(rate, capacity, costs, seed=7, idle_chance=idle_chance)
    # In any 1-second window: what was in the bucket plus one second of refill, and a
    # debt-making message can add its overshoot once.
    assert most_in_any_window(sends) < max(capacity, max_cost) + rate
    if max_cost <= capacity:
        assert most_in_any_window(sends, seconds=1 / rate) <= capacity
    if idle_chance == 0.0:
        # Busy all the time: the long-run rate is exactly `rate`, give or take one message.
        elapsed = sends[-1][0] - sends[0][0]
        sent_after_first = sum(cost for _, cost in sends[1:])
        assert abs(sent_after_first - (rate * elapsed + capacity - sends[0][1])) <= max_cost


def test_tokens_held_for_a_request_not_yet_left_count_from_when_it_left(
        clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.try_take(1)
    bucket.hold("r", 1)
    clock.advance(1.3)  # the request is still not gone: no refill meanwhile
    assert bucket.tokens == pytest.approx(0.0) and bucket.held_back(1)
    bucket.unhold("r")  # it left now
    assert not bucket.held_back(1)
    assert bucket.wait_time(1) == pytest.approx(1.0)  # a whole token after it left


def test_a_late_burst_is_charged_once_not_twice(clock: FakeClock) -> None:
    # Ten requests of a burst leave 20 ms late, together: the bucket is as if they had
    # taken their tokens then (empty), not in debt for the refill of those 20 ms as well.
    bucket = TokenBucket(rate=100, capacity=10, clock=clock)
    for request in range(10):
        assert bucket.try_take(1)
        bucket.hold(request, 1)
    clock.advance(0.02)
    for request in range(10):
        bucket.unhold(request)
    assert bucket.tokens == pytest.approx(0.0)
    assert bucket.wait_time(1) == pytest.approx(0.01)


def test_a_held_request_leaves_the_rest_of_the_bucket_refilling(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=10, clock=clock, tokens=5)
    assert bucket.try_take(1)
    bucket.hold("r", 1)
    clock.advance(3.0)
    assert bucket.tokens == pytest.approx(7.0)  # as if taken now: min(10, 5 + 3) - 1
    clock.advance(5.0)
    assert bucket.tokens == pytest.approx(9.0)  # the ceiling while one token is held
    bucket.unhold("r")
    clock.advance(1.0)
    assert bucket.tokens == pytest.approx(10.0)


def test_a_departure_learnt_late_counts_from_when_the_request_left(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.try_take(1)
    bucket.hold("r", 1)
    clock.advance(0.3)  # it left at 0.3 s; the dispatcher hears of it at 0.5 s
    left = clock.now
    clock.advance(0.2)
    bucket.unhold("r", left)
    assert bucket.tokens == pytest.approx(0.2)
    assert bucket.wait_time(1) == pytest.approx(0.8)  # a token after it left, not after 0.5 s


def test_tokens_taken_ahead_are_a_debt_paid_when_they_would_have_come(
        clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    assert bucket.try_take(1)
    clock.advance(0.8)
    assert bucket.take_ahead(1, 0.1) is None  # 0.2 s away: further than the lead
    clock.advance(0.15)
    assert bucket.take_ahead(1, 0.1) == pytest.approx(clock.now + 0.05)  # when it may leave
    assert bucket.tokens == pytest.approx(-0.05)
    clock.advance(0.05)
    assert bucket.tokens == pytest.approx(0.0)  # as if taken now, when the token came
    assert bucket.wait_time(1) == pytest.approx(1.0)


def test_tokens_are_not_taken_ahead_while_a_held_request_has_not_left(
        clock: FakeClock) -> None:
    bucket = TokenBucket(rate=100, capacity=1, clock=clock)
    assert bucket.take_ahead(1, 0.1) == clock.now  # there now: it may leave at once
    bucket.hold("r", 1)
    clock.advance(0.05)  # its token would be 0.01 s away, within the lead, had it left
    assert bucket.take_ahead(1, 0.1) is None
    bucket.unhold("r")  # it leaves now: the next may leave a token after it
    assert bucket.take_ahead(1, 0.1) == pytest.approx(clock.now + 0.01)


def test_tokens_given_back_return_only_from_the_latest_take(clock: FakeClock) -> None:
    bucket = TokenBucket(rate=1, capacity=1, clock=clock)
    first = bucket.take_ahead(1, 0.0)
    assert first == clock.now
    bucket.give_back(1, first)  # nothing taken after it: as if never taken
    assert bucket.tokens == pytest.approx(1.0)
    first = bucket.take_ahead(1, 0.0)
    clock.advance(0.95)
    second = bucket.take_ahead(1, 0.1)
    assert first is not None and second == pytest.approx(clock.now + 0.05)
    bucket.give_back(1, first)  # the second counted on it being spent: it stays spent
    assert bucket.tokens == pytest.approx(-0.05)
