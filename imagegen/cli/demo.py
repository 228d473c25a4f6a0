"""`imagegen demo`: the whole pipeline on one machine, from one command.

It starts what is missing (the embedded stack, a processor, a worker with `tiny`), submits
prompts from a few users, including a duplicate and a burst beyond one user's rate limit,
then an edit and an inpaint of one of the images (`imagegen.cli.demo_edits`), waits for
every answer, prints them, downloads the images with a contact sheet, and stops
everything it started. With `--serve` it keeps all of that running beside a gateway and
serves the web page until Ctrl-C (`imagegen.cli.demo_page`).
"""

from __future__ import annotations

import io
import math
import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from imagegen.cli.children import imagegen_child
from imagegen.cli.demo_edits import edits_of
from imagegen.cli.demo_page import Kept, Serving, serve_page
from imagegen.consumers.results import ResultSubscriber
from imagegen.infra.embedded import EMBEDDED_FETCH_WAIT_MS, EmbeddedStack
from imagegen.infra.kafka import check_broker
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.provision import provision
from imagegen.infra.settings import Settings
from imagegen.producers.publisher import RequestPublisher
from imagegen.schemas import GenerationRequest, GenerationResult, Status
from imagegen.schemas.errors import ImagegenError

PROMPTS = (
    "a lighthouse on a cliff at dusk",
    "a red fox in fresh snow",
    "a paper boat on a puddle",
    "a city skyline made of books",
    "a teapot shaped like a snail",
    "a forest of glass trees",
    "an astronaut tending a garden",
    "a tram crossing a bridge in fog",
)
USERS = ("ann", "bob", "cy")
BURST_USER = "dee"
SIZE = {"width": 128, "height": 128, "steps": 8}
# Tansu holds a group's first join for half the session timeout: keep the demo's short.
DEMO_SESSION_TIMEOUT_MS = "6000"


class DemoFailed(ImagegenError):
    """The pipeline did not answer every demo request as designed."""


@dataclass(frozen=True)
class Submitted:
    request: GenerationRequest
    # What the demo shows with it: "render", "duplicate", "burst", "edit" or "inpaint".
    expect: str
    source: GenerationResult | None = None  # an edit's input: the image it starts from


def run_demo(
    settings: Settings, count: int, out_dir: Path, console: Console, serving: Serving | None
) -> None:
    # SIGTERM stops the demo as Ctrl-C does, through KeyboardInterrupt: the cleanup runs and
    # nothing it started is left behind.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if serving is not None:
        serving.check_free()
    with ExitStack() as cleanup:
        cleanup.enter_context(_stack(settings, console))
        provision(settings, progress=lambda line: console.print(f"  {line}"))
        logs = Path(settings.state_dir) / "demo"
        commands = [["processor", "--log-level", "warning"], ["worker", "--model", "tiny"]]
        if serving is not None:
            # Started with the others: its job indexer joins while the scripted run goes on.
            commands.append(serving.gateway_args())
        kept: dict[str, Kept] = {}
        for args in commands:
            log = logs / f"{args[0]}.log"
            kept[args[0]] = Kept(cleanup.enter_context(_child(args, log, console)), log)
        with ResultSubscriber(settings) as results, RequestPublisher(settings) as publisher:
            _warm_up(settings, results, publisher, console)
            submitted = _submit(settings, publisher, count)
            answers = _collect(results, submitted, console)
            edits = _submit_edits(settings, publisher, submitted, answers)
            answers |= _collect(results, edits, console)
            submitted += edits
        _report(submitted, answers, console)
        _download(settings, submitted, answers, out_dir, console)
        _check(submitted, answers)
        if serving is not None:
            serve_page(settings, serving, kept, console, cleanup)


@contextmanager
def _stack(settings: Settings, console: Console) -> Iterator[None]:
    """Use the broker the settings point at, or start (and later stop) the embedded one."""
    try:
        check_broker(settings, timeout_s=2)
        ObjectStore(settings).check()
    except ImagegenError:
        console.print("starting the embedded stack (Tansu broker, moto S3)")
        stack = EmbeddedStack(settings)
        stack.up(progress=lambda line: console.print(f"  {line}"))
        try:
            yield
        finally:
            stack.down()
            console.print("stopped the embedded stack")
        return
    console.print(f"using the stack at {settings.kafka_bootstrap} and {settings.s3_endpoint}")
    yield


@contextmanager
def _child(args: list[str], log: Path, console: Console) -> Iterator[subprocess.Popen[bytes]]:
    env = {
        "IMAGEGEN_KAFKA_SESSION_TIMEOUT_MS": DEMO_SESSION_TIMEOUT_MS,
        "IMAGEGEN_KAFKA_FETCH_WAIT_MS": str(EMBEDDED_FETCH_WAIT_MS),
        **os.environ,
    }
    try:
        with imagegen_child(args, env, log) as process:
            console.print(f"started `imagegen {' '.join(args)}` (log: {log})")
            yield process
    finally:
        console.print(f"stopped `imagegen {args[0]}`")


def _warm_up(
    settings: Settings, results: ResultSubscriber, publisher: RequestPublisher, console: Console
) -> None:
    """Wait until one request has gone all the way through, so latencies exclude start-up."""
    probe = GenerationRequest.new(user_id="demo-warmup", prompt="warm up", **SIZE)
    publisher.publish(probe)
    with console.status("waiting for the processor and the worker to start ..."):
        try:
            results.wait_for([probe.request_id], timeout_s=300)
        except ImagegenError as exc:
            logs = Path(settings.state_dir) / "demo"
            raise DemoFailed(f"the pipeline did not start: {exc} (see the logs in {logs})") from exc


def _submit(settings: Settings, publisher: RequestPublisher, count: int) -> list[Submitted]:
    submitted = [
        Submitted(
            GenerationRequest.new(
                user_id=USERS[i % len(USERS)],
                prompt=PROMPTS[i % len(PROMPTS)],
                idempotency_key=f"demo-{i}",
                **SIZE,
            ),
            "render",
        )
        for i in range(count)
    ]
    # The same idempotency key again, under a new request id: answered as a duplicate.
    first = submitted[0].request
    again = GenerationRequest.new(
        user_id=first.user_id, prompt=first.prompt, idempotency_key=first.idempotency_key, **SIZE
    )
    submitted.append(Submitted(again, "duplicate"))
    # More than one user's bucket holds, all at once: the excess is rejected.
    burst = math.ceil(settings.rate_user_burst) + 3
    submitted += [
        Submitted(GenerationRequest.new(user_id=BURST_USER, prompt=f"burst {i}", **SIZE), "burst")
        for i in range(burst)
    ]
    for item in submitted:
        publisher.publish(item.request)
    return submitted


def _submit_edits(
    settings: Settings,
    publisher: RequestPublisher,
    submitted: list[Submitted],
    answers: dict[str, GenerationResult],
) -> list[Submitted]:
    """An edit and an inpaint of the first rendered image, once it is there."""
    rendered = [answers[item.request.request_id] for item in submitted if item.expect == "render"]
    source = next((r for r in rendered if r.status is Status.SUCCEEDED), None)
    if source is None:
        raise DemoFailed("no demo image was rendered, so none could be edited")
    edits = [
        Submitted(edit.request, edit.request.task, edit.source)
        for edit in edits_of(ObjectStore(settings), source, SIZE)
    ]
    for item in edits:
        publisher.publish(item.request)
    return edits


def _collect(
    results: ResultSubscriber, submitted: list[Submitted], console: Console
) -> dict[str, GenerationResult]:
    columns = (TextColumn("answers"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("answers", total=len(submitted))
        return results.wait_for(
            [item.request.request_id for item in submitted],
            timeout_s=600,
            on_result=lambda _: progress.advance(task),
        )


def _report(
    submitted: list[Submitted], answers: dict[str, GenerationResult], console: Console
) -> None:
    table = Table("request", "user", "shows", "status", "latency")
    table.add_column("object key or reason", overflow="fold")
    for item in submitted:
        result = answers[item.request.request_id]
        latency_ms = (result.completed_at - item.request.submitted_at).total_seconds() * 1000
        if result.object_key:
            where = result.object_key
        elif result.duplicate_of:
            where = f"duplicate of …{result.duplicate_of[-6:]}"
        else:
            where = result.reason.value if result.reason else ""
        table.add_row(
            # ULIDs share their leading (time) characters: the tail tells them apart.
            f"…{item.request.request_id[-6:]}",
            item.request.user_id,
            item.expect,
            result.status.value,
            f"{latency_ms:,.0f} ms",
            where,
        )
    console.print(table)


def _download(
    settings: Settings,
    submitted: list[Submitted],
    answers: dict[str, GenerationResult],
    out_dir: Path,
    console: Console,
) -> None:
    """Every image into `out_dir`, and a contact sheet: each edit beside its input."""
    store = ObjectStore(settings)
    out_dir.mkdir(parents=True, exist_ok=True)
    tiles: list[tuple[str, Image.Image]] = []
    images: dict[str, Image.Image] = {}  # by object key: an edit's input was read already
    for item in submitted:
        result = answers[item.request.request_id]
        if result.status is not Status.SUCCEEDED or not result.object_key:
            continue
        data = store.get(result.object_key)
        (out_dir / Path(result.object_key).name).write_bytes(data)
        images[result.object_key] = _opened(data)
        label = result.user_id
        if item.source is not None and item.source.object_key in images:
            tiles.append(("input", images[item.source.object_key]))
            label = item.expect
        tiles.append((label, images[result.object_key]))
    sheet = out_dir / "contact-sheet.png"
    _contact_sheet(tiles).save(sheet)
    console.print(f"wrote {len(images)} images and {sheet}")


def _opened(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def _contact_sheet(tiles: list[tuple[str, Image.Image]], tile: int = 128) -> Image.Image:
    columns = max(1, min(6, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    sheet = Image.new("RGB", (columns * tile, rows * (tile + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (label, image) in enumerate(tiles):
        x, y = (index % columns) * tile, (index // columns) * (tile + 14)
        sheet.paste(image.resize((tile, tile)), (x, y))
        draw.text((x + 2, y + tile + 1), label, fill="black")
    return sheet


def _check(submitted: list[Submitted], answers: dict[str, GenerationResult]) -> None:
    """Every request answered as designed, or `DemoFailed` says which were not."""
    wrong = []
    for item in submitted:
        status = answers[item.request.request_id].status
        allowed = {
            "render": {Status.SUCCEEDED},
            "duplicate": {Status.DUPLICATE},
            "burst": {Status.SUCCEEDED, Status.REJECTED},
            "edit": {Status.SUCCEEDED},
            "inpaint": {Status.SUCCEEDED},
        }[item.expect]
        if status not in allowed:
            wrong.append(f"{item.request.request_id} ({item.expect}): {status.value}")
    burst = [answers[i.request.request_id].status for i in submitted if i.expect == "burst"]
    if Status.REJECTED not in burst:
        wrong.append("the burst was not rate-limited")
    if wrong:
        raise DemoFailed("not every request was answered as designed: " + "; ".join(wrong))
