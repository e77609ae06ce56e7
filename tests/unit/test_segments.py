"""Segment counting, exactly, at every boundary that matters."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consumer.segments import (
    GSM7_BASIC,
    GSM7_EXTENSION,
    SegmentCount,
    _basic_gsm7_segments,
    _count,
    cost_of,
    segments_of,
)

CYRILLIC = "ж"  # outside GSM-7, inside the BMP: one UTF-16 unit
EMOJI = "😀"  # outside the BMP: a surrogate pair, two units


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # GSM-7 single segment and the first concatenation boundary
        ("", SegmentCount("GSM-7", 0, 1)),
        ("a", SegmentCount("GSM-7", 1, 1)),
        ("a" * 160, SegmentCount("GSM-7", 160, 1)),
        ("a" * 161, SegmentCount("GSM-7", 161, 2)),
        ("a" * 153 * 2, SegmentCount("GSM-7", 306, 2)),
        ("a" * (153 * 2 + 1), SegmentCount("GSM-7", 307, 3)),
        ("a" * 153 * 3, SegmentCount("GSM-7", 459, 3)),
        ("a" * 1600, SegmentCount("GSM-7", 1600, math.ceil(1600 / 153))),
        # extension characters cost two septets
        ("€" * 80, SegmentCount("GSM-7", 160, 1)),
        ("{" * 81, SegmentCount("GSM-7", 162, 2)),
        ("a" * 159 + "€", SegmentCount("GSM-7", 161, 2)),
        ("a" * 158 + "|", SegmentCount("GSM-7", 160, 1)),
        ("\f" * 80, SegmentCount("GSM-7", 160, 1)),
        # an escape pair that would straddle a part boundary moves to the next part
        ("a" * 152 + "€" + "a" * 152, SegmentCount("GSM-7", 306, 3)),
        ("a" * 153 + "€" + "a" * 151, SegmentCount("GSM-7", 306, 2)),
        ("a" * 304 + "€", SegmentCount("GSM-7", 306, 2)),
        ("a" * 305 + "€", SegmentCount("GSM-7", 307, 3)),
        ("€" * 153, SegmentCount("GSM-7", 306, 3)),  # 76 per part (152 septets), not 76.5
        # UCS-2 single segment and its boundaries
        (CYRILLIC, SegmentCount("UCS-2", 1, 1)),
        (CYRILLIC * 70, SegmentCount("UCS-2", 70, 1)),
        (CYRILLIC * 71, SegmentCount("UCS-2", 71, 2)),
        (CYRILLIC * 67 * 2, SegmentCount("UCS-2", 134, 2)),
        (CYRILLIC * (67 * 2 + 1), SegmentCount("UCS-2", 135, 3)),
        (CYRILLIC * 1600, SegmentCount("UCS-2", 1600, math.ceil(1600 / 67))),
        # one non-GSM character turns the whole body into UCS-2
        ("a" * 69 + CYRILLIC, SegmentCount("UCS-2", 70, 1)),
        ("a" * 70 + CYRILLIC, SegmentCount("UCS-2", 71, 2)),
        ("€" * 69 + CYRILLIC, SegmentCount("UCS-2", 70, 1)),  # € is one unit in UCS-2
        # characters outside the BMP cost two units, and a pair is never split
        (EMOJI, SegmentCount("UCS-2", 2, 1)),
        (EMOJI * 35, SegmentCount("UCS-2", 70, 1)),
        (CYRILLIC * 69 + EMOJI, SegmentCount("UCS-2", 71, 2)),
        (EMOJI * 36, SegmentCount("UCS-2", 72, 2)),
        (CYRILLIC * 66 + EMOJI + CYRILLIC * 66, SegmentCount("UCS-2", 134, 3)),
        (CYRILLIC * 65 + EMOJI + CYRILLIC * 67, SegmentCount("UCS-2", 134, 2)),
        (EMOJI * 67, SegmentCount("UCS-2", 134, 3)),  # 33 pairs per part (66 units)
    ],
    ids=lambda value: None if isinstance(value, str) else f"{value.encoding}-{value.segments}",
)
def test_segments_at_boundaries(body: str, expected: SegmentCount) -> None:
    assert segments_of(body) == expected


@pytest.mark.parametrize("char", sorted(GSM7_EXTENSION))
def test_each_extension_character_costs_two_septets(char: str) -> None:
    assert segments_of(char) == SegmentCount("GSM-7", 2, 1)
    assert segments_of(char * 80).segments == 1
    assert segments_of(char * 81).segments == 2


@pytest.mark.parametrize("char", ["\x1b", "ç", "`", "á", "\u0308", "\u00a0", "’", "“"])
def test_characters_outside_gsm7_force_ucs2(char: str) -> None:
    assert segments_of("hello " + char).encoding == "UCS-2"


def test_the_basic_alphabet_has_its_128_characters_minus_escape() -> None:
    assert len(GSM7_BASIC) == 127
    assert segments_of("".join(sorted(GSM7_BASIC))) == SegmentCount("GSM-7", 127, 1)


def test_cost_is_one_for_mms_and_segments_for_sms() -> None:
    long_body = "a" * 161
    assert cost_of(long_body, has_media=False) == 2
    assert cost_of(long_body, has_media=True) == 1
    assert cost_of(CYRILLIC * 200, has_media=False) == 3
    assert cost_of("", has_media=True) == 1


@given(st.text(alphabet=sorted(GSM7_BASIC), max_size=1600))
def test_plain_gsm7_matches_the_closed_formula(body: str) -> None:
    n = len(body)
    assert segments_of(body) == SegmentCount("GSM-7", n, 1 if n <= 160 else math.ceil(n / 153))


@given(st.integers(min_value=0, max_value=1600))
def test_the_shortcut_for_basic_gsm7_agrees_with_the_general_count(characters: int) -> None:
    general = _count("GSM-7", [1] * characters, 7)
    assert _basic_gsm7_segments(characters) == general.segments


@given(st.text(max_size=400), st.characters())
def test_appending_never_lowers_the_count(body: str, char: str) -> None:
    before, after = segments_of(body), segments_of(body + char)
    if before.encoding == after.encoding:
        assert after.segments >= before.segments
        assert after.units > before.units
