"""`smsq fake-twilio`: a local stand-in for Twilio's Messages API. Nothing reaches any phone.

Good enough that the official `twilio` client works against it unchanged but for the base URL:
create, fetch and list messages (To / From / DateSent filters, paging), HTTP basic auth, Twilio's
JSON and legacy error bodies, Twilio's test numbers, and signed status callbacks. On top of that,
what a sandbox needs for tests and benchmarks: latency, injected faults, and a log of everything
received with arrival times, all controllable at run time under `/_fake/` (no auth: it listens
on 127.0.0.1 by default and is a test tool).

Faithful where it matters to a sender that must never send twice: a new message is `queued`
(or `accepted` through a Messaging Service) with `date_sent` null, becomes `sent` after the send
delay and `delivered` after the delivery delay; DateSent filters compare GMT days, as Twilio
documents, and skip messages without date_sent; the unfiltered list shows queued ones too, newest
first. Message SIDs are `SM` + 32 hex digits (`MM` for a message with media), the account's
`AC` + 32 hex digits; `error_message` is filled whenever `error_code` is.

Fault modes (`FaultRule.mode`; the --fault flag, POST /_fake/faults, `FakeTwilioControl.set_fault`):
- `429` (Retry-After: `retry_after`), `500` (20500), `503` (20503), `21611` (400, sender queue
  full): answered with Twilio's error; nothing is created.
- `502`, `504`: answered as a proxy in front of Twilio would (a short text/html page); nothing is
  created.
- `created-500`, `created-502`, `created-503`, `created-504`: the message IS created (stored,
  listed, its callbacks posted), but the answer is that 5xx (Twilio's JSON for 500 / 503, a
  proxy's HTML page for 502 / 504).
- `20003` (401, "Authenticate": revoked token, suspended account), `20404` (404, wrong account),
  `63038` (429, daily message limit of the account): nothing is created. A `20003` or `20404`
  rule without `to` / `sender` answers fetch and list too while it lasts.
- `fail-30001`, `fail-30022`: accepted (201, queued), then the message ends `failed` (never sent:
  no `sent` callback, date_sent null) with that error_code and its error_message, in the resource
  and in the status callback (ErrorCode).
- `hold`: accepted, but it stays queued with date_sent null for `hold_ms` (default 60000) before it
  is sent and delivered; its callbacks follow.
- `slow`: accepted, answered after `slow_ms`. `drop`: accepted, then the connection is closed
  without an answer. `drop-unrecorded`: closed without an answer, nothing created.
A rule hits the creations to `to` / from `sender` (when set; otherwise every create), the next
`count` of them (None: all), each with `probability`, and ends `seconds` after it was set (None:
never), whatever its count. The fault applied shows in the `/_fake/messages` log entry and in the
resource (`fake_fault`, not a Twilio field).

Opted-out recipients (the `--opted-out` flag, POST /_fake/opted-out with `{"add": [...],
"remove": [...]}`, `FakeTwilioControl.opt_out`): every message to one is refused with 21610, as
Twilio refuses them once the recipient texted STOP.

Settings (`/_fake/config`, `FakeTwilioControl.configure`), read when a message is created:
`latency_ms`, `jitter_ms`, `send_delay_ms`, `deliver_delay_ms`, `price_delay_ms` (a sent
message's `price` is null until this long after sending, as at Twilio), `price_per_segment`
(USD, shown negative as Twilio does; a message that failed costs nothing),
`callback_duplicates` (1: every status callback is posted twice), `callback_reorder` (1: the
final status callback is posted before the `sent` one).

Only the tests, the benchmarks and the `fake-twilio` verb import this package (an
import-linter contract keeps it so). Its parts: `api.py` (state and answers), `faults.py`,
`callbacks.py`, `messages.py` (the message resources), `http.py` (the server), `control.py`.
"""
from consumer.sandbox.api import (
    API_VERSION,
    FAKE_ACCOUNT_SID,
    FAKE_AUTH_TOKEN,
    FakeTwilio,
)
from consumer.sandbox.control import FakeTwilioControl, spawn
from consumer.sandbox.faults import FAULT_MODES, FaultError, FaultRule, Reply
from consumer.sandbox.http import FakeTwilioServer
from consumer.sandbox.messages import (
    DELIVERY_ERRORS,
    SERVICE_POOL_NUMBER,
    UNDELIVERABLE_TO,
    UNDELIVERED_ERROR,
    Received,
)

__all__ = [
    "API_VERSION", "DELIVERY_ERRORS", "FAKE_ACCOUNT_SID", "FAKE_AUTH_TOKEN", "FAULT_MODES",
    "SERVICE_POOL_NUMBER", "UNDELIVERABLE_TO", "UNDELIVERED_ERROR", "FakeTwilio",
    "FakeTwilioControl", "FakeTwilioServer", "FaultError", "FaultRule", "Received", "Reply",
    "spawn",
]
