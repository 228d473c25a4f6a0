"""`imagegen worker`: render admitted requests until SIGTERM."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Annotated

import typer

from infra.settings import load_settings


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
        float, typer.Option(min=0, help="Longest wait for company before a batch runs.")
    ] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
) -> None:
    """Render requests from imagegen.render, store the images, publish the results."""
    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # OpenMP threads that spin while waiting for work starve everything else on a busy
    # CPU host (Kafka, S3, other processes): measured 3-5x slower renders under load.
    # It must be set before torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # torch and diffusers are slow to import: load them only for this command.
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    from consumers.models import ModelRegistry, resolve_device, resolve_dtype
    from consumers.rendering import Renderer
    from consumers.worker import RenderWorker, WorkerOptions

    # Their per-load progress bars and advice would drown the worker's own log.
    for library in (diffusers_logging, transformers_logging):
        library.set_verbosity_error()
        library.disable_progress_bar()
    settings = load_settings()
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, torch_device)
    started = time.monotonic()
    typer.echo(f"loading {', '.join(model)} on {torch_device} ({torch_dtype}) ...", err=True)
    registry = ModelRegistry.load(
        model, torch_device, torch_dtype, Path(settings.state_dir) / "models"
    )
    typer.echo(f"loaded in {time.monotonic() - started:.1f}s", err=True)
    renderers = {name: Renderer(registry.get(name), torch_device) for name in registry.names}
    options = WorkerOptions(
        max_batch=max_batch, max_wait_ms=max_wait_ms, max_in_flight=max(32, 4 * max_batch)
    )
    RenderWorker(settings, renderers, options).run()
