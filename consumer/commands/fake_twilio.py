"""`smsq fake-twilio`: a local stand-in for Twilio's Messages API. Nothing is delivered."""

from __future__ import annotations

import argparse
import logging

from consumer.commands import UsageError
from consumer.sandbox import (
    FAKE_ACCOUNT_SID,
    FAKE_AUTH_TOKEN,
    FAULT_MODES,
    UNDELIVERABLE_TO,
    FakeTwilioServer,
    FaultError,
    FaultRule,
)
from consumer.settings import Settings
from consumer.signals import StopSignal

log = logging.getLogger(__name__)

DEFAULT_PORT = 8089


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT,
                        help=f"port (default {DEFAULT_PORT}; 0 picks a free one and prints it)")
    parser.add_argument("--account-sid", help="accepted account SID (default: "
                        f"TWILIO_ACCOUNT_SID, else {FAKE_ACCOUNT_SID})")
    parser.add_argument("--auth-token", help="accepted auth token (default: "
                        f"TWILIO_AUTH_TOKEN, else {FAKE_AUTH_TOKEN})")
    parser.add_argument("--latency-ms", type=float, default=0, help="added to every API answer")
    parser.add_argument("--jitter-ms", type=float, default=0,
                        help="random extra latency, uniform in [0, this]")
    parser.add_argument("--send-delay-ms", type=float, default=100,
                        help="time a message stays queued before it is sent")
    parser.add_argument("--deliver-delay-ms", type=float, default=400,
                        help="time from sent to delivered")
    parser.add_argument("--price-delay-ms", type=float, default=1000,
                        help="time from sent to the message's price being filled in")
    parser.add_argument("--fault", action="append", default=[], metavar="MODE[:k=v,...]",
                        help="inject a fault into message creation, e.g. 429:count=3,retry_after=2 "
                             "or 500:probability=0.1 or 20003:seconds=60 or hold:hold_ms=120000 "
                             "or fail-30001:to=+14155550123; keys: count probability seconds "
                             "retry_after slow_ms hold_ms to sender; modes: "
                             f"{' '.join(sorted(FAULT_MODES))}; repeatable")
    parser.add_argument("--opted-out", action="append", default=[], metavar="NUMBER",
                        help="a recipient who opted out: messages to it are refused with 21610, "
                             "as Twilio refuses them after a STOP; repeatable")
    parser.add_argument("--callback-duplicates", action="store_true",
                        help="post every status callback twice")
    parser.add_argument("--callback-reorder", action="store_true",
                        help="post the final status callback before the 'sent' one")
    parser.epilog = (f"Twilio's test numbers answer as Twilio does (To +15005550001 -> 21211, "
                     f"...); To {UNDELIVERABLE_TO} is accepted and then undelivered (30003). "
                     "Control at run time: GET/DELETE /_fake/messages, GET/POST/DELETE "
                     "/_fake/faults, GET/POST /_fake/config, GET/POST /_fake/opted-out, "
                     "GET /_fake/stats, "
                     "GET /_fake/callbacks.")


def main(settings: Settings, args: argparse.Namespace) -> int:
    try:
        faults = [FaultRule.parse(text) for text in args.fault]
    except (FaultError, ValueError) as exc:
        raise UsageError(f"--fault: {exc}") from None
    token = settings.twilio_auth_token.get_secret_value() if settings.twilio_auth_token else None
    server = FakeTwilioServer(
        args.host, args.port, faults=faults,
        account_sid=args.account_sid or settings.twilio_account_sid or FAKE_ACCOUNT_SID,
        auth_token=args.auth_token or token or FAKE_AUTH_TOKEN,
        latency_ms=args.latency_ms, jitter_ms=args.jitter_ms,
        send_delay_ms=args.send_delay_ms, deliver_delay_ms=args.deliver_delay_ms,
        price_delay_ms=args.price_delay_ms,
        callback_duplicates=args.callback_duplicates, callback_reorder=args.callback_reorder,
        opted_out=args.opted_out)
    stop = StopSignal().install()
    with server:
        log.warning("fake Twilio listening on %s: a SANDBOX, nothing is delivered to any phone",
                    server.url, extra={"action": "fake_twilio_started", "url": server.url,
                                       "account_sid": server.fake.account_sid})
        # The first stdout line is the URL, for scripts and tests that asked for port 0.
        print(server.url, flush=True)
        while not stop.wait(3600):
            pass
    log.info("fake Twilio stopped", extra={"action": "fake_twilio_stopped"})
    return 0
