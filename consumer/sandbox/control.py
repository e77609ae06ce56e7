"""Drive a running sandbox (in this process or another) through its /_fake/ paths, or start
one as its own process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import urllib.request

from consumer.sandbox.api import FAKE_ACCOUNT_SID, FAKE_AUTH_TOKEN


class FakeTwilioControl:
    """Drives a running fake (in this process or another) through its /_fake/ endpoints."""

    def __init__(self, url: str, account_sid: str = FAKE_ACCOUNT_SID,
                 auth_token: str = FAKE_AUTH_TOKEN) -> None:
        self.url = url.rstrip("/")
        self.account_sid = account_sid
        self.auth_token = auth_token

    def messages(self, accepted_only: bool = False, after: int = 0) -> list[dict]:
        """Every creation request received, in arrival order, with the outcome returned;
        only those with `seq` above `after` when given (poll with the last seq seen)."""
        messages = self._call("GET", f"/_fake/messages?after={after}")["messages"]
        return [m for m in messages if m["accepted"]] if accepted_only else messages

    def clear(self) -> None:
        """Forget every message and callback (faults and config stay)."""
        self._call("DELETE", "/_fake/messages")

    def set_fault(self, mode: str | None, **options: object) -> list[dict]:
        """Replace the faults with one rule (mode None: no faults), e.g.
        `set_fault("429", count=3, retry_after=2)`, `set_fault("500", probability=0.1)` or
        `set_fault("20003", seconds=60)` (the account is broken for a minute)."""
        return self.set_faults([] if mode is None else [{"mode": mode, **options}])

    def set_faults(self, rules: list[dict]) -> list[dict]:
        return self._call("POST", "/_fake/faults", rules)["faults"]

    def faults(self) -> list[dict]:
        return self._call("GET", "/_fake/faults")["faults"]

    def configure(self, **settings: float) -> dict:
        """latency_ms, jitter_ms, send_delay_ms, deliver_delay_ms, price_delay_ms,
        price_per_segment, callback_duplicates (0/1),
        callback_reorder (0/1); they apply to messages created afterwards."""
        return self._call("POST", "/_fake/config", settings)

    def set_latency(self, latency_ms: float, jitter_ms: float = 0) -> dict:
        return self.configure(latency_ms=latency_ms, jitter_ms=jitter_ms)

    def opt_out(self, *numbers: str, remove: tuple[str, ...] = ()) -> list[str]:
        """Recipients the fake answers 21610 for (as Twilio does once one texted STOP), after
        adding `numbers` and removing `remove`."""
        return self._call("POST", "/_fake/opted-out",
                          {"add": list(numbers), "remove": list(remove)})["opted_out"]

    def stats(self) -> dict:
        return self._call("GET", "/_fake/stats")

    def callbacks(self) -> list[dict]:
        return self._call("GET", "/_fake/callbacks")["callbacks"]

    def _call(self, method: str, path: str, payload: object = None) -> dict:
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.loads(response.read())


def spawn(*flags: str, account_sid: str = FAKE_ACCOUNT_SID, auth_token: str = FAKE_AUTH_TOKEN,
          env: dict[str, str] | None = None) -> tuple[subprocess.Popen, FakeTwilioControl]:
    """Start `smsq fake-twilio` as its own process on a free port (benchmarks, crash tests).
    Stop it with SIGTERM; its log goes to the parent's stderr."""
    process = subprocess.Popen(
        [sys.executable, "-m", "consumer.cli", "fake-twilio", "--port", "0",
         "--account-sid", account_sid, "--auth-token", auth_token, *flags],
        # Not the working directory: a developer's .env there must not configure the fake.
        stdout=subprocess.PIPE, text=True, env=env, cwd=tempfile.gettempdir())
    url = process.stdout.readline().strip()  # type: ignore[union-attr]
    if not url.startswith("http://"):
        process.kill()
        raise RuntimeError(f"smsq fake-twilio did not start (exit status {process.wait()})")
    return process, FakeTwilioControl(url, account_sid, auth_token)
