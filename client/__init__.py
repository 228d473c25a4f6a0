"""The HTTP API's client: `Client` (blocking) and `AsyncClient` (asyncio), on httpx.

```python
from imagegen.client import Client

with Client() as client:  # IMAGEGEN_GATEWAY_URL and IMAGEGEN_API_KEY, or pass them
    job = client.generate("a lighthouse at dusk", idempotency_key="order-42", wait_s=30)
    png = client.download(job.id)
```

Errors are `ApiError`s, one subclass per kind of answer (`errors`), so that a caller
catches `RateLimited` and reads `retry_after_s` instead of parsing a body. The client
imports nothing of the pipeline: a service that only calls the API needs httpx and pydantic.
"""

from imagegen.client.asynchronous import AsyncClient
from imagegen.client.errors import (
    ApiError,
    ClientConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    Overloaded,
    RateLimited,
    Unauthorized,
    Unavailable,
)
from imagegen.client.models import Job, JobPage, ServerEvent
from imagegen.client.sync import Client

__all__ = [
    "ApiError",
    "AsyncClient",
    "Client",
    "ClientConfigError",
    "Conflict",
    "InvalidRequest",
    "Job",
    "JobPage",
    "NotFound",
    "Overloaded",
    "RateLimited",
    "ServerEvent",
    "Unauthorized",
    "Unavailable",
]
