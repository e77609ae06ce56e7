"""What each Twilio outcome means for a notification: DESIGN.md's status table as one function.

Pure: the Twilio adapter turns whatever happened on the wire into a `TwilioAttempt`, `decide`
says which status the row gets, and the dispatcher records it.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

TOO_MANY_REQUESTS = 20429
QUEUE_FULL = 21611


@dataclass(frozen=True)
class TwilioAttempt:
    """One try at creating a message, as seen from our side of the connection.

    request_sent=False: the connection failed before the request went out (safe to retry).
    request_sent=True and http_status None: a timeout or lost connection after sending, so
    Twilio may or may not have the message (the outcome is unknown).
    """

    request_sent: bool
    http_status: int | None = None
    error_code: int | None = None
    error_message: str | None = None
    retry_after: float | None = None
    sid: str | None = None
    segments: int | None = None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: float
    backoff_max: float


@dataclass(frozen=True)
class Decision:
    status: Literal["sent", "pending", "errored", "processing", "failed"]
    retry_in: float | None = None
    error_code: int | None = None
    status_message: str = ""


def decide(attempt: TwilioAttempt, attempts: int, policy: RetryPolicy,
           random: Callable[[], float] = _random.random) -> Decision:
    """The status after `attempt`, which was try number `attempts` (counting this one)."""
    if attempt.request_sent and attempt.http_status in (200, 201) and attempt.sid:
        return Decision("sent")
    if _is_transient(attempt):
        return _retry_or_give_up(attempt, attempts, policy, random)
    if attempt.http_status is not None and 400 <= attempt.http_status < 500:
        return Decision("errored", error_code=attempt.error_code,
                        status_message=attempt.error_message or f"HTTP {attempt.http_status}")
    # No answer after sending, or an answer that is neither success nor error (a 2xx without a
    # SID, a redirect from a proxy): Twilio may hold the message, so ask it before resending.
    return Decision("processing", error_code=attempt.error_code,
                    status_message=f"outcome unknown ({describe(attempt)}); reconciling with Twilio")


def backoff_delay(attempts: int, policy: RetryPolicy, retry_after: float | None,
                  random: Callable[[], float] = _random.random) -> float:
    """Seconds before the next try after `attempts` failed ones.

    Exponential (backoff, 2x, 4x ... capped at backoff_max) with "equal jitter": half the step
    is kept and the other half is random. Full jitter would spread retries a little wider, but
    it can also retry at once, which is exactly wrong after a 429 or a 5xx: equal jitter keeps
    the backoff growing while still scattering retries of a burst that failed together. Twilio's
    Retry-After, when given, is a floor: it knows better than our guess.
    """
    step = min(policy.backoff_max, policy.backoff * 2 ** (attempts - 1))
    delay = step / 2 + random() * step / 2
    return max(delay, retry_after or 0.0)


def describe(attempt: TwilioAttempt) -> str:
    """What happened, in the words an operator reads in `status_message`."""
    if not attempt.request_sent:
        return "connection failed before the request was sent"
    if attempt.http_status is None:
        return "no answer after the request was sent"
    parts = [f"HTTP {attempt.http_status}"]
    if attempt.error_code is not None:
        parts.append(f"Twilio error {attempt.error_code}")
    text = ", ".join(parts)
    return f"{text}: {attempt.error_message}" if attempt.error_message else text


def _is_transient(attempt: TwilioAttempt) -> bool:
    if not attempt.request_sent:
        return True
    status = attempt.http_status
    return (status == 429 or attempt.error_code in (TOO_MANY_REQUESTS, QUEUE_FULL)
            or (status is not None and status >= 500))


def _retry_or_give_up(attempt: TwilioAttempt, attempts: int, policy: RetryPolicy,
                      random: Callable[[], float]) -> Decision:
    what = describe(attempt)
    if attempts >= policy.max_attempts:
        return Decision("errored", error_code=attempt.error_code,
                        status_message=f"gave up after {attempts} attempts; last: {what}")
    delay = backoff_delay(attempts, policy, attempt.retry_after, random)
    return Decision("pending", retry_in=delay, error_code=attempt.error_code,
                    status_message=f"attempt {attempts} of {policy.max_attempts}: {what}; "
                                   f"retrying in {delay:.1f} s")
