"""Webhooks: the deliverer (`imagegen webhooks`) and, for receivers, `verify`.

A receiver needs only this package's signature module, which imports nothing but the
standard library (`pip install imagegen-pipeline`, or copy `signatures.py`). Verify the raw
body before parsing it, and answer anything that fails with a 4xx:

    from imagegen.webhooks import WebhookVerificationError, verify

    SECRET = os.environ["IMAGEGEN_WEBHOOK_SECRET"]  # `imagegen keys webhook-secret --user U`

    @app.post("/imagegen")
    async def imagegen_webhook(request: Request) -> Response:
        try:
            job = verify(await request.body(), request.headers, SECRET)
        except WebhookVerificationError as refused:
            return Response(str(refused), status_code=400)
        handle(job)  # at least once: the same `webhook-id` may come again; drop repeats
        return Response(status_code=204)

Importing this package imports only the signature module: the deliverer's modules
(`imagegen.webhooks.service` and the rest) are imported by name where they are run.
"""

from imagegen.webhooks.signatures import (
    WebhookVerificationError,
    sign,
    signed_headers,
    verify,
)

__all__ = ["WebhookVerificationError", "sign", "signed_headers", "verify"]
