"""One way to wait for RabbitMQ or Postgres to come back, for every connection smsq holds.

tenacity, with exponentially growing waits and jitter (so that many programs that lost the
same server do not come back in step), one cap per kind of dependency, a stop flag that ends
the waiting at once, and one log line per wait in one format: `<dependency>_retry`, with the
attempt, the wait and the error. A new `retrying()` starts again from the first wait: make one
per outage, so that the next outage does not start at the cap.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import tenacity

from consumer.logs import error_text
from consumer.signals import StopSignal

FIRST_WAIT_SECONDS = 0.5
MAX_WAIT_SECONDS = {"rabbitmq": 30.0, "postgres": 5.0}


def retrying(dependency: str, stop: StopSignal,
             retry_on: type[BaseException] | tuple[type[BaseException], ...],
             logger: logging.Logger,
             before_sleep: Callable[[tenacity.RetryCallState], None] | None = None,
             first_wait: float = FIRST_WAIT_SECONDS) -> tenacity.Retrying:
    """Retry while `retry_on` is raised, until `stop` is requested: then the last error is
    raised again, or, with `.give_up_quietly()`, False is returned."""
    def sleep(seconds: float) -> None:
        stop.wait(seconds)  # woken early by a stop, which the `stop` condition then sees

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception_type(retry_on),
        wait=tenacity.wait_exponential_jitter(multiplier=first_wait,
                                              max=MAX_WAIT_SECONDS[dependency]),
        stop=lambda _state: stop.requested,
        sleep=sleep,
        before_sleep=before_sleep or logged(dependency, logger),
        reraise=True,
    )


def until_connected(dependency: str, stop: StopSignal,
                    retry_on: type[BaseException] | tuple[type[BaseException], ...],
                    logger: logging.Logger, connect: Callable[[], object]) -> bool:
    """Call `connect` until it succeeds (True) or a stop is requested (False)."""
    policy = retrying(dependency, stop, retry_on, logger).copy(
        retry_error_callback=lambda _state: False, reraise=False)
    result = policy(connect)
    return result is not False


def logged(dependency: str, logger: logging.Logger) -> Callable[[tenacity.RetryCallState], None]:
    def before_sleep(state: tenacity.RetryCallState) -> None:
        # Called only after an attempt that raised one of `retry_on`.
        exc = state.outcome.exception() if state.outcome else None
        assert exc is not None
        logger.warning(f"{dependency} unavailable, retrying",
                       extra={"action": f"{dependency}_retry", "attempt": state.attempt_number,
                              "wait_seconds": round(state.upcoming_sleep, 2),
                              "error": error_text(exc)})
    return before_sleep
