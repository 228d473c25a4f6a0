"""Wire contracts, version 1: what travels on the `imagegen.*` topics.

JSON Schema files generated from these models live in `schemas/json/` (`make schemas`).
"""

from imagegen.schemas.api_keys import ApiKeyRecord, hash_key, key_id_of, mint_key
from imagegen.schemas.cancellations import CancelRequest
from imagegen.schemas.codec import MAX_MESSAGE_BYTES, build, decode, encode
from imagegen.schemas.dead_letters import DeadLetter, Stage
from imagegen.schemas.events import EventType, JobEvent
from imagegen.schemas.fields import SCHEMA_VERSION, new_request_id
from imagegen.schemas.requests import GenerationRequest, OutputFormat, Priority
from imagegen.schemas.results import GenerationResult, Reason, Status, Timings
from imagegen.schemas.webhook_secrets import WebhookSecretRecord, mint_secret

__all__ = [
    "MAX_MESSAGE_BYTES",
    "SCHEMA_VERSION",
    "ApiKeyRecord",
    "CancelRequest",
    "DeadLetter",
    "EventType",
    "GenerationRequest",
    "GenerationResult",
    "JobEvent",
    "OutputFormat",
    "Priority",
    "Reason",
    "Stage",
    "Status",
    "Timings",
    "WebhookSecretRecord",
    "build",
    "decode",
    "encode",
    "hash_key",
    "key_id_of",
    "mint_key",
    "mint_secret",
    "new_request_id",
]
