"""The status callbacks of `smsq fake-twilio`: when each is due, and posting them signed."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlencode

from twilio.request_validator import RequestValidator

from consumer.sandbox.messages import API_VERSION, Received


def callback_plan(entry: Received, account_sid: str, duplicates: bool = False,
                  reorder: bool = False) -> list[tuple[float, list[dict[str, str]]]]:
    """(when, the callbacks posted then, in order) for one accepted message: `sent` then its
    final status (only the final one for a message that failed, as it was never sent).
    `duplicates` posts each twice; `reorder` posts the final one first, the `sent` one right
    after it, as when Twilio's `sent` callback is late."""
    statuses = [] if entry.final_status == "failed" else [("sent", entry.sent_at)]
    statuses.append((entry.final_status, entry.done_at))
    plan = [(at, [callback_params(entry, account_sid, status, at)]) for status, at in statuses]
    if len(plan) == 2 and (reorder or plan[0][0] == plan[1][0]):
        # Posted together, in this order (callbacks due apart are posted concurrently).
        (_, sent), (done_at, final) = plan
        plan = [(done_at, final + sent if reorder else sent + final)]
    if duplicates:
        plan = [(at, [params for params in posts for _ in range(2)]) for at, posts in plan]
    return plan


def callback_params(entry: Received, account_sid: str, status: str, at: float) -> dict[str, str]:
    params = {"AccountSid": account_sid, "ApiVersion": API_VERSION,
              "From": entry.from_at(at) or "", "MessageSid": entry.sid or "",
              "MessageStatus": status, "SmsSid": entry.sid or "", "SmsStatus": status,
              "To": entry.to}
    if entry.messaging_service_sid:
        params["MessagingServiceSid"] = entry.messaging_service_sid
    if status == entry.final_status and entry.final_error_code is not None:
        params["ErrorCode"] = str(entry.final_error_code)
    return params


class StatusCallbacks:
    """Posts Twilio-signed status callbacks when due, to the StatusCallback URL unchanged (its
    query string too), signed over that full URL as Twilio does."""

    def __init__(self, validator: RequestValidator) -> None:
        self._validator = validator
        self._due: list[tuple[float, int, str, list[dict[str, str]]]] = []
        self._order = itertools.count()
        self._wake = threading.Condition()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="fake-twilio-callback")
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.log: list[dict] = []

    def schedule(self, url: str, plan: list[tuple[float, list[dict[str, str]]]]) -> None:
        with self._wake:
            for at, posts in plan:
                heapq.heappush(self._due, (at, next(self._order), url, posts))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fake-twilio-callbacks",
                                                daemon=True)
                self._thread.start()
            self._wake.notify()

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and (not self._due or self._due[0][0] > time.time()):
                    timeout = self._due[0][0] - time.time() if self._due else None
                    self._wake.wait(timeout)
                if self._stopping:
                    return
                _, _, url, posts = heapq.heappop(self._due)
            self._pool.submit(self._post_in_order, url, posts)

    def _post_in_order(self, url: str, posts: list[dict[str, str]]) -> None:
        # One after the other on one thread: posts due together arrive in the planned order.
        for params in posts:
            self._post(url, params)

    def _post(self, url: str, params: dict[str, str]) -> None:
        signature = self._validator.compute_signature(url, params)
        request = urllib.request.Request(
            url, data=urlencode(params).encode(), method="POST",
            headers={"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1",
                     "Content-Type": "application/x-www-form-urlencoded"})
        posted_at = time.time()
        http_status: int | None = None
        error: str | None = None
        try:
            with urllib.request.urlopen(request, timeout=5) as response:
                http_status = response.status
        except urllib.error.HTTPError as exc:
            http_status = exc.code
        except OSError as exc:
            error = str(exc)
        outcome = {"url": url, "sid": params["MessageSid"], "status": params["MessageStatus"],
                   "error_code": params.get("ErrorCode"), "posted_at": posted_at,
                   "http_status": http_status, "error": error,
                   "ok": error is None and 200 <= (http_status or 0) < 300}
        with self._wake:
            self.log.append(outcome)

    def entries(self) -> list[dict]:
        with self._wake:
            return list(self.log)

    def counts(self) -> dict[str, int]:
        with self._wake:
            ok = sum(1 for outcome in self.log if outcome["ok"])
            waiting = sum(len(posts) for _, _, _, posts in self._due)
            return {"callbacks_ok": ok, "callbacks_failed": len(self.log) - ok,
                    "callbacks_waiting": waiting}

    def clear(self) -> None:
        with self._wake:
            self._due.clear()
            self.log.clear()

    def stop(self) -> None:
        with self._wake:
            self._stopping = True
            self._wake.notify()
        self._pool.shutdown(wait=False, cancel_futures=True)
