"""The addresses of the wire contract: topic names and the consumer groups that read them.

Topic names are a public contract. Group ids are too: operators watch their lag, and the
processor's id also names the changelog topics faust keeps its tables in. Partition counts
and retention are deployment choices and live with the code that creates the topics
(`imagegen.infra.topics`).
"""

REQUESTS = "imagegen.requests"
RENDER = "imagegen.render"
RESULTS = "imagegen.results"
DLQ = "imagegen.dlq"
#: Admitted `batch` requests: workers read it only while `RENDER` has nothing waiting.
RENDER_BATCH = "imagegen.render.batch"
#: `JobEvent`s, keyed by request_id.
EVENTS = "imagegen.events"
#: `CancelRequest`s, keyed by request_id; compacted.
CANCELLATIONS = "imagegen.cancellations"

#: `ApiKeyRecord`s of the HTTP gateway, keyed by key_id; compacted. Only operators write it.
API_KEYS = "imagegen.api-keys"

#: `WebhookSecretRecord`s, keyed by user_id; compacted. Only operators write it.
WEBHOOK_SECRETS = "imagegen.webhook-secrets"
#: Webhook deliveries waiting for their next attempt, one topic per delay: a record waits
#: in the topic of its delay, so each topic's oldest record is always the first one due.
WEBHOOK_RETRIES = tuple(f"imagegen.webhooks.retry.{tier}" for tier in range(1, 5))

#: The faust app id of the processor; it reads `REQUESTS`.
PROCESSOR_GROUP = "imagegen-processor"
#: The render workers' groups, one per render topic: every worker is a member of both.
#: One group for both topics would balance the sum of a worker's partitions, not each
#: topic's (measured: a second worker took every `RENDER` partition and left the first only
#: `RENDER_BATCH` ones); and two members of one process in one group can keep failing each
#: other's join on Tansu (measured: no assignment in 90 s on a busy 2-core host).
WORKER_GROUP = "imagegen-workers"  # reads RENDER
BATCH_WORKER_GROUP = "imagegen-workers-batch"  # reads RENDER_BATCH
WORKER_GROUPS = {RENDER: WORKER_GROUP, RENDER_BATCH: BATCH_WORKER_GROUP}
#: The gateways' group that indexes results into the job store; it reads `RESULTS`.
JOB_INDEX_GROUP = "imagegen-job-index"
#: The webhook deliverers' group; it reads `EVENTS` and `WEBHOOK_RETRIES`.
WEBHOOK_GROUP = "imagegen-webhooks"
