"""`imagegen stack up|status|down` as a user runs them: real processes on real ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from imagegen.infra.settings import Settings
from tests.helpers import free_port

IMAGEGEN = [sys.executable, "-m", "imagegen"]


def imagegen(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*IMAGEGEN, *args], env=env, capture_output=True, text=True, timeout=120, check=False
    )


def stack_env(state_dir: Path, kafka_port: int | None, s3_port: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IMAGEGEN_")}
    env["IMAGEGEN_STATE_DIR"] = str(state_dir)
    env["COLUMNS"] = "200"
    if kafka_port is not None:
        env["IMAGEGEN_KAFKA_BOOTSTRAP"] = f"127.0.0.1:{kafka_port}"
    if s3_port is not None:
        env["IMAGEGEN_S3_ENDPOINT"] = f"127.0.0.1:{s3_port}"
    return env


def port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pids(state_dir: Path) -> list[int]:
    return [int(path.read_text()) for path in state_dir.glob("*.pid")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A reaped-later zombie is as good as gone.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.exists() and stat.read_text().split(") ")[1].startswith("Z"))


def up_status_down(env: dict[str, str], state_dir: Path) -> None:
    up = imagegen("stack", "up", env=env)
    assert up.returncode == 0, up.stderr
    assert "stack is up" in up.stdout
    started = pids(state_dir)
    assert len(started) == 2

    again = imagegen("stack", "up", env=env)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("already running") == 2
    assert pids(state_dir) == started

    status = imagegen("stack", "status", env=env)
    assert status.returncode == 0, status.stdout
    assert status.stdout.count("yes") == 2

    down = imagegen("stack", "down", env=env)
    assert down.returncode == 0, down.stderr
    assert not any(alive(pid) for pid in started)
    assert pids(state_dir) == []

    after = imagegen("stack", "status", env=env)
    assert after.returncode == 1
    assert after.stdout.count("not running") == 2


@pytest.mark.integration  # starts a stack of its own
def test_up_status_down_on_ports_from_settings(tmp_path: Path) -> None:
    kafka_port, s3_port = free_port(), free_port()
    up_status_down(stack_env(tmp_path, kafka_port, s3_port), tmp_path)
    assert port_is_free(kafka_port) and port_is_free(s3_port)


@pytest.mark.integration  # starts a stack of its own
def test_up_status_down_on_default_ports(tmp_path: Path) -> None:
    if not (port_is_free(9092) and port_is_free(9000)):
        pytest.skip("ports 9092/9000 are in use on this machine")
    up_status_down(stack_env(tmp_path, None, None), tmp_path)


def test_a_taken_port_fails_at_once_and_names_it(settings: Settings, tmp_path: Path) -> None:
    taken = settings.kafka_bootstrap.rpartition(":")[2]  # the session broker holds it
    result = imagegen("stack", "up", env=stack_env(tmp_path, int(taken), free_port()))
    assert result.returncode == 2
    assert f"port {taken}" in result.stderr and "IMAGEGEN_KAFKA_BOOTSTRAP" in result.stderr
    assert pids(tmp_path) == []


def test_a_missing_broker_binary_fails_at_once_and_names_it(tmp_path: Path) -> None:
    env = stack_env(tmp_path, free_port(), free_port())
    env["CALF_TANSU_BIN"] = str(tmp_path / "no-such-tansu")
    result = imagegen("stack", "up", env=env)
    assert result.returncode == 2
    assert "Tansu broker binary was not found" in result.stderr
    assert "imagegen-pipeline[embedded]" in result.stderr


def test_a_remote_bootstrap_is_refused(tmp_path: Path) -> None:
    env = stack_env(tmp_path, None, free_port())
    env["IMAGEGEN_KAFKA_BOOTSTRAP"] = "kafka.internal:9092"
    result = imagegen("stack", "up", env=env)
    assert result.returncode == 2
    assert "not a single local address" in result.stderr
