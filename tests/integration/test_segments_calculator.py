"""segments_of agrees with Twilio's own segment calculator on thousands of generated bodies.

The calculator is the npm package `sms-segments-calculator`, at the exact version
./scripts/test.sh installs into .cache/node (scripts/lib.sh, ensure_node_tools), run by
the machine's Node.js: one process reads every body as JSON on its standard input. Without
Node.js or the package the test fails (it is never skipped): run ./scripts/test.sh once.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess

import pytest

from consumer.segments import GSM7_BASIC, GSM7_EXTENSION, segments_of
from tests.support import ROOT

CALCULATOR = ROOT / ".cache" / "node" / "node_modules" / "sms-segments-calculator"

# Reads a JSON array of bodies, writes [encoding, units, segments] for each, as SegmentCount.
COUNT_ALL = """
const { SegmentedMessage } = require(process.argv[1]);
let input = '';
process.stdin.on('data', (chunk) => { input += chunk; });
process.stdin.on('end', () => {
  const counts = JSON.parse(input).map((body) => {
    const message = new SegmentedMessage(body);
    const bits = message.encodingName === 'GSM-7' ? 7 : 16;
    return [message.encodingName, message.messageSize / bits, message.segmentsCount];
  });
  process.stdout.write(JSON.stringify(counts));
});
"""

SKIN_TONES = [chr(code) for code in range(0x1F3FB, 0x1F400)]
ZWJ = "\u200d"
CLUSTERS = [
    "😀", "👍", "🎉", "❤️", "☺", "✌️",  # emoji, some with a variation selector
    "👍🏽", "👋🏿", "🧑🏻",  # skin tones
    "👩‍💻", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏽‍💻", "👁️‍🗨️", "👩‍❤️‍💋‍👨",  # joined by ZWJ
    "🇺🇸", "🇫🇷", "🇯🇵", "🇩🇪",  # flags: regional indicator pairs
    "1️⃣", "#️⃣", "*️⃣",  # keycaps
    "é", "ñ", "e\u0301", "a\u0308\u0323",  # precomposed (GSM or not) and combining marks
    "ж", "中", "ё", "ç", "’", "—", "\u00a0",  # UCS-2 in the BMP
    "𝄞", "𠀀",  # outside the BMP, not emoji
    "\r\n", "\r", "\n",
    "✌️🏽", "🇺🇸🏽", "a🏽",  # a skin tone after what takes none: the calculator cuts before it
]
GSM_BASIC = sorted(GSM7_BASIC)
GSM_EXTENSION = sorted(GSM7_EXTENSION)


def a_body(rng: random.Random) -> str:
    """A body of one kind: GSM-7 only, GSM-7 with extension characters, or mixed with
    clusters; long ones cross part boundaries (153 / 67 per part) anywhere."""
    length = rng.choice([rng.randint(1, 80), rng.randint(60, 240), rng.randint(120, 1600)])
    kind = rng.random()
    pieces = []
    for _ in range(length):
        draw = rng.random()
        if kind < 0.25 or draw < 0.6:
            pieces.append(rng.choice(GSM_BASIC))
        elif kind < 0.45 or draw < 0.75:
            pieces.append(rng.choice(GSM_EXTENSION))
        elif draw < 0.85:
            pieces.append(rng.choice(CLUSTERS))
        elif draw < 0.92:
            pieces.append(rng.choice(["👍", "👋", "🧑", "👩"]) + rng.choice(SKIN_TONES))
        else:
            pieces.append(ZWJ.join(rng.choice(["👩", "👨", "👧", "👦", "❤️"])
                                   for _ in range(rng.randint(2, 4))))
    return "".join(pieces)[:1600]


def calculator_counts(bodies: list[str]) -> list[tuple[str, int, int]]:
    node = shutil.which("node")
    if node is None or not CALCULATOR.is_dir():
        pytest.fail("Node.js and sms-segments-calculator are needed in .cache/node: "
                    "run ./scripts/test.sh (scripts/lib.sh, ensure_node_tools)", pytrace=False)
    result = subprocess.run([node, "-e", COUNT_ALL, str(CALCULATOR)], input=json.dumps(bodies),
                            capture_output=True, text=True, check=True, timeout=300)
    return [tuple(count) for count in json.loads(result.stdout)]


def test_segments_agree_with_twilios_calculator_on_generated_bodies():
    rng = random.Random(20261124)
    bodies = [a_body(rng) for _ in range(5000)]
    theirs = calculator_counts(bodies)
    ours = [tuple(vars(segments_of(body)).values()) for body in bodies]
    disagreements = [(body, mine, twilio) for body, mine, twilio in zip(bodies, ours, theirs)
                     if mine != twilio]
    assert not disagreements, (len(disagreements), disagreements[:3])
    # The bodies did reach what they are for: both encodings, many parts.
    assert {count[0] for count in theirs} == {"GSM-7", "UCS-2"}
    assert max(count[1] for count in theirs) >= 20


@pytest.mark.parametrize("body", [
    pytest.param("a" * 66 + "👍🏽", id="skin tone across the first boundary"),
    pytest.param("a" * 130 + "👨‍👩‍👧‍👦", id="family of 11 units across the second"),
    pytest.param("ж" * 65 + "🇺🇸" * 3, id="flags"),
    pytest.param("ж" * 66 + "1️⃣", id="keycap"),
    pytest.param("a" * 152 + "\r\n" + "a" * 10, id="CRLF as two characters"),
    pytest.param("ж" * 60 + "e" + "\u0301" * 200, id="one cluster larger than a part"),
])
def test_clusters_at_part_boundaries_agree_with_twilios_calculator(body):
    [theirs] = calculator_counts([body])
    assert tuple(vars(segments_of(body)).values()) == theirs
