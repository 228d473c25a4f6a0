"""The render pipeline: every accepted job is checked, batched, rendered and finished.

Threads, and what each one does:
- a check pool looks every new request up in the object store: an image that an earlier
  attempt stored (and crashed before committing) is published again without rendering. It
  reads and checks an edit's input image and mask (`imagegen.consumers.inputs`), so that a
  bad one fails there, before it waits for the device. It also reads what worker processes
  that died rendering the request left (`imagegen.consumers.crashes`): such a request
  renders alone, and fails without rendering once too many died rendering it alone.
- the render thread batches compatible requests, interactive ones first, and runs the
  pipeline, holding a crash mark per request meanwhile, and nothing else, so the device
  waits only for batching. A batch that runs out of memory is split in halves, down to
  single requests, before any fails; one that fails otherwise is rendered again one request
  at a time.
- a finish pool encodes, stores and publishes every rendered image.

No device time goes to a request whose user has left (`imagegen.consumers.lifecycle`). At
the front of the queue, a canceled job ends `canceled` and one past its deadline `expired`,
neither rendered. While a batch renders, its members' cancellations are looked up after
every denoising step; a canceled member stops the whole call at that step (diffusers cannot
drop one member from a running batch), is answered `canceled` with the steps it had done,
and the rest render again at once, as one batch without it, with no wait in the queue and
no deadline check (their render had started). That spends the stopped render's steps again
on the rest: at most one batch's render per cancellation, where rendering the canceled
member to the end would spend its share of every remaining step. A canceled job is never
retried nor dead-lettered: it did not fail.

Each job's `device_ms` is its share (render time / batch size) of every render it took part
in, the stopped ones included, also counted in `imagegen_device_seconds_total{model}`.

While the object store is unreachable, every lookup and write retries, sharing one outage
clock, until the outage has lasted `IMAGEGEN_OUTAGE_BUDGET_S` (`imagegen.consumers.retry`);
the jobs they hold fill the worker's in-flight limit, which pauses its partitions.

From its check until its result is sent, a job holds the claim on its object key
(`imagegen.consumers.claims`). The work of each job runs inside its log context, and no
exception vanishes into a pool's future (`_guarded`): a failure of the work becomes a failed
result and a dead letter (`imagegen.consumers.outcomes`), and a failure to say so stops the
worker as a crashed thread does, leaving the job's offset unfinished.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from typing import Any

from PIL import Image

from imagegen.consumers.batching import Batcher
from imagegen.consumers.claims import Claims
from imagegen.consumers.crashes import CrashLedger, RenderKilledWorkers
from imagegen.consumers.inputs import InvalidInputImage, load_inputs
from imagegen.consumers.jobs import Job, now_ms
from imagegen.consumers.lifecycle import CanceledMidRender, Lifecycle, Where
from imagegen.consumers.models import UnknownModel
from imagegen.consumers.outcomes import Outcomes
from imagegen.consumers.priority import rank
from imagegen.consumers.rendering import (
    Renderer,
    RenderOutOfMemory,
    RenderStopped,
    batch_key,
    encode_image,
)
from imagegen.consumers.retry import GaveUp, Interrupted, Outage, RetryPolicy, retrying
from imagegen.consumers.storage import StoredImage, find, object_key, store_once
from imagegen.consumers.threads import vital_thread
from imagegen.infra.logs import log_context
from imagegen.infra.metrics import (
    DEVICE_SECONDS,
    ENCODE_SECONDS,
    RENDER_BATCH_SIZE,
    RENDER_SECONDS,
    UPLOAD_SECONDS,
    observe_gpu_memory,
)
from imagegen.infra.object_store import ObjectStore
from imagegen.schemas import Stage, Status

log = logging.getLogger(__name__)


class RenderPipeline:
    def __init__(
        self,
        renderers: Mapping[str, Renderer],
        store: ObjectStore,
        crashes: CrashLedger,
        outcomes: Outcomes,
        policy: RetryPolicy,
        *,
        max_batch: int,
        max_wait_s: float,
        check_threads: int,
        finish_threads: int,
        stopping: threading.Event,
        is_current: Callable[[Job], bool],
        lifecycle: Lifecycle,
    ) -> None:
        """`renderers` maps the model names that requests use to what renders them.
        `stopping` is set when the worker stops: retries give up, and jobs are released
        unfinished. `is_current` tells whether a job's partition is still assigned.
        `lifecycle` tells which jobs to end early, and whom to tell of their progress."""
        self._renderers = dict(renderers)
        self._store = store
        self._crashes = crashes
        self._outcomes = outcomes
        self._policy = policy
        self._store_outage = Outage()
        self._stopping = stopping
        self._is_current = is_current
        self._lifecycle = lifecycle
        self._claims: Claims[Job] = Claims(lambda job: object_key(job.request))
        self._batcher: Batcher[Job] = Batcher(_batch_key, max_batch, max_wait_s, _rank)
        self._checks = ThreadPoolExecutor(check_threads, "check")
        self._finishers = ThreadPoolExecutor(finish_threads, "finish")
        self._stop_rendering = threading.Event()
        self._render_thread: threading.Thread | None = None
        self._on_crash: Callable[[], None] = lambda: None

    def start(self, on_crash: Callable[[], None]) -> None:
        """Start the render thread; `on_crash` runs, inside an `except` block, in the render
        thread should it ever crash, and in a pool's thread whose job could not end."""
        self._on_crash = on_crash
        self._render_thread = vital_thread("render", self._render_loop, on_crash)
        self._render_thread.start()

    def submit(self, job: Job) -> None:
        self._checks.submit(self._guarded, job, Stage.STORE, self._check, job)

    def stop_rendering(self) -> None:
        self._stop_rendering.set()

    def queued(self, rank: int) -> int:
        """Jobs of `rank` waiting for the render thread; any thread may ask."""
        return self._batcher.waiting(rank)

    def drain(self) -> list[Job]:
        """Finish what is rendering and being stored; return the queued jobs, released.
        Call it once `stopping` is set, so that no waiting job is submitted again."""
        self._checks.shutdown(wait=True)
        self._stop_rendering.set()
        if self._render_thread is not None:
            self._render_thread.join()
        released = self._batcher.drain()
        self._finishers.shutdown(wait=True)
        return released

    # ---- checks (check pool) -------------------------------------------------------------

    def _check(self, job: Job) -> None:
        if job.request.model not in self._renderers:
            raise UnknownModel(
                f"model {job.request.model!r} is not served by this worker, which serves: "
                f"{', '.join(self._renderers)}; start workers with --model {job.request.model}"
            )
        if not self._claims.claim(job):
            return
        key = object_key(job.request)
        stored, _ = retrying(
            self._policy,
            f"look up {key}",
            lambda: find(self._store, key),
            self._stopping,
            stage=Stage.STORE.value,
            outage=self._store_outage,
        )
        if stored is None:
            self._check_crashes(job)
            if job.request.task != "generate":
                job.inputs = load_inputs(self._store, job.request, self._read_input)
            self._batcher.put(job)
        else:
            log.info("%s was stored by an earlier attempt; publishing it", key)
            self._crashes.forget(job.record)
            self._succeeded(job, stored, attempts=1, batch_size=None)

    def _read_input(self, read: Callable[[], bytes | None]) -> bytes | None:
        """A read of an edit's input, retried through a store outage like every other."""
        data, _ = retrying(
            self._policy,
            "read an input image",
            read,
            self._stopping,
            stage=Stage.STORE.value,
            outage=self._store_outage,
        )
        return data

    def _check_crashes(self, job: Job) -> None:
        """Note what processes that died rendering the job left; give up on it, as a poison
        request that would kill every worker it reaches, once too many died rendering it
        alone."""
        job.crashes = self._crashes.crashes(job.record)
        if job.crashes.alone >= self._policy.max_attempts:
            raise GaveUp(
                RenderKilledWorkers(
                    f"{job.crashes.alone} worker process(es) died while rendering this request "
                    "alone (killed for memory, or a crash in native code), so it is not "
                    "rendered again. Find the cause in the worker logs and metrics (its size, "
                    "steps, model), then replay it from the DLQ with more memory or smaller "
                    "settings"
                ),
                job.crashes.alone,
            )
        if job.crashes.suspect:
            log.warning(
                "a worker process died while rendering %s; rendering it alone (%d of %d "
                "deaths alone before it fails)",
                job.request.request_id,
                job.crashes.alone,
                self._policy.max_attempts,
            )

    # ---- rendering (render thread) -------------------------------------------------------

    def _render_loop(self) -> None:
        while not self._stop_rendering.is_set():
            batch = [job for job in self._batcher.next_batch(0.1) if self._renders(job)]
            if batch:
                self._render(batch)

    def _renders(self, job: Job) -> bool:
        """Whether a job at the front of the queue renders; one that does not is ended."""
        if not self._is_current(job):
            self._release(job)  # polled before a rebalance: its partition's owner redoes it
            return False
        ending = self._lifecycle.ends_in_queue(job)
        if ending is None:
            return True
        status, detail = ending
        self._guarded(job, Stage.RENDER, self._end_early, job, status, "queue", detail)
        return False

    def _render(self, batch: list[Job]) -> None:
        context: AbstractContextManager[None]
        if len(batch) == 1:
            context = batch[0].log_context()
        else:
            context = log_context(request_ids=[job.request.request_id for job in batch])
        with context:
            again = self._render_batch(batch)
        for smaller in again:
            self._render(smaller)

    def _render_batch(self, batch: list[Job]) -> list[list[Job]]:
        """Render `batch` and hand its images to the finishers; return the smaller batches to
        render instead, when a batch of several fails as a whole."""
        first = batch[0].request
        renderer = self._renderers[first.model]
        log.debug(
            "rendering %d request(s) with %s: %dx%d, %d steps",
            len(batch),
            first.model,
            first.width,
            first.height,
            first.steps,
        )
        self._lifecycle.started(batch, now_ms())
        started = time.perf_counter()
        try:
            with self._crashes.rendering([(job.record, job.crashes) for job in batch]):
                images, attempts = self._render_once(renderer, batch)
        except CanceledMidRender as stopped:
            return self._stopped(batch, stopped, time.perf_counter() - started)
        except Interrupted:
            for job in batch:  # uncommitted: the partition's next owner renders them
                self._release(job)
            return []
        except GaveUp as gave_up:  # a single request
            self._fail(batch[0], gave_up.error, Stage.RENDER, gave_up.attempts)
            return []
        except RenderOutOfMemory as error:  # several requests: halves may fit
            half = len(batch) // 2
            log.warning("%s; splitting it into %d and %d", error, half, len(batch) - half)
            return [batch[:half], batch[half:]]
        except Exception:  # several requests: one bad request must not fail the others
            log.warning("a batch of %d failed; rendering them one by one", len(batch))
            return [[job] for job in batch]
        finally:
            observe_gpu_memory(renderer.device)
        render_s = time.perf_counter() - started
        RENDER_SECONDS.observe(render_s)
        RENDER_BATCH_SIZE.observe(len(batch))
        _meter(batch, render_s)
        render_ms = render_s * 1000
        for job, image in zip(batch, images, strict=True):
            job.span.set_attribute("imagegen.batch_size", len(batch))
            job.timings["render_ms"] = render_ms
            self._finishers.submit(
                self._guarded, job, Stage.STORE, self._finish, job, image, len(batch), attempts
            )
        return []

    def _render_once(self, renderer: Renderer, batch: list[Job]) -> tuple[list[Image.Image], int]:
        """The images of `batch` and the attempts they took. A batch of several is tried
        once (it fails into smaller ones); a single request retries in place: out of
        memory, its next attempt finds the memory the failed one held handed back. A
        stopped render raises its `RenderStopped`, never retried."""
        requests = [job.request for job in batch]
        inputs = [job.inputs for job in batch if job.inputs is not None] or None
        on_step = self._lifecycle.watch(batch)
        if len(batch) > 1:
            return renderer.render(requests, on_step, inputs), 1
        try:
            return retrying(
                self._policy,
                "render",
                lambda: renderer.render(requests, on_step, inputs),
                self._stopping,
                stage=Stage.RENDER.value,
            )
        except GaveUp as gave_up:
            if isinstance(gave_up.error, RenderStopped):
                raise gave_up.error from None
            raise

    def _stopped(
        self, batch: list[Job], stopped: CanceledMidRender, render_s: float
    ) -> list[list[Job]]:
        """End the canceled members of a stopped render; return the rest, to render again."""
        _meter(batch, render_s)
        detail = f"canceled by its user after {stopped.step} of {stopped.steps} steps"
        for job in stopped.jobs:
            self._guarded(
                job, Stage.RENDER, self._end_early, job, Status.CANCELED, "render", detail
            )
        canceled = {id(job) for job in stopped.jobs}
        rest = [job for job in batch if id(job) not in canceled]
        if rest:
            log.info("rendering the other %d request(s) of the batch again", len(rest))
        return [rest] if rest else []

    # ---- finishing (finish pool) ---------------------------------------------------------

    def _finish(self, job: Job, image: Image.Image, batch_size: int, attempts: int) -> None:
        started = time.perf_counter()
        data, content_type = encode_image(image, job.request.output_format)
        encoded = time.perf_counter()
        key = object_key(job.request)
        stored, store_attempts = retrying(
            self._policy,
            f"store {key}",
            lambda: store_once(self._store, key, data, content_type),
            self._stopping,
            stage=Stage.STORE.value,
            outage=self._store_outage,
        )
        uploaded = time.perf_counter()
        ENCODE_SECONDS.observe(encoded - started)
        UPLOAD_SECONDS.observe(uploaded - encoded)
        job.timings["encode_ms"] = (encoded - started) * 1000
        job.timings["upload_ms"] = (uploaded - encoded) * 1000
        self._succeeded(job, stored, max(attempts, store_attempts), batch_size)

    # ---- every job's end -----------------------------------------------------------------

    def _guarded(self, job: Job, stage: Stage, work: Callable[..., None], *args: Any) -> None:
        """Run pool work so that no exception vanishes into a future: a failure of the work
        becomes a failed result and a dead letter; a failure to end the job so stops the
        worker (its offset stays unfinished, for the next worker to read again)."""
        with job.log_context():
            try:
                self._run_or_fail(job, stage, work, *args)
            except BaseException:
                self._on_crash()

    def _run_or_fail(self, job: Job, stage: Stage, work: Callable[..., None], *args: Any) -> None:
        try:
            work(*args)
        except Interrupted:
            log.info("released %s unfinished: the worker is stopping", job.request.request_id)
            self._release(job)
        except GaveUp as gave_up:
            self._fail(job, gave_up.error, _stage_of(gave_up.error, stage), gave_up.attempts)
        except Exception as error:
            self._fail(job, error, _stage_of(error, stage), 1)

    def _succeeded(
        self, job: Job, stored: StoredImage, attempts: int, batch_size: int | None
    ) -> None:
        self._outcomes.succeeded(job, stored, attempts, batch_size)
        self._release(job)

    def _fail(self, job: Job, error: BaseException, stage: Stage, attempts: int) -> None:
        self._outcomes.failed(job, error, stage, attempts)
        self._release(job)

    def _end_early(self, job: Job, status: Status, where: Where, detail: str) -> None:
        self._outcomes.ended_early(job, status, where, detail)
        self._release(job)

    def _release(self, job: Job) -> None:
        """The job is done with its key: jobs waiting for it are checked again (and find the
        stored image, unless this job failed)."""
        job.span.end()
        for waiter in self._claims.release(job):
            if not self._stopping.is_set():  # when stopping, they stay uncommitted
                self.submit(waiter)


def _batch_key(job: Job) -> Hashable | None:
    # A request that a worker died rendering renders alone (None): it may kill the next one
    # too, and must take no company with it. Interactive and batch work never share a
    # forward pass, so batch work never slows an interactive render.
    return None if job.crashes.suspect else (_rank(job), batch_key(job.request))


def _rank(job: Job) -> int:
    return rank(job.polled.topic)


def _meter(batch: list[Job], render_s: float) -> None:
    """Give each job of a render its share of the render's device time."""
    share_s = render_s / len(batch)
    for job in batch:
        job.device_ms = (job.device_ms or 0.0) + share_s * 1000
        DEVICE_SECONDS.labels(job.request.model).inc(share_s)


def _stage_of(error: BaseException, default: Stage) -> Stage:
    if isinstance(error, InvalidInputImage):
        return Stage.VALIDATE
    return Stage.RENDER if isinstance(error, UnknownModel | RenderKilledWorkers) else default
