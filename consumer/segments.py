"""How many SMS segments a body takes: its cost in the sender's token bucket.

Twilio (and the carriers behind it) count throughput in segments, so the dispatcher paces by
segments, not by messages. The rules are 3GPP TS 23.038 / 23.040 as Twilio applies them:

- A body made only of GSM-7 characters is sent in GSM-7: 160 septets in a single segment, or
  153 per part once it needs a concatenation header. Characters of the extension table are sent
  as ESC + character, so they cost two septets, and the pair is never split across two parts.
- Anything else is sent in UCS-2: 70 UTF-16 code units in a single segment, 67 per part.
  Characters outside the Basic Multilingual Plane (most emoji) are a surrogate pair, two code
  units, and the pair is never split across two parts.

Twilio's optional Smart Encoding (turning ’ into ' and the like) is not assumed: without it
Twilio sends such a body as UCS-2, and counting high is the safe side for pacing.

An empty body counts as one GSM-7 segment with zero units: whatever goes out still occupies a
segment (the contract requires 1..1600 characters, so this only matters for media-only MMS,
whose cost `cost_of` fixes at one anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

# GSM 03.38 default alphabet. ESC (0x1B) is left out on purpose: it only introduces the
# extension table and a literal ESC in a body cannot be sent as itself.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The default extension table: each is ESC + one septet.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_PART = 160, 153
UCS2_SINGLE, UCS2_PART = 70, 67


@dataclass(frozen=True)
class SegmentCount:
    encoding: Literal["GSM-7", "UCS-2"]
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int


def segments_of(body: str) -> SegmentCount:
    """The encoding Twilio will use for `body`, its size in units, and its segment count."""
    gsm_costs = _gsm7_costs(body)
    if gsm_costs is not None:
        return _count("GSM-7", gsm_costs, GSM7_SINGLE, GSM7_PART)
    ucs2_costs = [2 if ord(char) > 0xFFFF else 1 for char in body]
    return _count("UCS-2", ucs2_costs, UCS2_SINGLE, UCS2_PART)


def cost_of(body: str, has_media: bool) -> int:
    """Tokens a message takes from its sender's bucket: an MMS is one, an SMS its segments."""
    return 1 if has_media else segments_of(body).segments


def _gsm7_costs(body: str) -> list[int] | None:
    """Septets per character, or None when a character is not in GSM-7 at all."""
    costs = []
    for char in body:
        if char in GSM7_BASIC:
            costs.append(1)
        elif char in GSM7_EXTENSION:
            costs.append(2)
        else:
            return None
    return costs


def _count(encoding: Literal["GSM-7", "UCS-2"], costs: list[int], single: int,
           part: int) -> SegmentCount:
    units = sum(costs)
    if units <= single:
        return SegmentCount(encoding, units, 1)
    # Fill parts greedily; a character whose units do not all fit starts the next part,
    # because an escape pair or a surrogate pair must arrive in one piece.
    segments, used = 1, 0
    for cost in costs:
        if used + cost > part:
            segments, used = segments + 1, 0
        used += cost
    return SegmentCount(encoding, units, segments)
