"""Which sender (From number) carries a message.

With SMSQ_SENDERS unset every message goes through the default sender ('' in the database:
TWILIO_PHONE_NUMBER or TWILIO_MESSAGING_SERVICE_SID). With a pool, each recipient sticks to
one number of it, so a conversation keeps one From and the pool's rates add up.
"""

from __future__ import annotations

import zlib

DEFAULT_SENDER = ""


def sender_for(to_phone_number: str, pool: list[str]) -> str:
    if not pool:
        return DEFAULT_SENDER
    return pool[zlib.crc32(to_phone_number.encode()) % len(pool)]
