"""How dispatchers share the senders: each holds a fair share, hands over cleanly, and takes
over from a dead one without sending twice or faster than a sender's rate.

A sender is paced by whoever holds its advisory lock, on the lock connection. Every second
each dispatcher counts the dispatchers alive and holds ceil(S / D) of the S senders. A mixin
of `loop.Dispatcher`, whose connections, scheduler and outcomes it uses.
"""

from __future__ import annotations

import logging
import math
import random
import time

from consumer import metrics
from consumer.dispatch import claims, guards
from consumer.dispatch.outcomes import RECONCILE_DELAYS
from consumer.dispatch.scheduler import RELEASE_LEAD_SECONDS, Sender
from consumer.dispatch.state import DispatcherState
from consumer.settings import Settings

log = logging.getLogger(__name__)

# The dispatcher's tick: senders shared, buckets saved, leases reconciled. A request may
# leave up to a tick after the loop last saw its lock alive.
TICK_SECONDS = 1.0


def paced_senders(settings: Settings) -> dict[str, str]:
    """sender key (as stored in notification.sender) -> the From number or Messaging Service."""
    senders = {}
    default = settings.twilio_messaging_service_sid or settings.twilio_phone_number
    if default:
        senders[""] = default
    for number in settings.extra_senders:
        senders[number] = number
    return senders


class SenderSharing(DispatcherState):
    """Uses the Dispatcher's connections, scheduler and reconciliation."""

    def _share_senders(self) -> None:
        """Hold a fair share of the senders: ceil(S / D) with D dispatchers alive.

        Asking who is alive goes through the lock connection, so it also proves that
        connection alive: if it died, our locks died with it, and the OperationalError stops
        every send of ours at once.
        """
        alive = claims.live_dispatchers(self.lock_db)
        share = math.ceil(len(self.addresses) / max(1, alive))
        held = len(self.held)
        if held > share:
            for key in self._senders_to_hand_over(held - share):
                self._hand_over(key)
        elif held < share:
            free = claims.free_senders(self.lock_db, [k for k in self.addresses
                                                     if k not in self.held])
            random.shuffle(free)  # dispatchers starting together reach for different ones
            for key in claims.try_lock_senders(self.lock_db, free[:share - held]):
                self._take_over(key)

    def _senders_to_hand_over(self, count: int) -> list[str]:
        """The ones whose handing over disturbs least: nothing on the wire, few rows in hand.
        Never one with a request not yet left: the next holder could send before it arrives
        (the saved bucket cannot know how late it leaves); it goes at a later tick."""
        ready = [key for key in self.held if not self.scheduler.departure_pending(key)]
        return sorted(ready, key=lambda k: (self.held[k].in_flight,
                                            len(self.held[k].queue)))[:count]

    def _take_over(self, key: str) -> None:
        tokens = claims.inherited_tokens(self.db, key, self.scheduler.rate)
        spent = (guards.segments_today(self.db, key)
                 if self.settings.smsq_daily_segment_limit else 0.0)
        self.scheduler.take(key, self.addresses[key], tokens, spent)
        metrics.SENDERS_HELD.set(len(self.held))
        log.info("pacing sender", extra={"action": "sender_acquired", "sender": key or "default",
                                         "holder": self.holder, "tokens": tokens})
        # A previous holder may have died mid-send: once its requests can no longer be on
        # the wire, one reconciliation decides each of its rows (found: sent; else: again).
        claims.take_over_rows(self.db, key, self.holder, self._wire_seconds(),
                             len(RECONCILE_DELAYS) - 1)
        self._reconcile([key], expired_only=False)

    def _wire_seconds(self) -> float:
        """How long a request of a previous holder may still be on its way to Twilio."""
        # Released up to a tick after its lock was last seen alive, it may connect, wait
        # for its tokens (the lead), then wait for its answer.
        return (self.settings.smsq_twilio_connect_timeout + RELEASE_LEAD_SECONDS
                + self.settings.smsq_twilio_read_timeout + TICK_SECONDS)

    def _hand_over(self, key: str) -> None:
        """Give `key` up for another dispatcher: rows in hand back to pending, the bucket
        saved for the next holder, then the lock released."""
        sender = self.held[key]
        self._flush_outcomes()
        self._hand_back(self.scheduler.drop(key))
        claims.save_buckets(self.db, [self._bucket_row(sender, None, time.monotonic())])
        claims.unlock_sender(self.lock_db, key)
        metrics.SENDERS_HELD.set(len(self.held))
        log.info("sender handed over", extra={"action": "sender_handed_over",
                                              "sender": key or "default",
                                              "holder": self.holder})

    def _save_buckets(self, holder: str | None) -> None:
        now = time.monotonic()
        claims.save_buckets(self.db, [self._bucket_row(sender, holder, now)
                                     for sender in self.held.values()])

    def _bucket_row(self, sender: Sender, holder: str | None, now: float) -> tuple:
        """dispatch_sender's row of `sender`; holder None: handed over, tokens kept."""
        tokens = sender.bucket.tokens
        metrics.BUCKET_TOKENS.labels(sender.key or "default").set(tokens)
        paused = sender.pause_reason is not None and holder is not None
        return (sender.key, sender.address, holder, tokens, self.settings.twilio_sms_rate,
                sender.bucket.capacity, sender.paused_until - now if paused else None,
                sender.pause_reason if paused else None,
                sender.pause_message if paused else None)
