"""What `smsq retry` and `smsq cancel` print: the ids acted on, and those left as they were."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence


def left_over(wanted: Sequence[uuid.UUID], done: Sequence[uuid.UUID]) -> list[uuid.UUID]:
    """The ids asked for that were not acted on, in the order given."""
    done_ids = set(done)
    return [i for i in wanted if i not in done_ids]


def print_outcome(done: Sequence[uuid.UUID], refused: dict[uuid.UUID, str], *, as_json: bool,
                  json_keys: tuple[str, str], done_text: str, refused_text: str) -> int:
    """Print both lists (each refused id with its status); exit status 1 if any was refused."""
    if as_json:
        print(json.dumps({json_keys[0]: [str(i) for i in done],
                          json_keys[1]: [str(i) for i in refused]}))
    else:
        print(f"{len(done)} notification(s) {done_text}")
        for notification_id in done:
            print(f"  {notification_id}")
        if refused:
            print(f"{len(refused)} {refused_text}")
            for notification_id, status in refused.items():
                print(f"  {notification_id}  {status}")
    return 1 if refused else 0
