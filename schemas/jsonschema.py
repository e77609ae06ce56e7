"""Generate `notification.schema.json`, the contract for producers in other languages.

    python -m schemas.jsonschema          # rewrite the committed file
    python -m schemas.jsonschema --check  # exit 1 when the file and the models disagree
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from schemas.message import Notification

SCHEMA_PATH = Path(__file__).with_name("notification.schema.json")


def render() -> str:
    schema = Notification.model_json_schema(mode="validation")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://smsq.dev/schemas/notification.schema.json"
    schema["description"] = (
        "One SMS notification published to the 'notifications' exchange with routing key 'sms'. "
        "Phone numbers are checked further than a JSON Schema can (validity per country)."
    )
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main(argv: list[str]) -> int:
    if "--check" in argv:
        if SCHEMA_PATH.read_text() != render():
            print(f"{SCHEMA_PATH} is stale: run python -m schemas.jsonschema", file=sys.stderr)
            return 1
        return 0
    SCHEMA_PATH.write_text(render())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
