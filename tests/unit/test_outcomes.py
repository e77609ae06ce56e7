"""DESIGN.md's status table, outcome by outcome, and the retry backoff."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from consumer.dispatch.outcomes import (
    RECONCILE_DELAYS,
    Decision,
    RetryPolicy,
    TwilioAttempt,
    backoff_delay,
    decide,
    describe,
    pause_delay,
    reconcile_next,
)

POLICY = RetryPolicy(max_attempts=10, backoff=5, backoff_max=600)


def no_jitter() -> float:
    return 0.0


def full_jitter() -> float:
    return 1.0


@pytest.mark.parametrize("status", [200, 201])
def test_accepted_with_a_sid_is_sent(status: int) -> None:
    attempt = TwilioAttempt(request_sent=True, http_status=status, sid="SM" + "a" * 32, segments=2)
    assert decide(attempt, 1, POLICY) == Decision("sent")


TRANSIENT = [
    pytest.param(TwilioAttempt(True, 429, 20429, "Too Many Requests"), id="429-20429"),
    pytest.param(TwilioAttempt(True, 429, None, None), id="429-no-code"),
    pytest.param(TwilioAttempt(True, 400, 20429, "Too Many Requests"), id="20429-as-400"),
    pytest.param(TwilioAttempt(request_sent=False), id="not-sent"),
]


@pytest.mark.parametrize("attempt", TRANSIENT)
def test_transient_outcomes_go_back_to_pending_with_a_backoff(attempt: TwilioAttempt) -> None:
    decision = decide(attempt, 1, POLICY, random=no_jitter)
    assert decision.status == "pending"
    assert decision.retry_in == 2.5  # first step 5 s, equal jitter keeps at least half
    assert decision.error_code == attempt.error_code
    assert "attempt 1 of 10" in decision.status_message
    assert describe(attempt) in decision.status_message


@pytest.mark.parametrize("attempt", TRANSIENT)
def test_transient_outcomes_become_errored_after_max_attempts(attempt: TwilioAttempt) -> None:
    assert decide(attempt, 9, POLICY).status == "pending"
    decision = decide(attempt, 10, POLICY)
    assert decision.status == "errored"
    assert decision.retry_in is None
    assert decision.error_code == attempt.error_code
    assert decision.status_message == f"gave up after 10 attempts; last: {describe(attempt)}"
    assert decide(attempt, 11, POLICY).status == "errored"


REJECTED = [
    (400, 21211, "The 'To' number +15005550001 is not a valid phone number."),
    (400, 21612, "The 'To' phone number: +15005550002, is not currently reachable using the "
                 "'From' phone number: +15005550006 via SMS."),
    (400, 21408, "Permission to send an SMS has not been enabled for the region indicated by "
                 "the 'To' number: +15005550003."),
    (400, 21610, "Attempt to send to unsubscribed recipient"),
    (400, 21614, "'To' number is not a valid mobile number"),
    (400, 21602, "Message body is required."),
    (400, 21603, "A 'From' phone number is required."),
    (400, 21604, "A 'To' phone number is required."),
    (400, None, None),
    (403, None, "Forbidden"),
]


@pytest.mark.parametrize(("status", "code", "message"), REJECTED)
def test_other_4xx_are_errored_at_once_with_twilios_code_and_message(
        status: int, code: int | None, message: str | None) -> None:
    attempt = TwilioAttempt(True, status, code, message)
    decision = decide(attempt, 1, POLICY)
    assert decision == Decision("errored", error_code=code,
                                status_message=message or f"HTTP {status}")


@pytest.mark.parametrize("attempt", [
    pytest.param(TwilioAttempt(request_sent=True), id="timeout-after-send"),
    pytest.param(TwilioAttempt(True, 201, sid=None), id="201-without-sid"),
    pytest.param(TwilioAttempt(True, 302), id="redirect"),
    # Twilio's page for 20500: sending is not idempotent, a 500 may have created it.
    pytest.param(TwilioAttempt(True, 500, 20500, "Internal Server Error"), id="500"),
    pytest.param(TwilioAttempt(True, 502), id="proxy-502"),
    pytest.param(TwilioAttempt(True, 503, 20503, "Service Unavailable"), id="503"),
    pytest.param(TwilioAttempt(True, 504), id="proxy-504"),
    pytest.param(TwilioAttempt(True, 599), id="any-5xx"),
])
def test_unknown_outcomes_stay_processing_and_are_reconciled(attempt: TwilioAttempt) -> None:
    for attempts in (1, POLICY.max_attempts, POLICY.max_attempts + 5):
        decision = decide(attempt, attempts, POLICY)
        assert decision.status == "processing"
        assert decision.retry_in is None
        assert decision.status_message.startswith("outcome unknown")


ACCOUNT_WIDE = [
    pytest.param(TwilioAttempt(True, 401, 20003, "Authenticate"), "account_auth", id="20003"),
    pytest.param(TwilioAttempt(True, 403, 20003, "Permission Denied"), "account_auth",
                 id="20003-403"),
    pytest.param(TwilioAttempt(True, 401), "account_auth", id="401-no-code"),
    pytest.param(TwilioAttempt(True, 404, 20404, "The requested resource was not found"),
                 "account_not_found", id="20404"),
    pytest.param(TwilioAttempt(True, 400, 21611, "This 'From' number has exceeded the maximum "
                               "number of queued messages"), "sender_queue_full", id="21611"),
    pytest.param(TwilioAttempt(True, 429, 63038, "Account exceeded the daily messages limit"),
                 "daily_limit", id="63038"),
]


@pytest.mark.parametrize(("attempt", "reason"), ACCOUNT_WIDE)
def test_account_wide_errors_pause_the_sender_and_count_no_attempt(
        attempt: TwilioAttempt, reason: str) -> None:
    # Even past the last attempt: the backlog is never drained into errored.
    for attempts in (1, POLICY.max_attempts, POLICY.max_attempts + 5):
        decision = decide(attempt, attempts, POLICY)
        assert decision.status == "pending"
        assert decision.pause == reason
        assert decision.retry_in is None
        assert decision.error_code == attempt.error_code
        assert decision.status_message == f"sender paused: {describe(attempt)}"


def test_pauses_grow_from_the_retry_backoff_up_to_its_cap() -> None:
    assert [pause_delay(n, POLICY, no_jitter) for n in (1, 2, 3)] == [2.5, 5, 10]
    assert pause_delay(30, POLICY, full_jitter) == POLICY.backoff_max


def test_an_unknown_outcome_is_checked_a_few_times_before_it_may_be_sent_again() -> None:
    assert RECONCILE_DELAYS[0] <= 5  # seconds, not the lease
    delays = [reconcile_next(checks) for checks in range(len(RECONCILE_DELAYS) + 1)]
    assert delays[:-1] == list(RECONCILE_DELAYS)
    assert delays[-1] is None
    assert list(RECONCILE_DELAYS) == sorted(RECONCILE_DELAYS)


@pytest.mark.parametrize(("attempts", "low", "high"), [
    (1, 2.5, 5), (2, 5, 10), (3, 10, 20), (4, 20, 40), (7, 160, 320), (8, 300, 600),
    (9, 300, 600), (60, 300, 600),
])
def test_backoff_doubles_with_equal_jitter_up_to_the_cap(attempts: int, low: float,
                                                          high: float) -> None:
    assert backoff_delay(attempts, POLICY, None, no_jitter) == low
    assert backoff_delay(attempts, POLICY, None, full_jitter) == high
    assert backoff_delay(attempts, POLICY, None, lambda: 0.5) == (low + high) / 2


def test_retry_after_is_a_floor_not_a_replacement() -> None:
    assert backoff_delay(1, POLICY, retry_after=30, random=full_jitter) == 30
    assert backoff_delay(5, POLICY, retry_after=30, random=full_jitter) == 80
    # Twilio's word beats our cap.
    assert backoff_delay(20, POLICY, retry_after=900, random=full_jitter) == 900
    assert backoff_delay(1, POLICY, retry_after=0, random=no_jitter) == 2.5


def test_decide_honours_retry_after() -> None:
    attempt = TwilioAttempt(True, 429, 20429, "Too Many Requests", retry_after=42)
    assert decide(attempt, 1, POLICY, random=no_jitter).retry_in == 42


def test_jitter_spreads_retries_of_a_burst() -> None:
    delays = {decide(TwilioAttempt(True, 429), 3, POLICY).retry_in for _ in range(50)}
    assert len(delays) > 1
    assert all(10 <= d <= 20 for d in delays)


def test_descriptions_are_readable() -> None:
    assert describe(TwilioAttempt(False)) == "connection failed before the request was sent"
    assert describe(TwilioAttempt(True)) == "no answer after the request was sent"
    assert describe(TwilioAttempt(True, 429, 20429, "Too Many Requests")) == (
        "HTTP 429, Twilio error 20429: Too Many Requests")
    assert describe(TwilioAttempt(True, 502)) == "HTTP 502"


def test_pure_core_imports_no_io_library() -> None:
    """segments, bucket and outcomes stay pure: pyproject's import-linter contracts hold."""
    linter = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(linter)], cwd=Path(__file__).resolve().parents[2],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "pure core knows no I/O library KEPT" in result.stdout
