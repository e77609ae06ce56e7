"""Which Twilio status callback may change a message's `delivery_status` (pure).

Twilio sends callbacks out of order and more than once; a late `sent` must never undo
`delivered`. Each status has a rank, a callback applies only when it moves the rank
forward, and the final states never change again.
"""

from __future__ import annotations

# Twilio's MessageStatus values -> our delivery_status column (docs/contract.md, section 3).
_AS_DELIVERY_STATUS = {
    "accepted": "queued",
    "scheduled": "queued",
    "queued": "queued",
    "sending": "queued",
    "sent": "sent",
    "delivered": "delivered",
    "read": "delivered",
    "undelivered": "undelivered",
    "failed": "failed",
}
_RANK = {"queued": 0, "sent": 1, "delivered": 2, "undelivered": 2, "failed": 2}
FINAL = frozenset(status for status, rank in _RANK.items() if rank == 2)


def delivery_status_of(twilio_status: str) -> str | None:
    """Our delivery_status for Twilio's MessageStatus, None for one we do not track."""
    return _AS_DELIVERY_STATUS.get(twilio_status.strip().lower())


def moves_forward(current: str | None, incoming: str) -> bool:
    """True when `incoming` is a later stage than `current` (None: nothing heard yet)."""
    if current is None:
        return True
    return _RANK[incoming] > _RANK[current]


def error_code_of(value: str | None) -> int | None:
    """Twilio's ErrorCode parameter as a number; absent, empty or garbage is None."""
    if value is None:
        return None
    value = value.strip()
    return int(value) if value.isdigit() else None
