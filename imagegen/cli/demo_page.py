"""`imagegen demo --serve`: after the scripted run, the web page, for a person to try.

The demo's processes keep running beside a gateway; an API key is made for a user of its
own (`WEB_USER`), and the page's URL and the key are printed. Ctrl-C or SIGTERM stops
everything. The key is revoked before the processes stop, so that on a stack that outlives
the demo it opens nothing afterwards.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import httpx
from rich.console import Console
from rich.markup import escape

from imagegen.cli.children import NotReady, wait_ready
from imagegen.infra.settings import Settings
from imagegen.producers.api_keys import KeyRegistry
from imagegen.schemas.errors import ImagegenError

#: The gateway's key book, event hub and job indexer catch up before /readyz says 200.
READY_TIMEOUT_S = 180.0
#: How often the kept processes are looked at while the page is served.
CHECK_EVERY_S = 1.0
KEY_NAME = "imagegen demo --serve"
#: Not one of the scripted run's users: their jobs went straight onto Kafka, so the gateway
#: has no job records of theirs to list, and their rate-limit buckets are spent.
WEB_USER = "demo-web"


class ServingFailed(ImagegenError):
    """The gateway did not start, or a process the demo keeps running exited."""


@dataclass(frozen=True)
class Serving:
    host: str
    port: int

    @property
    def url(self) -> str:
        # A wildcard address is where the gateway listens, not where a browser goes.
        shown = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)
        return f"http://{f'[{shown}]' if ':' in shown else shown}:{self.port}/"

    def check_free(self) -> None:
        """`ServingFailed` now, before the scripted run, if the gateway could not listen."""
        try:
            with socket.create_server((self.host, self.port)):
                pass
        except OSError as exc:
            raise ServingFailed(
                f"the gateway cannot listen on {self.host}:{self.port} ({exc.strerror}): "
                "choose another port with --port, or another address with --host"
            ) from None

    def gateway_args(self) -> list[str]:
        return ["gateway", "--host", self.host, "--port", str(self.port), "--log-level", "warning"]


@dataclass(frozen=True)
class Kept:
    """A child process that the served demo keeps running, and where its output goes."""

    process: subprocess.Popen[bytes]
    log: Path


def serve_page(
    settings: Settings,
    serving: Serving,
    kept: Mapping[str, Kept],
    console: Console,
    cleanup: ExitStack,
) -> None:
    """Wait for the gateway (`kept["gateway"]`), print the page and a key, and return on
    Ctrl-C or SIGTERM; `ServingFailed` if a kept process exits first."""
    gateway = kept["gateway"]
    try:
        wait_ready(gateway.process, serving.url, READY_TIMEOUT_S)
    except NotReady as exc:
        raise ServingFailed(
            f"the gateway on {serving.host}:{serving.port} did not start: {exc}. If the port "
            f"is taken, choose another with --port (log: {gateway.log})"
        ) from exc
    registry = KeyRegistry(settings)
    token, record = registry.create(WEB_USER, KEY_NAME)
    cleanup.callback(_revoke, registry, record.key_id, console)
    _wait_key_known(serving.url, token, gateway.log)
    _print_page(serving, token, console)
    _until_stopped(kept)


def _wait_key_known(url: str, token: str, log: Path) -> None:
    """Return once the gateway takes the new key: its key book reads it from the broker
    about a fetch wait after it is published, and a key printed sooner could be refused."""
    deadline = time.monotonic() + READY_TIMEOUT_S
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}) as http:
        while time.monotonic() < deadline:
            try:
                if http.get("v1/images/jobs").status_code == 200:
                    return
            except httpx.TransportError:
                pass  # it answered moments ago: a blip; the deadline bounds the wait
            time.sleep(0.2)  # nothing outside the gateway tells when its book caught up
    raise ServingFailed(f"the gateway did not take the demo key in time (log: {log})")


def _print_page(serving: Serving, token: str, console: Console) -> None:
    console.print("\nThe pipeline is serving. Open the page and paste the key:")
    console.print(f"  page:     {serving.url}", highlight=False)
    console.print(f"  API key:  {token}", highlight=False)
    console.print(f"  (a key of user {WEB_USER}, revoked when the demo stops)")
    console.print(
        f"  from a shell: curl -H 'Authorization: Bearer {token}' -H 'Content-Type: "
        f'application/json\' -d \'{{"prompt": "a kite"}}\' {serving.url}v1/images/generations',
        highlight=False,
    )
    console.print("Ctrl-C stops everything.")


def _until_stopped(kept: Mapping[str, Kept]) -> None:
    """Return on Ctrl-C or SIGTERM (`run_demo` makes both KeyboardInterrupt)."""
    try:
        while True:
            for name, child in kept.items():
                if child.process.poll() is not None:
                    raise ServingFailed(
                        f"`imagegen {name}` exited with {child.process.returncode}, so the demo "
                        f"stops (log: {child.log})"
                    )
            time.sleep(CHECK_EVERY_S)
    except KeyboardInterrupt:
        pass


def _revoke(registry: KeyRegistry, key_id: str, console: Console) -> None:
    try:
        registry.revoke(key_id)
    except ImagegenError as exc:
        console.print(
            f"[red]could not revoke the demo key {key_id}[/red]: {escape(str(exc))}. Revoke it "
            f"with `imagegen keys revoke {key_id}` once the broker answers."
        )
        return
    console.print(f"revoked the demo key {key_id}")
