"""`imagegen worker`: render admitted requests until SIGTERM."""

from __future__ import annotations

import logging
import os
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Annotated

import typer

from imagegen.cli.extras import require_extras
from imagegen.cli.options import LogLevel, WorkerMetricsPort
from imagegen.infra.health import Health, probe_broker_and_store
from imagegen.infra.logs import configure_logging
from imagegen.infra.metrics import LagMonitor, serve
from imagegen.infra.settings import load_settings
from imagegen.schemas.topics import WORKER_GROUPS

log = logging.getLogger(__name__)


def worker(
    model: Annotated[
        list[str],
        typer.Option(
            help="A model to serve: tiny, sd15-random, a hub id, or NAME=SOURCE to serve a "
            "local directory under the name requests use. Repeat to serve several."
        ),
    ] = ["tiny"],  # noqa: B006 - typer reads the default, never mutates it
    device: Annotated[str, typer.Option(help="auto, cuda, mps or cpu.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float16, bfloat16 or float32.")] = "auto",
    max_batch: Annotated[int, typer.Option(min=1, help="Most requests per forward pass.")] = 4,
    max_wait_ms: Annotated[
        float,
        typer.Option(
            min=0,
            help="Longest wait for company before a short batch runs; waited only when "
            "requests lately came one per wait or faster.",
        ),
    ] = 10.0,
    cpu_threads: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Threads a CPU render computes with (default: one per core). On a host "
            "shared with the broker, the store or other workers, fewer keep renders steady.",
        ),
    ] = None,
    log_level: LogLevel = None,
    metrics_port: WorkerMetricsPort = None,
) -> None:
    """Render requests from imagegen.render (and from imagegen.render.batch while no
    interactive work waits), store the images, publish the results."""
    require_extras("worker", "worker")
    settings = load_settings()
    configure_logging(settings, log_level)
    health = Health()
    health.readiness.wait_for("model", "loading " + ", ".join(model))
    for group in WORKER_GROUPS.values():
        health.readiness.joining(group)
    probe_broker_and_store(health.readiness, settings)
    # Before the slow model load, so that a taken port fails at once, and so that a probe
    # finds the process alive (and not ready) while it loads.
    metrics = serve(
        settings.worker_metrics_port if metrics_port is None else metrics_port,
        settings.metrics_host,
        setting="--metrics-port (or IMAGEGEN_WORKER_METRICS_PORT)",
        health=health,
    )
    # OpenMP threads that spin while waiting for work starve everything else on a busy
    # CPU host (Kafka, S3, other processes): measured 3x slower renders under load. Threads
    # that sleep at once wake too late for the next small operation: measured 1.3x slower
    # renders of one small image. So they spin briefly (GNU OpenMP: about a millisecond),
    # then sleep. Both must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ.setdefault("GOMP_SPINCOUNT", "100000")
    # torch and diffusers are slow to import: load them only for this command.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Their per-load progress bars and advice would drown the worker's own log, and their
    # own stderr handlers would write plain text between its structured lines. Before the
    # imports below: importing the pipelines already gives advice.
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
        library.disable_default_handler()
        library.enable_propagation()

    import torch

    from imagegen.consumers.devices import resolve_device, resolve_dtype
    from imagegen.consumers.models import ModelRegistry
    from imagegen.consumers.rendering import Renderer
    from imagegen.consumers.worker import RenderWorker, WorkerOptions

    if cpu_threads is not None:
        # A render waits for the slowest of its threads, so one thread preempted by another
        # process stalls it. Measured beside the embedded stack on 2 cores: one thread
        # rendered in 26-30 ms throughout; a thread per core in 21-22 ms while the host was
        # quiet, and in 36-51 ms while it was busy.
        torch.set_num_threads(cpu_threads)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.monotonic()
    log.info(
        "loading %s on %s (%s)%s",
        ", ".join(model),
        torch_device,
        torch_dtype,
        f", {torch.get_num_threads()} thread(s)" if torch_device.type == "cpu" else "",
    )
    registry = ModelRegistry.load(
        model, torch_device, torch_dtype, Path(settings.state_dir) / "models"
    )
    log.info("loaded in %.1fs", time.monotonic() - started)
    health.readiness.holds("model")
    renderers = {name: Renderer(registry.get(name), torch_device) for name in registry.names}
    options = WorkerOptions(
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_in_flight=max(32, 4 * max_batch)
    )
    render_worker = RenderWorker(settings, renderers, options, health=health)
    with ExitStack() as lag_monitors:
        if metrics is not None:  # lag is only worth reading where something scrapes it
            for topic, group in WORKER_GROUPS.items():
                lag_monitors.enter_context(LagMonitor(settings, group, [topic]))
        render_worker.run()
