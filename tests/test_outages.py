"""A render worker rides out an outage of the object store: partitions paused, polling on,
retrying with backoff for up to `IMAGEGEN_OUTAGE_BUDGET_S`, and no request fails. The
outage is real: the worker reaches the store through a TCP proxy that the test cuts."""

from __future__ import annotations

import time

from imagegen.infra.settings import Settings
from imagegen.schemas import Status
from tests import test_worker
from tests.helpers import results_for
from tests.proxy import Proxy
from tests.test_worker import small_requests, submit, wait_for_line, wait_for_results

OUTAGE_S = 20

worker_factory = test_worker.worker_factory  # the fixture, shared


def test_a_20s_store_outage_mid_stream_fails_no_request(
    worker_factory, isolated_stack: Settings
) -> None:
    host, port = isolated_stack.s3_endpoint.rsplit(":", 1)
    proxy = Proxy(host, int(port))
    through_proxy = isolated_stack.model_copy(update={"s3_endpoint": proxy.address})
    before, during, after = small_requests(10), small_requests(40), small_requests(10)
    try:
        # One attempt for anything else: only the outage budget can carry a request through.
        worker = worker_factory(
            "--log-level", "debug", stack=through_proxy, max_attempts="1", outage_budget_s="300"
        )
        submit(isolated_stack, before)
        wait_for_results(isolated_stack, 5)  # mid-stream
        proxy.cut()
        cut_at = time.monotonic()
        submit(isolated_stack, during)  # more than the in-flight limit: the worker pauses
        wait_for_line(worker.log, "IMAGEGEN_OUTAGE_BUDGET_S")
        wait_for_line(worker.log, "pausing imagegen.render:")  # back-pressure
        time.sleep(max(0.0, cut_at + OUTAGE_S - time.monotonic()))  # the outage's length
        worker.assert_running()
        proxy.restore()
        submit(isolated_stack, after)
        everything = {r.request_id for r in [*before, *during, *after]}
        found = results_for(isolated_stack, everything, timeout_s=300)
    finally:
        proxy.close()
    worker.assert_running()
    failed = [r for answers in found.values() for r in answers if r.status is not Status.SUCCEEDED]
    assert failed == []
    assert "retrying in" in worker.log.read_text()
