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

    @property
    def db(self) -> psycopg.Connection:
        raise NotImplementedError

    @property
    def lock_db(self) -> psycopg.Connection:
        raise NotImplementedError

    @property
    def held(self) -> dict[str, Sender]:
        return self.scheduler.senders

    def _claimed_ids(self) -> list[UUID]:
        raise NotImplementedError

    def _flush_outcomes(self) -> None:
        raise NotImplementedError

    def _reconcile(self, senders: list[str], expired_only: bool) -> None:
        raise NotImplementedError
