"""The guard rails of the dispatcher (README "Guard rails"): what happens to a row a guard stops.

- A row to a suppressed number is errored by the claim itself (claims.CLAIM_DUE): here it is
  only counted and logged. It never reaches the scheduler, so it takes no token.
- A row that would pass SMSQ_RECIPIENT_LIMIT is found just before its request, when its place
  is taken (guards.reserve_recipients): it becomes errored, and its tokens go back.
- A sender that reached SMSQ_DAILY_SEGMENT_LIMIT is paused by the scheduler until the next UTC
  day: here it is logged once (a warning), counted, and its rows in hand go back to pending.

A mixin of `loop.Dispatcher`, whose state (connections, outcomes, scheduler) it uses.
"""

from __future__ import annotations

import logging

from consumer import metrics
from consumer.dispatch import claims, guards
from consumer.dispatch.outcomes import Decision
from consumer.dispatch.scheduler import Paused, Send
from consumer.dispatch.state import DispatcherState
from consumer.dispatch.threads import SendResult
from consumer.pipeline import Guard, count_guard

log = logging.getLogger(__name__)


class GuardRails(DispatcherState):
    """Uses the Dispatcher's connection, settings, outcomes and scheduler."""

    def _on_suppressed(self, rows: list[claims.ClaimedRow]) -> None:
        if not rows:
            return
        count_guard(self.db, Guard.SUPPRESSED, len(rows))
        metrics.DISPATCH_SUPPRESSED.inc(len(rows))
        for row in rows:
            log.info("message not sent: its number is suppressed", extra={
                "action": "message_suppressed", "notification_id": str(row.id),
                "to": row.to_phone_number})

    def _within_recipient_limits(self, sends: list[Send]) -> list[Send]:
        """The sends that may go; the others become errored, their tokens given back."""
        limits = self.settings.recipient_limits
        if not limits or not sends:
            return sends
        capped = guards.reserve_recipients(self.db, [send.row for send in sends], limits)
        for send in sends:
            limit = capped.get(send.row.id)
            if limit is None:
                continue
            self.scheduler.unsend(send)
            message = (f"not sent: recipient limit reached ({limit.sends} per "
                       f"{limit.text.split('/', 1)[1]} to one number, SMSQ_RECIPIENT_LIMIT)")
            self.outcomes.append(claims.Outcome(send.row.id, "errored", message,
                                                attempted=False))
            metrics.DISPATCH_CAPPED.labels(limit.text).inc()
            log.warning("message not sent: recipient limit reached", extra={
                "action": "message_capped", "notification_id": str(send.row.id),
                "to": send.row.to_phone_number, "limit": limit.text})
        if capped:
            count_guard(self.db, Guard.CAPPED, len(capped))
        return [send for send in sends if send.row.id not in capped]

    @staticmethod
    def _unspent(result: SendResult, decision: Decision) -> float:
        """Segments of today's budget the request took when it left and did not use: all of
        them unless sent (or perhaps sent); the difference when Twilio counted otherwise."""
        cost = result.row.cost
        if decision.status == "processing":
            return 0.0
        if decision.status == "sent":
            assert result.attempt is not None  # a sent decision comes from Twilio's answer
            return cost - (result.attempt.segments or cost)
        return cost

    def _forget_old_places(self) -> None:
        limits = self.settings.recipient_limits
        if limits:
            guards.forget_recipient_sends(self.db, max(limit.seconds for limit in limits))

    def _on_budget_paused(self, event: Paused) -> None:
        label = event.sender.key or "default"
        count_guard(self.db, Guard.BUDGET_PAUSED)
        metrics.BUDGET_PAUSES.labels(label).inc()
        log.warning("sender paused: daily budget reached", extra={
            "action": "sender_paused", "sender": label, "reason": event.sender.pause_reason,
            "status_message": event.decision.status_message,
            "pause_seconds": round(event.delay, 1)})
