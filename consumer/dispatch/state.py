"""What the parts of the dispatcher share: the state `loop.Dispatcher` holds, as its mixins
(reconcile.py, sharing.py, guard_rails.py) see it. Declared here so that each part names
what it uses, and the type checker checks it."""

from __future__ import annotations

from uuid import UUID

import psycopg

from consumer.dispatch import claims
from consumer.dispatch.scheduler import Scheduler, Sender
from consumer.dispatch.threads import WorkerPool
from consumer.dispatch.twilio_client import TwilioSender
from consumer.settings import Settings


class DispatcherState:
    settings: Settings
    holder: str  # host:pid
    addresses: dict[str, str]  # sender key -> From number or Messaging Service
    scheduler: Scheduler[claims.ClaimedRow]
    outcomes: list[claims.Outcome]
    in_flight: dict[UUID, claims.ClaimedRow]  # sends and reconciliations
    pool: WorkerPool
    twilio: TwilioSender
    unsent_when_lost: list[UUID]  # rows to hand back at the next connect

    @property
    def db(self) -> psycopg.Connection:
        raise NotImplementedError

    @property
    def lock_db(self) -> psycopg.Connection:
        raise NotImplementedError

    @property
    def held(self) -> dict[str, Sender]:
        return self.scheduler.senders

    def _hand_back(self, ids: list[UUID]) -> None:
        """Rows claimed and never sent, back to pending. Should Postgres go away meanwhile,
        they go back at the next connect (else they would wait for their lease)."""
        try:
            claims.release_unsent(self.db, ids, self.holder)
        except Exception:  # re-raised: the loop ends and reconnects, which hands them back
            self.unsent_when_lost += ids
            raise

    def _claimed_ids(self) -> list[UUID]:
        raise NotImplementedError

    def _flush_outcomes(self) -> None:
        raise NotImplementedError

    def _reconcile(self, senders: list[str], expired_only: bool) -> None:
        raise NotImplementedError
