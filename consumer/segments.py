"""How many SMS segments a body takes: its cost in the sender's token bucket.

Twilio (and the carriers behind it) count throughput in segments, so the dispatcher paces by
segments, not by messages. The rules are 3GPP TS 23.038 / 23.040 as Twilio applies them, and
the count agrees with Twilio's own segment calculator (the npm package
`sms-segments-calculator`, which tests/test_segments_calculator.py runs on thousands of
bodies):

- A segment holds 140 octets. Once a body needs more than one, each part carries a 6-octet
  concatenation header: 134 octets are left for text.
- A body made only of GSM-7 characters is sent in GSM-7, 7 bits a character: 160 in a
  single segment, 153 per part. Characters of the extension table are sent as ESC +
  character, so they cost two septets.
- Anything else is sent in UCS-2: 70 UTF-16 code units in a single segment, 67 per part.
- Text is cut into parts between grapheme clusters (what a reader sees as one character:
  an emoji with its skin tone, a family joined by zero-width joiners, a flag, a keycap,
  a letter with its accents), never inside one; so an escape pair or a surrogate pair is
  never split either. A `\r\n` counts as two characters, as the calculator splits it.

Twilio's optional Smart Encoding (turning ’ into ' and the like) is not assumed: without it
Twilio sends such a body as UCS-2, and counting high is the safe side for pacing.

An empty body counts as one GSM-7 segment with zero units: whatever goes out still occupies a
segment (the contract requires 1..1600 characters, so this only matters for media-only MMS,
whose cost `cost_of` fixes at one anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import regex

# GSM 03.38 default alphabet. ESC (0x1B) is left out on purpose: it only introduces the
# extension table and a literal ESC in a body cannot be sent as itself.
GSM7_BASIC = frozenset(
    "@£$¥èéùìòÇ\nØø\rÅåΔ_ΦΓΛΩΠΨΣΘΞÆæßÉ !\"#¤%&'()*+,-./0123456789:;<=>?"
    "¡ABCDEFGHIJKLMNOPQRSTUVWXYZÄÖÑÜ§¿abcdefghijklmnopqrstuvwxyzäöñüà"
)
# The default extension table: each is ESC + one septet.
GSM7_EXTENSION = frozenset("\f^{}\\[~]|€")

GSM7_SINGLE, GSM7_PART = 160, 153  # what the bit counts below come to, in characters
UCS2_SINGLE, UCS2_PART = 70, 67
SEGMENT_BITS = 140 * 8
HEADER_BITS = 6 * 8  # the concatenation header of each part of a longer body

# Extended grapheme clusters (Unicode's UAX #29, as `regex` implements it).
_GRAPHEME = regex.compile(r"\X")
# Where the calculator's older rules (Unicode 10's, through the grapheme-splitter package)
# cut a cluster that today's rules keep whole: before a skin-tone modifier that does not
# follow an emoji that takes one, marks aside (a lone 🏽, a second one, one after a flag).
_LOOSE_MODIFIER = regex.compile(
    r"(?<!\p{Emoji_Modifier_Base}(?:(?!\p{Emoji_Modifier})\p{Grapheme_Cluster_Break=Extend})*)"
    r"(?=\p{Emoji_Modifier})")


@dataclass(frozen=True)
class SegmentCount:
    encoding: Literal["GSM-7", "UCS-2"]
    units: int  # septets for GSM-7, UTF-16 code units for UCS-2
    segments: int


def segments_of(body: str) -> SegmentCount:
    """The encoding Twilio will use for `body`, its size in units, and its segment count."""
    if GSM7_BASIC.issuperset(body):  # the common case, counted without a loop in Python
        return SegmentCount("GSM-7", len(body), _basic_gsm7_segments(len(body)))
    gsm_costs = _gsm7_costs(body)
    if gsm_costs is not None:
        # GSM-7 characters never join into a cluster with another (a \r\n is split).
        return _count("GSM-7", gsm_costs, 7)
    units = _utf16_units(body)
    if units <= UCS2_SINGLE:  # one segment, however it is cut
        return SegmentCount("UCS-2", units, 1)
    return _count("UCS-2", [_utf16_units(cluster) for cluster in _clusters(body)], 16)


def cost_of(body: str, has_media: bool) -> int:
    """Tokens a message takes from its sender's bucket: an MMS is one, an SMS its segments."""
    return 1 if has_media else segments_of(body).segments


def _basic_gsm7_segments(characters: int) -> int:
    """What `_count` comes to when every character is one septet: 160 fit in one segment,
    153 in each part of a longer body."""
    return 1 if characters <= GSM7_SINGLE else -(-characters // GSM7_PART)


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


def _utf16_units(text: str) -> int:
    return len(text) + sum(1 for char in text if ord(char) > 0xFFFF)


def _clusters(body: str) -> list[str]:
    """The body's grapheme clusters, cut where the calculator cuts them."""
    clusters: list[str] = []
    for cluster in _GRAPHEME.findall(body):
        if cluster == "\r\n":
            clusters += ("\r", "\n")
        elif len(cluster) > 1 and _LOOSE_MODIFIER.search(cluster, 1):
            clusters += [part for part in _LOOSE_MODIFIER.split(cluster) if part]
        else:
            clusters.append(cluster)
    return clusters


def _count(encoding: Literal["GSM-7", "UCS-2"], costs: list[int], unit_bits: int) -> SegmentCount:
    """Segments for clusters costing `costs` units each, cut as the calculator cuts them.

    The first segment is filled without a header. When a cluster does not fit, a part with
    a header starts, and the first segment, getting its header only now, hands to the new
    part as many of its last clusters as the header displaces. A cluster never fits in
    less room than it takes; one larger than a whole part (hundreds of combining marks)
    overfills its part, and the next cluster starts another.
    """
    used: list[int] = []  # bits used by each segment so far, headers included
    first: list[int] = []  # the first segment's clusters, in bits, while it may give some back
    for cost in costs:
        bits = cost * unit_bits
        if not used or SEGMENT_BITS - used[-1] < bits:
            used.append(HEADER_BITS if used else 0)
            if len(used) == 2:
                used[0] += HEADER_BITS
                while used[0] > SEGMENT_BITS:
                    moved = first.pop()
                    used[0] -= moved
                    used[1] += moved
        used[-1] += bits
        if len(used) == 1:
            first.append(bits)
    return SegmentCount(encoding, sum(costs), max(len(used), 1))
