"""A token bucket that paces one sender: `rate` segments per second, at most `capacity` at once.

The bucket starts full. Each message takes its cost (its segments) in tokens. A message that
costs more than the whole capacity could never find enough tokens, so it may go once the bucket
is full and leaves it in debt (negative tokens); the debt is refilled before anything else goes.
That keeps the long-run rate exact without splitting a message.

Pure: the clock is injected, nothing sleeps here; the dispatcher asks `wait_time` and sleeps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

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

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while a large message's debt is being paid)."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)
        self._tokens = min(self.capacity, self._tokens + elapsed * self.rate)
        self._updated = now
        return self._tokens

    def wait_time(self, cost: float) -> float:
        """Seconds from now until `try_take(cost)` succeeds; 0.0 if it would succeed now."""
        missing = self._needed(cost) - self.tokens
        return 0.0 if missing <= _EPSILON else missing / self.rate

    def try_take(self, cost: float, reserved: float = 0.0) -> bool:
        """Take `cost` tokens if the bucket allows it now, `reserved` of its tokens aside;
        False (and no change) otherwise."""
        if self.tokens - reserved + _EPSILON < self._needed(cost):
            return False
        self._tokens -= cost
        return True

    def give_back(self, cost: float) -> None:
        """Return tokens taken for a message that was not sent after all (a guard rail
        stopped it before the request), up to the capacity."""
        self._tokens = min(self.capacity, self.tokens + cost)

    def left_late(self, cost: float, seconds: float) -> None:
        """`cost` tokens taken `seconds` ago were used only now: count them from now. The
        bucket refilled meanwhile, and up to `cost` of that refill was not yet earned (a debt,
        if need be). Never more than `cost`: at a high rate the refill of a few milliseconds
        is thousands of tokens, and charging it all would starve the sender."""
        self._tokens = self.tokens - min(cost, seconds * self.rate)

    def _needed(self, cost: float) -> float:
        # A message larger than the bucket goes when the bucket is full, not never.
        return min(cost, self.capacity)

    def __repr__(self) -> str:
        return f"TokenBucket(rate={self.rate}, capacity={self.capacity}, tokens={self.tokens:.3f})"
