"""A token bucket that paces one sender: `rate` segments per second, at most `capacity` at once.

The bucket starts full. Each message takes its cost (its segments) in tokens. A message that
costs more than the whole capacity could never find enough tokens, so it may go once the bucket
is full and leaves it in debt (negative tokens); the debt is refilled before anything else goes.
That keeps the long-run rate exact without splitting a message.

Twilio counts arrivals, and a request may leave well after its tokens were taken (busy
threads, a new connection). Tokens of a request not yet gone are `held`: until it leaves the
bucket refills only to `capacity - held`, which leaves it exactly as if the request had taken
its tokens as it left.

A request may also take its tokens up to `lead` seconds before they are there
(`take_ahead`): the bucket goes into debt for the difference, exactly as if the tokens had been
taken when they came, and the request must not leave before then.

Pure: the clock is injected, nothing sleeps here; the dispatcher asks `wait_time` and sleeps.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable

# Float rounding must not turn "exactly enough after waiting wait_time()" into "a hair short",
# which would cost the caller another wake-up for a billionth of a token.
_EPSILON = 1e-9


class TokenBucket:
    def __init__(self, rate: float, capacity: float,
                 clock: Callable[[], float] = time.monotonic,
                 tokens: float | None = None) -> None:
        """Full at first, or with `tokens` (a bucket handed over by another dispatcher)."""
        if rate <= 0 or capacity <= 0:
            raise ValueError("rate and capacity must be positive")
        self.rate = rate
        self.capacity = capacity
        self._clock = clock
        self._tokens = capacity if tokens is None else min(capacity, tokens)
        self._updated = clock()
        # Tokens of requests taken but not yet left, by request: until they leave, the
        # bucket refills only to `capacity - held`, as if they took their tokens as they left.
        self._holds: dict[Hashable, float] = {}
        # The latest time a take was told it may leave at: tokens given back by an earlier
        # take would let the next one leave with it (see give_back).
        self._latest_not_before = -math.inf

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while a large message's debt is being paid)."""
        self._refill()
        return self._tokens

    @property
    def held(self) -> float:
        return sum(self._holds.values())

    def _refill(self, until: float | None = None) -> None:
        now = self._clock() if until is None else until
        elapsed = max(0.0, now - self._updated)
        ceiling = self.capacity - self.held
        if self._tokens < ceiling:
            self._tokens = min(ceiling, self._tokens + elapsed * self.rate)
        self._updated = max(self._updated, now)

    def wait_time(self, cost: float) -> float:
        """Seconds from now until `try_take(cost)` succeeds; 0.0 if it would succeed now."""
        missing = self._needed(cost) - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def try_take(self, cost: float) -> bool:
        """Take `cost` tokens if the bucket allows it now; False (and no change) otherwise."""
        return self.take_ahead(cost, 0.0) is not None

    def take_ahead(self, cost: float, lead: float) -> float | None:
        """Take `cost` tokens if they are there within `lead` seconds: the clock's time when
        they are (now, or up to `lead` later), before which the request must not leave; None
        (and no change) when they are further off, or wait for a held request to leave."""
        if self.held_back(cost):
            return None
        wait = self.wait_time(cost)  # refills up to the clock's time now: self._updated
        if wait > lead + _EPSILON:
            return None
        self._tokens -= cost
        not_before = self._updated + wait
        self._latest_not_before = max(self._latest_not_before, not_before)
        return not_before

    def give_back(self, cost: float, not_before: float) -> None:
        """Return the tokens of a take (told `not_before`) whose message was not sent after
        all (a guard rail stopped it before the request), up to the capacity. Not when a
        later take was told a later time: that time counted on these tokens being spent,
        and the next take would be told the same one (two requests at once)."""
        if not_before + _EPSILON >= self._latest_not_before:
            self._tokens = min(self.capacity, self.tokens + cost)

    def hold(self, request: Hashable, cost: float) -> None:
        """`cost` tokens just taken are for `request`, which has not left yet."""
        self._refill()  # until now, under the ceiling as it was
        self._holds[request] = cost

    def unhold(self, request: Hashable, left: float | None = None) -> None:
        """`request` left at `left` (the clock's time; None: now, or it never will): the
        bucket refills under the higher ceiling from then on. Unknown requests are ignored."""
        if request in self._holds:
            self._refill(left)
            del self._holds[request]
            self._refill()

    def held_back(self, cost: float) -> bool:
        """Can `cost` not be taken, however long we wait, until a held request leaves?"""
        return bool(self._holds) and self.capacity - self.held + _EPSILON < self._needed(cost)

    def _needed(self, cost: float) -> float:
        # A message larger than the bucket goes when the bucket is full, not never.
        return min(cost, self.capacity)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, capacity={self.capacity}, tokens={self.tokens:.3f})"
