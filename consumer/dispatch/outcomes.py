"""What each Twilio outcome means for a notification: the contract's status table as one function.

Pure: the Twilio adapter turns whatever happened on the wire into a `TwilioAttempt`, `decide`
says which status the row gets, and the dispatcher records it.

Contract: docs/contract.md (section 4, Statuses and status rules).
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

TOO_MANY_REQUESTS = 20429
# Errors that say the account or the sender cannot send at all, whatever the message: bad
# credentials or a suspended account (20003), a wrong account (20404), the sender's queue at
# Twilio full (21611), the account's daily limit reached (63038). Erroring each row in turn
# would drain the whole backlog into `errored`; the sender pauses instead.
ACCOUNT_WIDE = {
    20003: "account_auth",
    20404: "account_not_found",
    21611: "sender_queue_full",
    63038: "daily_limit",
}
# A sender that reached SMSQ_DAILY_SEGMENT_LIMIT pauses until the next UTC day with this
# reason (dispatch_sender.pause_reason), beside the account-wide ones.
BUDGET_PAUSE = "daily_budget"
PAUSE_REASONS = (*ACCOUNT_WIDE.values(), BUDGET_PAUSE)
# How an unknown outcome is reconciled: ask Twilio after each of these delays (seconds); the
# row goes back to pending only once every check found nothing, so a message Twilio is still
# creating when a request timed out has time to show up in its lists.
RECONCILE_DELAYS = (2.0, 4.0, 8.0)


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
    # Called back before any byte left: its sender was paused while it waited for its tokens.
    withheld: bool = False


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int
    backoff: float
    backoff_max: float


@dataclass(frozen=True)
class Decision:
    """The row's status afterwards. `pause` names why the whole sender must pause (an
    account-wide error): the row goes back to `pending` with no attempt counted."""

    status: Literal["sent", "pending", "errored", "processing", "failed"]
    retry_in: float | None = None
    error_code: int | None = None
    status_message: str = ""
    pause: str | None = None


def decide(attempt: TwilioAttempt, attempts: int, policy: RetryPolicy,
           random: Callable[[], float] = _random.random) -> Decision:
    """The status after `attempt`, which was try number `attempts` (counting this one)."""
    if attempt.request_sent and attempt.http_status in (200, 201) and attempt.sid:
        return Decision("sent")
    if not attempt.request_sent or _is_throttled(attempt):
        return _retry_or_give_up(attempt, attempts, policy, random)
    pause = account_wide_reason(attempt)
    if pause is not None:
        return Decision("pending", error_code=attempt.error_code, pause=pause,
                        status_message=f"sender paused: {describe(attempt)}")
    if attempt.http_status is not None and 400 <= attempt.http_status < 500:
        return Decision("errored", error_code=attempt.error_code,
                        status_message=attempt.error_message or f"HTTP {attempt.http_status}")
    # A 5xx, no answer after sending, or an answer that is neither success nor error (a 2xx
    # without a SID, a redirect from a proxy): Twilio may have created the message (its own
    # page for 20500 says so), so ask it before anything is sent again.
    return Decision(
        "processing", error_code=attempt.error_code,
        status_message=f"outcome unknown ({describe(attempt)}); reconciling with Twilio")


def account_wide_reason(attempt: TwilioAttempt) -> str | None:
    """Why the whole sender must stop, or None when the error is about this message only."""
    if attempt.error_code in ACCOUNT_WIDE:
        return ACCOUNT_WIDE[attempt.error_code]
    if attempt.http_status == 401:  # a proxy or an old API answering without Twilio's code
        return ACCOUNT_WIDE[20003]
    return None


def pause_delay(pauses: int, policy: RetryPolicy,
                random: Callable[[], float] = _random.random) -> float:
    """How long a sender waits before it tries again after its `pauses`-th pause in a row."""
    return backoff_delay(pauses, policy, None, random)


def reconcile_next(checks_done: int) -> float | None:
    """Seconds until the next reconciliation of an unknown outcome after `checks_done` checks
    found nothing, or None when none is left: the row may be sent again."""
    return RECONCILE_DELAYS[checks_done] if checks_done < len(RECONCILE_DELAYS) else None


def backoff_delay(attempts: int, policy: RetryPolicy, retry_after: float | None,
                  random: Callable[[], float] = _random.random) -> float:
    """Seconds before the next try after `attempts` failed ones.

    Exponential (backoff, 2x, 4x ... capped at backoff_max) with "equal jitter": half the step
    is kept and the other half is random. Full jitter would spread retries a little wider, but
    it can also retry at once, which is exactly wrong after a 429: equal jitter keeps the
    backoff growing while still scattering retries of a burst that failed together. Twilio's
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


def _is_throttled(attempt: TwilioAttempt) -> bool:
    """Too many requests: nothing was created, and the same request may go again later."""
    return attempt.http_status == 429 and attempt.error_code not in ACCOUNT_WIDE or (
        attempt.error_code == TOO_MANY_REQUESTS)


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
