"""Render benchmark: images per second of the render worker beside a bare diffusers loop.

Both use the same model, batch, size and steps.

For each batch size of the sweep (run `rounds` times; each batch size reports the round
with its median ratio), one after another so that all see the same background load:
- bare: `Renderer.render` on batches of requests, after a warm-up batch, then
  `encode_image` on every image; reported as render only and as render+encode, the
  worker's real work and the ratio's denominator. It runs before the worker and again
  after it, and the two are averaged: a shared CPU's speed drifts over minutes, and
  bracketing the worker cancels a steady drift.
- worker: `imagegen worker` on a fresh private embedded stack consumes a preloaded backlog
  of compatible requests (whole batches) from `imagegen.render`, renders, encodes, stores
  and publishes; the clock runs between the first and the last result's `completed_at`, so
  model loading and the group join are excluded. A run stops measuring `worker_s` after its
  first result even with requests left, and the worker is stopped with SIGTERM.

Then the edit sweep, the same way for each strength and batch size of it: requests of task
`edit` on one input image (uploaded for each user on the worker's stack), beside the bare
loop calling `Renderer.render` with the same image, size, steps and strength, which runs
diffusers' image-to-image pipeline.

Run: `python -m bench.render [--quick] [--gpu] [--batch-sizes 1,2,4,8] [--requests N]`.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, astuple, dataclass, replace
from functools import cache
from pathlib import Path
from statistics import fmean

import torch
from confluent_kafka import OFFSET_BEGINNING, TopicPartition
from PIL import Image

from bench.command import overridden, positive, run_alone
from bench.stack import child_env, private_stack
from imagegen.cli.children import imagegen_child
from imagegen.consumers.devices import resolve_device, resolve_dtype
from imagegen.consumers.inputs import EditInputs
from imagegen.consumers.models import load_pipeline
from imagegen.consumers.rendering import Renderer, encode_image
from imagegen.infra.kafka import make_consumer, make_producer
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.settings import Settings
from imagegen.producers.uploads import upload
from imagegen.schemas import GenerationRequest, GenerationResult, Status, decode, encode
from imagegen.schemas.errors import ConfigError
from imagegen.schemas.topics import RENDER, RESULTS
from imagegen.schemas.uploads import upload_key

USERS = 5
# Model loading comes before the first result; after it, results come batch by batch.
FIRST_RESULT_TIMEOUT_S = 600
NEXT_RESULT_TIMEOUT_S = 120


@dataclass(frozen=True)
class Profile:
    device: str
    dtype: str
    model: str
    width: int
    height: int
    steps: int
    batch_sizes: tuple[int, ...]
    #: Requests per worker run; None sizes the backlog to keep a worker busy for `worker_s`
    #: even at twice the bare loop's rate, and for `min_batches` batches at least.
    requests: int | None
    #: A worker run measures this long from its first result, or until the backlog is done,
    #: so a worker far slower than the bare loop cannot stretch the benchmark.
    worker_s: float
    min_batches: int
    bare_s: float  # of timed bare rendering per batch size, after the warm-up
    max_wait_ms: float
    #: Sweeps run in turn; each batch size reports the round with the median ratio. A
    #: shared CPU's speed drifts between runs (measured: the same bare loop 25% apart).
    rounds: int
    #: The edit sweep: each strength at each of these batch sizes, `rounds` times.
    edit_strengths: tuple[float, ...]
    edit_batch_sizes: tuple[int, ...]
    #: None for generation; an edit's strength while the edit sweep runs.
    strength: float | None = None


CPU = Profile(
    device="cpu",
    dtype="float32",
    model="tiny",
    # About 70 ms of CPU per image, a render of some substance beside the store's and the
    # broker's per-image work on the same cores. At tiny's smallest size the model is so
    # cheap that the comparison would weigh HTTP round trips to the object store, which on
    # any real model are noise.
    width=128,
    height=128,
    steps=4,
    batch_sizes=(1, 2, 4, 8),
    requests=None,
    worker_s=12.0,
    min_batches=8,
    bare_s=5.0,
    # The backlog is preloaded, so batches fill within this as long as fetching keeps up.
    max_wait_ms=50.0,
    rounds=3,
    edit_strengths=(0.5, 1.0),
    edit_batch_sizes=(1, 4),
)
QUICK = replace(CPU, worker_s=4.0, bare_s=2.0, rounds=1, edit_strengths=(0.5,))
GPU = replace(
    CPU,
    device="cuda",
    dtype="float16",
    model="sd15-random",
    width=512,
    height=512,
    steps=25,
    requests=30,
    bare_s=10.0,
    worker_s=600.0,
    rounds=1,
)


@dataclass(frozen=True)
class Bare:
    render_images_per_s: float
    render_encode_images_per_s: float
    render_ms_per_batch: float
    encode_ms_per_image: float

    @classmethod
    def mean(cls, runs: tuple[Bare, ...]) -> Bare:
        """Each figure averaged over `runs`."""
        return cls(*(fmean(figures) for figures in zip(*map(astuple, runs), strict=True)))


@dataclass(frozen=True)
class Worker:
    requests: int  # preloaded
    results: int  # measured: fewer than requests when the run was cut off
    images_per_s: float
    measured_s: float
    mean_batch_size: float
    short_batch_results: int  # results whose batch was smaller than asked
    render_ms_per_batch: float
    encode_ms_per_image: float
    upload_ms_per_image: float


def make_requests(profile: Profile, count: int) -> list[GenerationRequest]:
    return [
        GenerationRequest.new(
            user_id=_user(i),
            prompt=f"a lighthouse at dusk, study {i}",
            model=profile.model,
            width=profile.width,
            height=profile.height,
            steps=profile.steps,
            **_edit_fields(profile, _user(i)),
        )
        for i in range(count)
    ]


def _user(index: int) -> str:
    return f"bench-user-{index % USERS}"


def _edit_fields(profile: Profile, user_id: str) -> dict[str, object]:
    if profile.strength is None:
        return {}
    image = upload_key(user_id, hashlib.sha256(input_png(profile)).hexdigest(), "png")
    return {"task": "edit", "image": image, "strength": profile.strength}


@cache
def input_png(profile: Profile) -> bytes:
    """The edits' input: a gradient of the profile's size, the same in every run."""
    gradient = Image.linear_gradient("L").resize((profile.width, profile.height))
    buffer = io.BytesIO()
    Image.merge("RGB", (gradient, gradient.rotate(90), gradient.rotate(180))).save(
        buffer, format="PNG"
    )
    return buffer.getvalue()


def edit_inputs(profile: Profile, batch: int) -> list[EditInputs] | None:
    if profile.strength is None:
        return None
    image = Image.open(io.BytesIO(input_png(profile))).convert("RGB")
    return [EditInputs(image=image, mask=None)] * batch


# ---- bare loop ------------------------------------------------------------------------


def load_renderer(profile: Profile, cache_dir: Path) -> Renderer:
    device = resolve_device(profile.device)
    dtype = resolve_dtype(profile.dtype, device)
    return Renderer(load_pipeline(profile.model, device, dtype, cache_dir), device)


def bare(renderer: Renderer, profile: Profile, batch: int) -> Bare:
    inputs = edit_inputs(profile, batch)
    # First calls allocate and pick kernels.
    renderer.render(make_requests(profile, batch), inputs=inputs)
    render_s = encode_s = 0.0
    batches = 0
    while render_s + encode_s < profile.bare_s or batches < 3:
        started = time.perf_counter()
        images = renderer.render(make_requests(profile, batch), inputs=inputs)
        rendered = time.perf_counter()
        for image in images:
            encode_image(image, "png")
        render_s += rendered - started
        encode_s += time.perf_counter() - rendered
        batches += 1
    images_done = batches * batch
    return Bare(
        render_images_per_s=images_done / render_s,
        render_encode_images_per_s=images_done / (render_s + encode_s),
        render_ms_per_batch=render_s / batches * 1000,
        encode_ms_per_image=encode_s / images_done * 1000,
    )


# ---- worker process -------------------------------------------------------------------


def preload(settings: Settings, requests: list[GenerationRequest]) -> None:
    """Put the requests straight on imagegen.render, as the processor admits them."""
    producer = make_producer(settings)
    for request in requests:
        producer.produce(RENDER, key=request.kafka_key, value=encode(request))
    if producer.flush(60):
        raise RuntimeError("preloading the requests did not finish in 60 s")


def worker_args(profile: Profile, batch: int) -> list[str]:
    return [
        *("worker", "--model", profile.model),
        *("--device", profile.device, "--dtype", profile.dtype),
        *("--max-batch", str(batch), "--max-wait-ms", str(profile.max_wait_ms)),
    ]


def collect(
    settings: Settings,
    expected: set[str],
    process: subprocess.Popen,
    log: Path,
    cutoff_s: float,
) -> list[GenerationResult]:
    """The first result of every expected request, read from imagegen.results, or of those
    that came within `cutoff_s` of the first result."""
    consumer = make_consumer(settings, group_id=f"bench-results-{uuid.uuid4()}")
    partitions = consumer.list_topics(RESULTS, timeout=10).topics[RESULTS].partitions
    consumer.assign([TopicPartition(RESULTS, p, OFFSET_BEGINNING) for p in partitions])
    found: dict[str, GenerationResult] = {}
    deadline = time.monotonic() + FIRST_RESULT_TIMEOUT_S
    cutoff = math.inf
    try:
        while len(found) < len(expected) and time.monotonic() < cutoff:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with {process.returncode}; log: {log}")
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"results stalled at {len(found)} of {len(expected)}; log: {log}"
                )
            for message in consumer.consume(100, timeout=0.5):
                if message.error() is None:
                    result = decode(GenerationResult, message.value())
                    found.setdefault(result.request_id, result)
                    deadline = time.monotonic() + NEXT_RESULT_TIMEOUT_S
                    cutoff = min(cutoff, time.monotonic() + cutoff_s)
    finally:
        consumer.close()
    return list(found.values())


def worker(profile: Profile, batch: int, count: int, log: Path) -> Worker:
    requests = make_requests(profile, count)
    with private_stack() as settings:
        if profile.strength is not None:
            store = ObjectStore(settings)
            for user in {request.user_id for request in requests}:
                upload(store, user, input_png(profile))
        preload(settings, requests)
        args = worker_args(profile, batch)
        with imagegen_child(args, child_env(settings), log) as process:
            expected = {r.request_id for r in requests}
            results = collect(settings, expected, process, log, profile.worker_s)
    if process.returncode != 0:
        # -9: it did not stop within STOP_TIMEOUT_S of SIGTERM and was killed.
        raise RuntimeError(f"the worker exited with {process.returncode} after SIGTERM; log: {log}")
    return summarise(results, count, batch, log)


def summarise(results: list[GenerationResult], count: int, batch: int, log: Path) -> Worker:
    failed = [r for r in results if r.status is not Status.SUCCEEDED]
    if failed:
        raise RuntimeError(
            f"{len(failed)} of {len(results)} requests did not succeed, first: "
            f"{failed[0].reason} {failed[0].detail}; log: {log}"
        )
    results = sorted(results, key=lambda r: r.completed_at)
    span_s = (results[-1].completed_at - results[0].completed_at).total_seconds()
    # The clock starts when the first batch completes, so its images are not counted.
    counted = len(results) - (results[0].batch_size or 1)
    if counted <= 0 or span_s <= 0:
        raise RuntimeError(f"{len(results)} result(s) are too few to time; log: {log}")
    sizes = [r.batch_size or 1 for r in results]
    timings = [r.timings for r in results if r.timings is not None]
    return Worker(
        requests=count,
        results=len(results),
        images_per_s=counted / span_s,
        measured_s=span_s,
        mean_batch_size=fmean(sizes),
        short_batch_results=sum(size < batch for size in sizes),
        render_ms_per_batch=fmean(t.render_ms or 0.0 for t in timings),
        encode_ms_per_image=fmean(t.encode_ms or 0.0 for t in timings),
        upload_ms_per_image=fmean(t.upload_ms or 0.0 for t in timings),
    )


# ---- the sweep ------------------------------------------------------------------------


def request_count(profile: Profile, batch: int, bare_figures: Bare) -> int:
    """Requests for one worker run, rounded up to whole batches so every batch can be full."""
    if profile.requests is not None:
        # Two batches at least: the clock starts when the first one completes.
        wanted = max(profile.requests, 2 * batch)
    else:
        busy = 2 * bare_figures.render_encode_images_per_s * profile.worker_s
        wanted = max(busy, profile.min_batches * batch)
    return math.ceil(wanted / batch) * batch


def run(profile: Profile, scratch: Path) -> dict[str, object]:
    """The sweep; worker logs and the bare loop's model cache go to `scratch`."""
    started = time.monotonic()
    renderer = load_renderer(profile, scratch / "models")
    rows = sweep(renderer, profile, profile.batch_sizes, scratch)
    edits = [
        {"strength": strength, **row}
        for strength in profile.edit_strengths
        for row in sweep(
            renderer, replace(profile, strength=strength), profile.edit_batch_sizes, scratch
        )
    ]
    return {
        "profile": asdict(profile),
        "torch_threads": torch.get_num_threads(),
        "batches": rows,
        "best_ratio": _best(rows, lambda r: r["ratio"]),
        "best_worker": _best(rows, lambda r: r["worker"]["images_per_s"]),
        "edits": edits,
        "best_edit_worker": _best(edits, lambda r: r["worker"]["images_per_s"]),
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def sweep(
    renderer: Renderer, profile: Profile, sizes: tuple[int, ...], scratch: Path
) -> list[dict[str, object]]:
    """One row per batch size: the round with the median ratio."""
    rounds = [
        [measure(renderer, profile, batch, scratch) for batch in sizes]
        for _ in range(profile.rounds)
    ]
    return [_median(each) for each in zip(*rounds, strict=True)]


def measure(renderer: Renderer, profile: Profile, batch: int, scratch: Path) -> dict[str, object]:
    # The worker runs between two bare loops, so that all three see the same background load.
    before = bare(renderer, profile, batch)
    if profile.device == "cuda":
        torch.cuda.empty_cache()  # the bare loop's cached activations, for the worker
    count = request_count(profile, batch, before)
    task = "generate" if profile.strength is None else f"edit-{profile.strength:g}"
    measured = worker(profile, batch, count, scratch / f"worker-{task}-batch-{batch}.log")
    return row(batch, (before, bare(renderer, profile, batch)), measured)


def row(batch: int, bare_runs: tuple[Bare, Bare], measured: Worker) -> dict[str, object]:
    averaged = Bare.mean(bare_runs)
    ratio = measured.images_per_s / averaged.render_encode_images_per_s
    return {
        "batch_size": batch,
        "bare": _rounded(asdict(averaged)),
        "bare_before_after_images_per_s": [
            round(run.render_encode_images_per_s, 2) for run in bare_runs
        ],
        "worker": _rounded(asdict(measured)),
        "ratio": round(ratio, 3),
    }


def _median(rounds: tuple[dict, ...]) -> dict[str, object]:
    """The round with the median ratio, whole (its figures belong together), with every
    round's ratio beside it."""
    ranked = sorted(rounds, key=lambda r: r["ratio"])
    return {**ranked[len(ranked) // 2], "round_ratios": [r["ratio"] for r in rounds]}


def _best(rows: list[dict], score: Callable[[dict], float]) -> dict[str, object]:
    best = max(rows, key=score)
    return {
        "batch_size": best["batch_size"],
        "worker_images_per_s": best["worker"]["images_per_s"],
        "ratio": best["ratio"],
    }


def _rounded(figures: dict[str, float]) -> dict[str, float]:
    return {name: round(value, 2) for name, value in figures.items()}


def profile_from(args: argparse.Namespace) -> Profile:
    profile = GPU if args.gpu else QUICK if args.quick else CPU
    overrides = {
        "model": args.model,
        "width": args.width,
        "height": args.height,
        "steps": args.steps,
        "requests": args.requests,
        "max_wait_ms": args.max_wait_ms,
        "batch_sizes": args.batch_sizes,
    }
    return overridden(profile, overrides)


def batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in value.split(","))
    except ValueError:
        sizes = ()
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: give positive sizes, such as 1,2,4,8")
    return sizes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs, about 1-2 minutes")
    parser.add_argument("--gpu", action="store_true", help="cuda, sd15-random, 512x512, 25 steps")
    parser.add_argument("--model")
    parser.add_argument("--batch-sizes", type=batch_sizes)
    parser.add_argument("--requests", type=positive, help="per worker run (default: sized by time)")
    parser.add_argument("--width", type=int)
    parser.add_argument("--height", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--max-wait-ms", type=float, help="the worker's (default 50)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    profile = profile_from(args)
    if args.gpu:
        try:
            resolve_device("cuda")
        except ConfigError as error:
            sys.exit(f"the --gpu benchmark needs a CUDA GPU: {error}")
    quiet_libraries()
    run_alone("render", lambda scratch: run(profile, scratch), args.out)


def quiet_libraries() -> None:
    """Silence diffusers' and transformers' per-load progress bars and advice."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()


if __name__ == "__main__":
    main()
