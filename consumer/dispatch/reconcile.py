"""Asking Twilio about a message whose outcome is unknown (docs/contract.md, section 4).

The part of the dispatcher that, for a row left in `processing` (a 5xx, a timeout, a
dispatcher that died mid-send), lists Twilio's messages in a worker thread and decides in the
loop: found and unrecorded, the row is `sent` with that SID; not found, it is checked again
after `outcomes.RECONCILE_DELAYS`, and sent again only when every check found nothing.
A mixin of `loop.Dispatcher`, whose state (connections, outcomes, workers) it uses.
"""

from __future__ import annotations

import logging
import time

from consumer import metrics
from consumer.dispatch import claims
from consumer.dispatch.outcomes import RECONCILE_DELAYS, reconcile_next
from consumer.dispatch.state import DispatcherState
from consumer.dispatch.threads import ReconcileResult
from consumer.dispatch.twilio_client import FoundMessage

log = logging.getLogger(__name__)


class Reconciliation(DispatcherState):
    """Uses the Dispatcher's connections, outcomes, workers and scheduler."""

    def _reconcile(self, senders: list[str], expired_only: bool) -> None:
        if not senders:
            return
        # Our own rows (queued or on the wire) are left out here, not in SQL: sending every
        # id in hand with each tick cost the loop as much CPU as all its sends' outcomes.
        for row in claims.stale_processing(self.db, senders, expired_only):
            if row.id in self.in_flight or self.scheduler.holds_row(row.sender, row.id):
                continue
            self.in_flight[row.id] = row
            self.pool.submit(self._find, self.addresses[row.sender], row)

    def _find(self, address: str, row: claims.ClaimedRow) -> ReconcileResult:
        try:
            found = self.twilio.find_sent(row.outgoing(address), row.claimed_datetime)
            return ReconcileResult(row, found, None)
        except Exception as exc:  # noqa: BLE001 - Twilio unreachable: try again later
            return ReconcileResult(row, [], exc)

    def _on_reconciled(self, result: ReconcileResult) -> None:
        row = result.row
        if result.error is not None:
            self.outcomes.append(claims.Outcome(
                row.id, "processing", f"reconciliation failed, will retry: {result.error}",
                lease_seconds=RECONCILE_DELAYS[-1], attempted=False))
            log.warning("reconciliation failed", extra={
                "action": "reconcile_failed", "notification_id": str(row.id),
                "error": str(result.error)})
            return
        if self._sending_alike(row):
            # A send of ours of the same text to the same number may be the message Twilio
            # listed: decide once that one is recorded (the row is looked at again).
            return
        found = self._first_unrecorded(row, result.found)
        if found is not None:
            self.outcomes.append(claims.Outcome(
                row.id, "sent", sid=found.sid, segments=found.segments or row.cost,
                sent_datetime=found.date_created, attempted=False))
            self._log_reconciled(row, "sent", found.sid)
        elif row.lease_expired:
            self._not_found(row)
        # Else: not found yet, but its lease is still running (a request of a holder that just
        # died may still be on its way to Twilio); it is looked at again when the lease expires.

    def _not_found(self, row: claims.ClaimedRow) -> None:
        """Checked again a little later, and sent again only once every check found nothing."""
        checks = row.reconcile_checks + 1
        delay = reconcile_next(checks)
        if delay is not None:
            self.outcomes.append(claims.Outcome(
                row.id, "processing", f"outcome unknown; not found at Twilio in {checks} "
                f"check(s), checking again in {delay:g} s", lease_seconds=delay,
                attempted=False, reconcile_checks=checks))
            metrics.DISPATCH_RECONCILED.labels("not_found_yet").inc()
            return
        self.outcomes.append(claims.Outcome(
            row.id, "pending", f"not found at Twilio in {checks} checks after an unknown "
            "outcome; sending again", attempted=False, reconcile_checks=0))
        self.scheduler.wake(row.sender, time.monotonic())
        self._log_reconciled(row, "pending", None)

    def _sending_alike(self, row: claims.ClaimedRow) -> bool:
        return any(other.to_phone_number == row.to_phone_number and other.body == row.body
                   and other.id != row.id for other in self.in_flight.values())

    def _first_unrecorded(self, row: claims.ClaimedRow,
                          found: list[FoundMessage]) -> FoundMessage | None:
        """The oldest match whose SID no row holds, in the database or about to be.

        Two unrecorded matches (the same text sent twice to one person, both answers lost)
        cannot be told apart: each row takes the oldest one left, which is deterministic and
        never resends, and the ambiguity is logged for an operator.
        """
        if not found:
            return None
        recorded = claims.recorded_sids(self.db, [message.sid for message in found])
        recorded.update(outcome.sid for outcome in self.outcomes if outcome.sid)
        unrecorded = [message for message in found if message.sid not in recorded]
        if len(unrecorded) > 1:
            log.warning("several messages at Twilio match one notification", extra={
                "action": "reconcile_ambiguous", "notification_id": str(row.id),
                "sids": [message.sid for message in unrecorded], "taken": unrecorded[0].sid})
        return unrecorded[0] if unrecorded else None

    def _log_reconciled(self, row: claims.ClaimedRow, status: str, sid: str | None) -> None:
        metrics.DISPATCH_RECONCILED.labels("found" if status == "sent" else "not_found").inc()
        log.info("reconciled with twilio", extra={
            "action": "reconciled", "notification_id": str(row.id), "status": status,
            "sid": sid})
