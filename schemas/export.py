"""Write the JSON Schema files of the wire contract: `python -m imagegen.schemas.export`."""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from imagegen.schemas.api_keys import ApiKeyRecord
from imagegen.schemas.cancellations import CancelRequest
from imagegen.schemas.codec import MAX_MESSAGE_BYTES
from imagegen.schemas.events import JobEvent
from imagegen.schemas.requests import GenerationRequest
from imagegen.schemas.results import GenerationResult
from imagegen.schemas.webhook_deliveries import WebhookDelivery

JSON_DIR = Path(__file__).parent / "json"
CONTRACTS: dict[str, type[BaseModel]] = {
    "generation_request.v1.json": GenerationRequest,
    "generation_result.v1.json": GenerationResult,
    "job_event.v1.json": JobEvent,
    "cancel_request.v1.json": CancelRequest,
    "api_key.v1.json": ApiKeyRecord,
    "webhook_delivery.v1.json": WebhookDelivery,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema(mode="serialization")
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    # The one rule a schema cannot state. Every valid document fits well inside it, unless
    # padded with whitespace or escapes.
    schema["$comment"] = (
        f"Readers also refuse any message over {MAX_MESSAGE_BYTES} bytes, whatever it holds."
    )
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def main() -> None:
    for filename, model in CONTRACTS.items():
        (JSON_DIR / filename).write_text(render(model))
        print(f"wrote {JSON_DIR / filename}")


if __name__ == "__main__":
    main()
