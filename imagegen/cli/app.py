"""The `imagegen` command line. Each package adds its own commands to `app`."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from imagegen.cli.cancel import cancel
from imagegen.cli.demo_page import Serving
from imagegen.cli.dlq import dlq_app
from imagegen.cli.extras import require_extras
from imagegen.cli.gateway import gateway
from imagegen.cli.keys import keys_app
from imagegen.cli.processor import processor
from imagegen.cli.results import fetch, results
from imagegen.cli.status import pipeline_status
from imagegen.cli.submit import submit
from imagegen.cli.upload import upload
from imagegen.cli.usage import usage
from imagegen.cli.watch import watch
from imagegen.cli.webhooks import webhooks
from imagegen.cli.worker import worker
from imagegen.infra.embedded import EMBEDDED_FETCH_WAIT_MS, EmbeddedStack
from imagegen.infra.provision import provision
from imagegen.infra.settings import load_settings
from imagegen.schemas.errors import ImagegenError

console = Console(soft_wrap=True)
app = typer.Typer(
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Image generation through Kafka: submit requests, run processors and workers, "
    "operate the embedded stack.",
)
stack_app = typer.Typer(
    no_args_is_help=True,
    help="The embedded Kafka broker (Tansu) and S3 server (moto), for development and tests. "
    "Uses the addresses in IMAGEGEN_KAFKA_BOOTSTRAP and IMAGEGEN_S3_ENDPOINT.",
)
app.add_typer(stack_app, name="stack")
app.add_typer(dlq_app, name="dlq")
app.add_typer(keys_app, name="keys")
app.command("submit")(submit)
app.command("upload")(upload)
app.command("watch")(watch)
app.command("cancel")(cancel)
app.command("processor")(processor)
app.command("worker")(worker)
app.command("gateway")(gateway)
app.command("webhooks")(webhooks)
app.command("results")(results)
app.command("fetch")(fetch)
app.command("status")(pipeline_status)
app.command("usage")(usage)


@app.command("demo")
def demo(
    count: Annotated[int, typer.Option("-n", "--count", min=1, help="Prompts to submit.")] = 8,
    out: Annotated[Path, typer.Option(help="Where the images and the contact sheet go.")] = Path(
        "out"
    ),
    serve: Annotated[
        bool,
        typer.Option(
            "--serve",
            help="Then keep everything running with a gateway, and print the web page's URL "
            "and a demo API key, until Ctrl-C.",
        ),
    ] = False,
    host: Annotated[
        str, typer.Option(help="With --serve: the gateway's address (a key is printed).")
    ] = "127.0.0.1",
    port: Annotated[
        int | None,
        typer.Option(
            min=1,
            max=65535,
            help="With --serve: the gateway's port; default IMAGEGEN_GATEWAY_PORT.",
        ),
    ] = None,
) -> None:
    """Run the whole pipeline here: stack, processor, worker, requests, images in ./out/."""
    extras = ("processor", "worker", "embedded") + (("gateway",) if serve else ())
    require_extras("demo", *extras)
    from imagegen.cli.demo import run_demo  # imports the worker's dependencies only when needed

    settings = load_settings()
    serving = Serving(host, port or settings.gateway_port) if serve else None
    run_demo(settings, count, out, console, serving)


@app.command("init")
def init() -> None:
    """Create the topics and the bucket where the settings point (harmless when they exist)."""
    provision(load_settings(), progress=console.print)


@stack_app.command("up")
def stack_up(
    timeout: float = typer.Option(30.0, help="Seconds to wait for each service to answer."),
) -> None:
    """Start the broker and the object store (harmless when they already run)."""
    settings = load_settings()
    EmbeddedStack(settings).up(timeout_s=timeout, progress=console.print)
    console.print(
        f"[green]stack is up[/green]: IMAGEGEN_KAFKA_BOOTSTRAP={settings.kafka_bootstrap} "
        f"IMAGEGEN_S3_ENDPOINT={settings.s3_endpoint} (bucket {settings.s3_bucket})"
    )
    if settings.kafka_fetch_wait_ms > EMBEDDED_FETCH_WAIT_MS:
        console.print(
            "Tansu answers a waiting fetch only when the wait ends: before starting processes "
            f"against it, export IMAGEGEN_KAFKA_FETCH_WAIT_MS={EMBEDDED_FETCH_WAIT_MS}"
        )


@stack_app.command("status")
def stack_status() -> None:
    """Report both services; exit 1 unless both run and answer."""
    table = Table("service", "address", "pid", "answering", "log")
    healthy = True
    for status in EmbeddedStack(load_settings()).status():
        healthy &= status.pid is not None and status.answering
        table.add_row(
            status.service.name,
            status.service.address,
            str(status.pid) if status.pid else "[red]not running[/red]",
            "[green]yes[/green]" if status.answering else "[red]no[/red]",
            str(status.log),
        )
    console.print(table)
    if not healthy:
        raise typer.Exit(1)


@stack_app.command("down")
def stack_down() -> None:
    """Stop both services."""
    stopped = EmbeddedStack(load_settings()).down()
    if not stopped:
        console.print("nothing was running")
    for service in stopped:
        console.print(f"stopped {service.name} at {service.address}")


def main() -> None:
    """Console-script entry point: project errors print as one line and exit 2."""
    try:
        app()
    except ImagegenError as exc:
        Console(stderr=True).print(
            f"[red]error:[/red] {escape(str(exc))}", highlight=False, soft_wrap=True
        )
        sys.exit(2)
